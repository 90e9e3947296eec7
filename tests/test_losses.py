"""The three losses against float64 references written here from docs/ALGORITHM.md section 5."""
import math

import torch
import torch.nn.functional as F

from lib.losses import and_loss, augmentation_loss, ue_loss
from lib.memory_bank import MemoryBank
from lib.train import Objective, step_losses

B, N, D, K, T = 6, 40, 8, 2, 0.1


def batch(seed=0):
    """Unit features (2B x D, view-1 rows first), a unit bank (N x D), B distinct indexes."""
    g = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(2 * B, D, generator=g), dim=1)
    memory = F.normalize(torch.randn(N, D, generator=g), dim=1)
    indexes = torch.randperm(N, generator=g)[:B]
    return features, memory, indexes


def neighbour_table(indexes, seed=1):
    """Every other image of the batch is an anchor with K neighbours (never itself)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.full((N, K), -1, dtype=torch.long)
    anchors = {}
    for i in indexes[::2].tolist():
        others = [j for j in torch.randperm(N, generator=g).tolist() if j != i][:K]
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


def test_and_loss_mixes_anchors_and_instances():
    features, memory, indexes = batch()
    table, anchors = neighbour_table(indexes)
    logits = features @ memory.t() / T
    targets = indexes.repeat(2)
    got = and_loss(logits, targets, table[targets])
    assert abs(got.item() - reference_and(logits, targets, anchors)) < 1e-5
    # Without anchors it is the plain instance loss, which is different here.
    none = torch.full_like(table, -1)
    assert abs(and_loss(logits, targets, none[targets]).item()
               - reference_and(logits, targets, {})) < 1e-5
    assert abs(reference_and(logits, targets, {}) - got.item()) > 1e-3


def test_ue_loss_masks_own_entry():
    features, memory, indexes = batch(2)
    logits = features @ memory.t() / T
    targets = indexes.repeat(2)
    assert abs(ue_loss(logits, targets).item() - reference_ue(logits, targets)) < 1e-5


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


def test_step_losses_total_and_parts():
    features, memory, indexes = batch(4)
    table, anchors = neighbour_table(indexes)
    bank = MemoryBank(D, N, T, 0.5)
    bank.memory.copy_(memory)
    total, parts = step_losses(features, indexes, bank, table, Objective(), ue_weight=0.4)
    logits = (features.double() @ memory.double().t()) / T
    targets = indexes.repeat(2)
    want = [reference_and(logits, targets, anchors), reference_aug(logits, 0.1).item(),
            reference_ue(logits, targets)]
    assert torch.allclose(parts.double(), torch.tensor(want, dtype=torch.float64), atol=1e-4)
    assert abs(total.item() - (want[0] + want[1] + 0.4 * want[2])) < 1e-4
    # The feature variant feeds the 128-d rows to the augmentation loss instead.
    _, parts_f = step_losses(features, indexes, bank, table, Objective(aug_input='features'), 0.0)
    assert abs(parts_f[1].item() - reference_aug(features.double(), 0.1).item()) < 1e-4


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
