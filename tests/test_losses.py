"""The three losses against float64 references written here from docs/ALGORITHM.md section 5,
over several sizes; their argument checks; and the step's named losses."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import lib.core.losses as losses_module
from lib.core.losses import LOSSES, Loss, and_loss, augmentation_loss, ue_loss
from lib.core.memory_bank import MemoryBank
from lib.core.step import StepLosses, local_batch

B, N, D, K, T = 6, 40, 8, 2, 0.1
SIZES = [(2, 10, 4, 1), (6, 40, 8, 2), (16, 200, 32, 3)]      # (B, N, D, K)


def batch(seed=0, b=B, n=N, d=D):
    """Unit features (2b x d, view-1 rows first), a unit bank (n x d), b distinct indexes."""
    g = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(2 * b, d, generator=g), dim=1)
    memory = F.normalize(torch.randn(n, d, generator=g), dim=1)
    indexes = torch.randperm(n, generator=g)[:b]
    return features, memory, indexes


def neighbour_table(indexes, seed=1, n=N, k=K):
    """Every other image of the batch is an anchor with k neighbours (never itself)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.full((n, k), -1, dtype=torch.long)
    anchors = {}
    for i in indexes[::2].tolist():
        others = [j for j in torch.randperm(n, generator=g).tolist() if j != i][:k]
        table[i] = torch.tensor(others)
        anchors[i] = others
    return table, anchors


def softmax64(row):
    row = [float(v) for v in row]
    top = max(row)
    e = [math.exp(v - top) for v in row]
    s = sum(e)
    return [v / s for v in e]


def reference_and(logits, targets, anchors):
    total = 0.0
    for r in range(logits.shape[0]):
        p = softmax64(logits[r])
        y = int(targets[r])
        total += -math.log(p[y] + sum(p[j] for j in anchors.get(y, [])))
    return total / logits.shape[0]


def reference_ue(logits, targets):
    total = 0.0
    for r in range(logits.shape[0]):
        row = [float(v) for v in logits[r]]
        row[int(targets[r])] = -10.0
        total += -sum(q * math.log(q) for q in softmax64(row))
    return total / logits.shape[0]


