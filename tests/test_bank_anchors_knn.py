"""Memory bank, anchor discovery and kNN (docs/ALGORITHM.md sections 3, 4 and 7)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lib.core.knn import knn_correct
from lib.core.knn import knn_scores
from lib.core.memory_bank import MemoryBank
from lib.core.neighbourhoods import ANsDiscovery, bank_entropy


# ----------------------------------------------------------------------------- memory bank
def test_bank_initialisation_range():
    bank = MemoryBank(128, 500, 0.1, 0.5, generator=torch.Generator().manual_seed(0))
    s = 1 / math.sqrt(128 / 3)
    assert bank.memory.shape == (500, 128)
    assert bank.memory.min() >= -s and bank.memory.max() <= s
    assert bank.memory.min() < -0.9 * s and bank.memory.max() > 0.9 * s
    assert bank.params.tolist() == pytest.approx([0.1, 0.5])


def test_bank_update_second_view_wins():
    n, d, b, m = 20, 6, 4, 0.5
    bank = MemoryBank(d, n, 0.1, m, generator=torch.Generator().manual_seed(1))
    old = bank.memory.double().clone()
    g = torch.Generator().manual_seed(2)
    features = F.normalize(torch.randn(2 * b, d, generator=g), dim=1)
    indexes = torch.tensor([7, 0, 13, 4])
    bank.update(features, indexes)
    # Reference: both views read the old rows and write in turn; the second write stays.
    want = old.clone()
    for view in range(2):
        for k, i in enumerate(indexes.tolist()):
            w = m * old[i] + (1 - m) * features[view * b + k].double()
            want[i] = w / w.norm()
    assert torch.allclose(bank.memory.double(), want, atol=1e-6)
    untouched = [i for i in range(n) if i not in indexes.tolist()]
    assert torch.equal(bank.memory[untouched], old[untouched].float())


def test_bank_logits_are_scaled_dot_products():
    bank = MemoryBank(4, 3, 0.1, 0.5)
    bank.memory.copy_(torch.eye(4)[:3])
    f = torch.tensor([[0.5, 0.5, 0.5, 0.5]], requires_grad=True)
    logits = bank.logits(f)
    assert torch.allclose(logits, torch.tensor([[5.0, 5.0, 5.0]]))
    logits.sum().backward()
    assert torch.allclose(f.grad, torch.tensor([[10.0, 10.0, 10.0, 0.0]]))
    assert bank.memory.grad is None


# ----------------------------------------------------------------------------- anchors
def reference_entropy(memory, t):
    m = memory.double().numpy()
    logits = m @ m.T / t
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    return -(p * np.log(p)).sum(1)


def unit_bank(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_entropy_matches_reference_in_chunks():
    memory = unit_bank(50, 8, 0)
    want = reference_entropy(memory, 0.1)
    for chunk in (7, 50, 1024):
        assert np.allclose(bank_entropy(memory, 0.1, chunk).numpy(), want, atol=1e-4)


def test_anchors_are_the_lowest_entropy_entries_and_counts_per_round():
    n = 40
    memory = unit_bank(n, 8, 3)
    order = np.argsort(reference_entropy(memory, 0.1))
    labels = torch.arange(n) % 4
    for round_index, expected in ((1, 10), (2, 20), (3, 30), (4, 40), (5, 40)):
        ans = ANsDiscovery(n, 0.25, 1)
        ans.update(round_index, memory, 0.1, labels, chunk_rows=9)
        assert ans.num_anchors == expected == int(n * 0.25 * min(round_index, 4))
        assert set(ans.anchor_indexes.tolist()) == set(order[:expected].tolist())
        # position: rank among anchors, or -1, -2, ... over the others in index order
        others = [i for i in range(n) if i not in set(ans.anchor_indexes.tolist())]
        assert ans.position[others].tolist() == [-(k + 1) for k in range(len(others))]
        assert ans.position[ans.anchor_indexes].tolist() == list(range(expected))


def test_counts_use_int_of_the_product():
    ans = ANsDiscovery(50_000, 0.25, 1)
    assert [ans.anchors_in_round(r) for r in range(5)] == [0, 12500, 25000, 37500, 50000]
    assert ANsDiscovery(10, 0.3, 1).anchors_in_round(1) == 3


def test_neighbours_exclude_self_even_for_duplicates():
    memory = unit_bank(12, 5, 4)
    memory[5] = memory[2]                       # entry 5 is an exact copy of entry 2
    ans = ANsDiscovery(12, 1.0, 2)
    ans.update(1, memory, 0.1)
    sims = (memory @ memory.t()).double()
    for row, anchor in enumerate(ans.anchor_indexes.tolist()):
        nbrs = ans.neighbours[row].tolist()
        assert anchor not in nbrs
        ranked = [j for j in sims[anchor].argsort(descending=True).tolist() if j != anchor]
        assert nbrs == ranked[:2]
    assert ans.neighbours[ans.position[2]].tolist()[0] == 5
    assert ans.neighbours[ans.position[5]].tolist()[0] == 2
    # The dense table used by the loss agrees with the released buffers.
    assert torch.equal(ans.neighbour_table[ans.anchor_indexes], ans.neighbours)


@pytest.mark.parametrize('chunk_rows', [1, 3, 7, None])
def test_neighbours_taken_in_chunks_match_a_whole_ranking(chunk_rows):
    memory = unit_bank(23, 6, 7)
    ans = ANsDiscovery(23, 0.25, 3)
    ans.update(3, memory, 0.1, chunk_rows=chunk_rows)     # 17 anchors: chunks that do not divide
    sims = memory.double() @ memory.double().t()
    sims.fill_diagonal_(-math.inf)
    expected = sims[ans.anchor_indexes].argsort(dim=1, descending=True)[:, :3]
    assert torch.equal(ans.neighbours, expected)


def test_a_round_without_anchors_has_no_neighbours_and_no_consistency():
    ans = ANsDiscovery(10, 0.05, 2)                     # int(10 * 0.05 * 1) = 0 anchors
    consistency = ans.update(1, unit_bank(10, 4, 1), 0.1, labels=torch.arange(10) % 3)
    assert ans.num_anchors == 0 and ans.neighbours.shape == (0, 2)
    assert (ans.neighbour_table == -1).all() and ans.position.tolist() == list(range(-1, -11, -1))
    assert math.isnan(float(consistency))               # no pair to judge: not 0%


def test_consistency_without_labelled_pairs_is_nan():
    ans = ANsDiscovery(6, 0.5, 1)
    consistency = ans.update(1, unit_bank(6, 4, 2), 0.1, labels=torch.full((6,), -1))
    assert ans.num_anchors == 3 and math.isnan(float(consistency))


def test_loaded_neighbours_keep_their_width_and_ans_size_applies_from_the_next_round():
    """A checkpoint found its anchors with 1 neighbour; a run with ans_size 3 uses them as
    they are in that round and finds 3 per anchor at its next discovery (as the released code,
    whose update uses its own ANs_size)."""
    memory = unit_bank(20, 6, 3)
    saved = ANsDiscovery(20, 0.25, 1)
    saved.update(1, memory, 0.1)
    ans = ANsDiscovery(20, 0.25, 3)
    ans.load_state_dict(saved.state_dict())
    assert ans.ans_size == 3 and ans.neighbours.shape == (5, 1)
    assert torch.equal(ans.neighbour_table, saved.neighbour_table)
    ans.update(2, memory, 0.1)
    assert ans.neighbours.shape == (10, 3) and ans.neighbour_table.shape == (20, 3)


def test_released_state_before_round_one_loads():
    """The released code starts `neighbours` as an empty 1-D list."""
    state = ANsDiscovery(8, 0.5, 2).state_dict()
    state['neighbours'] = torch.zeros(0, dtype=torch.long)
    ans = ANsDiscovery(8, 0.5, 2)
    ans.load_state_dict(state)
    assert ans.neighbours.shape == (0, 2) and (ans.neighbour_table == -1).all()


def test_consistency_hand_worked():
    # Two tight pairs (0,1) and (2,3), labels agree in the first pair only.
    memory = F.normalize(torch.tensor([[1.0, 0.0], [0.99, 0.1], [-1.0, 0.0], [-0.99, -0.1]]),
                         dim=1)
    ans = ANsDiscovery(4, 1.0, 1)
    consistency = ans.update(1, memory, 0.1, labels=torch.tensor([0, 0, 1, 2]))
    assert sorted(ans.neighbours.view(-1).tolist()) == [0, 1, 2, 3]
    assert float(consistency) == pytest.approx(0.5)


def test_a_loaded_bank_keeps_its_own_temperature_and_momentum():
    saved = MemoryBank(4, 3, 0.1, 0.5, generator=torch.Generator().manual_seed(2))
    bank = MemoryBank(4, 3, 0.2, 0.9)
    bank.load_state_dict(saved.state_dict())
    assert torch.equal(bank.memory, saved.memory)
    assert (bank.temperature, bank.momentum) == (0.2, 0.9)
    assert bank.params.tolist() == pytest.approx([0.2, 0.9])        # as its checkpoints say
    assert torch.equal(bank.logits(saved.memory), saved.memory @ saved.memory.t() / 0.2)


def test_anchor_state_round_trips_through_state_dict():
    memory = unit_bank(30, 6, 5)
    ans = ANsDiscovery(30, 0.25, 1)
    ans.update(2, memory, 0.1)
    fresh = ANsDiscovery(30, 0.25, 1)
    fresh.load_state_dict(ans.state_dict())
    for name in ('anchor_indexes', 'instance_indexes', 'position', 'neighbours'):
        assert torch.equal(getattr(fresh, name), getattr(ans, name))
    assert torch.equal(fresh.neighbour_table, ans.neighbour_table)


# ----------------------------------------------------------------------------- kNN
def test_knn_hand_worked_case():
    # Train points on the unit circle; one query at angle 0.
    angles = torch.tensor([0.1, -0.2, 0.3, 2.0, 2.1, 3.0])
    train = torch.stack((angles.cos(), angles.sin()), 1)
    labels = torch.tensor([0, 1, 1, 2, 2, 2])
    query = torch.tensor([[1.0, 0.0]])
    scores = knn_scores(query, train, labels, num_classes=3, k=3, sigma=0.1)
    # k=3 nearest: angles 0.1 (class 0), -0.2 and 0.3 (class 1); weight exp(cos(a) / 0.1)
    w = {a: math.exp(math.cos(a) / 0.1) for a in (0.1, -0.2, 0.3)}
    want = [w[0.1], w[-0.2] + w[0.3], 0.0]
    assert scores[0].tolist() == pytest.approx(want, rel=1e-5)
    # With sigma 1.0 the single closest neighbour no longer loses to the pair of class 1.
    assert knn_scores(query, train, labels, 3, k=3, sigma=1.0).argmax().item() == 1
    assert knn_scores(query, train, labels, 3, k=1, sigma=0.1).argmax().item() == 0


def knn_accuracy(test, targets, train, labels, classes, k, sigma=0.1):
    return tuple((knn_correct(test, targets, train, labels, classes, k, sigma)
                  / len(targets)).tolist())


def test_knn_accuracy_top1_top5():
    angles = torch.linspace(0, 6, 60)
    train = torch.stack((angles.cos(), angles.sin()), 1)
    labels = torch.arange(60) // 10                     # 6 classes in arcs of ~1 radian
    test_angles = torch.tensor([0.3, 1.3, 2.3, 3.3])
    test = torch.stack((test_angles.cos(), test_angles.sin()), 1)
    # The 20 nearest span about +-1 radian: queries 0.3 and 2.3 are right at top-1; 1.3
    # (class 1 wins) and 3.3 (class 3 wins) have their targets among the voting classes.
    targets = torch.tensor([0, 2, 2, 4])
    top1, top5 = knn_accuracy(test, targets, train, labels, 6, k=20, sigma=0.1)
    assert top1 == pytest.approx(0.5)
    assert top5 == pytest.approx(1.0)
    top1_k1, _ = knn_accuracy(test, torch.tensor([0, 1, 2, 3]), train, labels, 6, k=1)
    assert top1_k1 == pytest.approx(1.0)