def reference_aug(rows, t, m=1.0):
    """ALGORITHM.md 5.2 term by term, x_j a constant for every j != i (float64 torch)."""
    x = rows / rows.norm(dim=1, keepdim=True)
    n = x.shape[0]
    total = 0.0
    for i in range(n):
        partner = (i + n // 2) % n
        s = [torch.exp(x[i] @ x[j].detach() / t) if j != i else None for j in range(n)]
        pos = s[partner]
        z = sum(s[j] for j in range(n) if j != i)
        if m != 1.0:
            z = (z - pos) * m + pos
        total = total + torch.log(pos / z)
        total = total + m * sum(torch.log(1 - s[j] / z) for j in range(n) if j not in (i, partner))
    return -total / n


@pytest.mark.parametrize('b, n, d, k', SIZES)
def test_and_loss_mixes_anchors_and_instances(b, n, d, k):
    features, memory, indexes = batch(0, b, n, d)
    table, anchors = neighbour_table(indexes, 1, n, k)
    logits = features @ memory.t() / T
    targets = indexes.repeat(2)
    got = and_loss(logits, targets, table[targets])
    assert abs(got.item() - reference_and(logits, targets, anchors)) < 1e-5
    # Without anchors it is the plain instance loss, which is different here.
    none = torch.full_like(table, -1)
    assert abs(and_loss(logits, targets, none[targets]).item()
               - reference_and(logits, targets, {})) < 1e-5
    assert abs(reference_and(logits, targets, {}) - got.item()) > 1e-4


@pytest.mark.parametrize('b, n, d, k', SIZES)
def test_ue_loss_masks_own_entry(b, n, d, k):
    features, memory, indexes = batch(2, b, n, d)
    logits = features @ memory.t() / T
    targets = indexes.repeat(2)
    assert abs(ue_loss(logits, targets).item() - reference_ue(logits, targets)) < 1e-5


@pytest.mark.parametrize('call, needle', [
    (lambda: and_loss(torch.zeros(4, 5), torch.zeros(3, dtype=torch.long),
                      torch.zeros(4, 1, dtype=torch.long)), 'targets R'),
    (lambda: and_loss(torch.zeros(4), torch.zeros(4, dtype=torch.long),
                      torch.zeros(4, 1, dtype=torch.long)), 'logits R x N'),
    (lambda: ue_loss(torch.zeros(4, 5), torch.zeros(5, dtype=torch.long)), 'targets R'),
    (lambda: augmentation_loss(torch.zeros(5, 3), 0.1), 'even number of rows'),
    (lambda: augmentation_loss(torch.zeros(4, 3), 0.0), 'temperature above 0'),
])
def test_the_losses_check_their_arguments(call, needle):
    with pytest.raises(ValueError, match=needle):
        call()


def test_augmentation_loss_value_and_gradient():
    for rows_width, m in ((N, 1.0), (D, 1.0), (N, 2.0)):
        g = torch.Generator().manual_seed(rows_width)
        rows = torch.randn(2 * B, rows_width, generator=g, dtype=torch.float64) * 3
        mine = rows.clone().requires_grad_(True)
        ref = rows.clone().requires_grad_(True)
        got = augmentation_loss(mine, 0.1, m)
        want = reference_aug(ref, 0.1, m)
        assert abs(got.item() - want.item()) < 1e-9
        got.backward()
        want.backward()
        assert torch.allclose(mine.grad, ref.grad, atol=1e-9)


def test_augmentation_loss_on_bank_logit_rows_float32():
    features, memory, indexes = batch(3)
    logits = features @ memory.t() / T
    want = reference_aug(logits.double(), 0.1).item()
    assert abs(augmentation_loss(logits, 0.1).item() - want) < 1e-4


def step_losses(bank, table, names=('and', 'aug', 'ue'), aug_input='logits'):
    return StepLosses(bank, SimpleNamespace(neighbour_table=table), names, 2, aug_input, 0.1)


@pytest.mark.parametrize('b, n, d, k', SIZES)
def test_the_step_takes_the_named_losses(b, n, d, k):
    features, memory, indexes = batch(4, b, n, d)
    table, anchors = neighbour_table(indexes, 1, n, k)
    bank = MemoryBank(d, n, T, 0.5)
    bank.memory.copy_(memory)
    got = step_losses(bank, table)(features, indexes, local_batch(features, indexes))
    logits = (features.double() @ memory.double().t()) / T
    targets = indexes.repeat(2)
    want = {'and': reference_and(logits, targets, anchors),
            'aug': reference_aug(logits, 0.1).item(), 'ue': reference_ue(logits, targets)}
    assert list(got) == ['and', 'aug', 'ue']
    for name, value in want.items():
        assert abs(got[name].item() - value) < 1e-4, name
    # The feature variant feeds the D-dimensional rows to the augmentation loss instead; a
    # step takes only the losses it is given.
    got = step_losses(bank, table, ('aug',), 'features')(features, indexes,
                                                        local_batch(features, indexes))
    assert list(got) == ['aug']
    assert abs(got['aug'].item() - reference_aug(features.double(), 0.1).item()) < 1e-4


def test_a_new_loss_is_one_function_and_one_entry(monkeypatch):
    """What the module's docstring promises: a function of the step's tensors, an entry."""
    def mean_logit(tensors):
        return tensors.logits.mean()
    monkeypatch.setitem(LOSSES, 'mean_logit', Loss(mean_logit, 'bank', 'mean logit'))
    features, memory, indexes = batch(5)
    bank = MemoryBank(D, N, T, 0.5)
    bank.memory.copy_(memory)
    table, _ = neighbour_table(indexes)
    got = step_losses(bank, table, ('and', 'mean_logit'))(features, indexes,
                                                        local_batch(features, indexes))
    assert abs(got['mean_logit'].item() - (features @ memory.t() / T).mean().item()) < 1e-6
    assert losses_module.active_losses({'bank': True, 'aug_loss': False, 'ue_loss': False}) \
        == ['and', 'mean_logit']


def test_losses_that_need_the_bank_are_refused_without_one():
    with pytest.raises(ValueError, match='need the memory bank'):
        StepLosses(None, None, ('and',))
    with pytest.raises(ValueError, match='unknown losses'):
        StepLosses(None, None, ('nothing',))
    StepLosses(None, None, ('aug',), aug_input='features')     # ISIF: no bank needed


def test_augmentation_loss_split_over_two_processes():
    """Each of 2 'ranks' takes half the images (both views) and the whole batch as keys: the
    mean of their losses, and its gradient, equal the single-process loss's."""
    g = torch.Generator().manual_seed(11)
    rows = torch.randn(2 * B, N, generator=g, dtype=torch.float64)
    whole = rows.clone().requires_grad_(True)
    want = augmentation_loss(whole, 0.1)
    want.backward()
    split = rows.clone().requires_grad_(True)
    half = B // 2
    losses = []
    for rank in range(2):
        positions = torch.cat([torch.arange(rank * half, (rank + 1) * half),
                               B + torch.arange(rank * half, (rank + 1) * half)])
        losses.append(augmentation_loss(split[positions], 0.1, keys=rows, positions=positions))
    got = sum(losses) / 2
    got.backward()
    assert abs(got.item() - want.item()) < 1e-12
    assert torch.allclose(split.grad, whole.grad, atol=1e-12)
