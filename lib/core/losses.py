"""The three losses of one Super-AND step (docs/ALGORITHM.md section 5), as small functions,
and `LOSSES`, the table that names them.

Shapes: R rows = views x B (view-1 rows first, then view-2 rows of the same images in the
same order), N bank entries, K neighbours per anchor, M the width of the rows given to the
augmentation loss (N for the released bank-logit rows, D for the feature variant).
All three take float32 logits; callers keep the bank and the softmaxes out of bf16.

Adding a loss: write its function of a `StepTensors` and give it an entry in `LOSSES`, with the
component flag that switches it on (lib/core/recipes.py) and, unless it counts 1 throughout,
its weight schedule. The step, the epoch line, log.jsonl and the figures follow the table.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .constants import UE_SELF_LOGIT
from .schedules import Schedule


def and_loss(logits: torch.Tensor, targets: torch.Tensor,
             neighbours: torch.Tensor) -> torch.Tensor:
    """Anchor-neighbourhood loss (AND, Huang et al. 2019; Super-AND's L_AND; docs/ALGORITHM.md 5.1).

    logits: R x N bank logits; targets: R dataset indexes of each row's image;
    neighbours: R x K the image's neighbour indexes, -1 where it has none (non-anchors).
    Per row: -log P[y] for a non-anchor, -log(P[y] + sum_j P[n_j]) for an anchor, where
    P = softmax over the bank. Returns the mean over the R rows (the released sum / 2B), a
    0-d tensor. Written with logsumexp, which equals the released log(softmax) without its
    underflow.

    Raises:
        ValueError: shapes that do not fit together.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1] or \
            neighbours.dim() != 2 or neighbours.shape[0] != logits.shape[0]:
        raise ValueError(f'and_loss needs logits R x N, targets R and neighbours R x K; got '
                         f'{tuple(logits.shape)}, {tuple(targets.shape)}, '
                         f'{tuple(neighbours.shape)}')
    candidates = torch.cat((targets[:, None], neighbours.clamp(min=0)), dim=1)   # R x (1+K)
    keep = torch.cat((torch.ones_like(targets[:, None], dtype=torch.bool), neighbours >= 0), 1)
    picked = logits.gather(1, candidates).masked_fill(~keep, float('-inf'))
    return (torch.logsumexp(logits, 1) - torch.logsumexp(picked, 1)).mean()


def augmentation_loss(rows: torch.Tensor, temperature: float, negative_weight: float = 1.0,
                      keys: torch.Tensor = None, positions: torch.Tensor = None) -> torch.Tensor:
    """Augmentation-invariance loss: instance discrimination in the batch (ALGORITHM.md 5.2).

    The in-batch criterion of Ye et al. 2019 (ISIF), which Super-AND applies to the
    L2-normalised *bank-logit rows* (rows: R x N, as released) or, as an option, to the
    embeddings (rows: R x D). R = 2B, view-major; row i's positive is the other view of its
    image, row (i + B) mod 2B. With s_ij = exp(x_i . x_j / t) for j != i (s_ii = 0) and
    Z_i = sum_j s_ij:
        loss = -( sum_i log(s_ip / Z_i) + m * sum_i sum_{j != i, p} log(1 - s_ij / Z_i) ) / R.
    The second operand of every dot product is detached, so gradients reach x_i only, and the
    loss is a sum of per-row terms: a process holding only some rows of a batch split over
    several passes them as `rows` (r x M), the whole batch as `keys` (R x M, no gradient) and
    each row's place in it as `positions` (r); it gets the mean over its own rows, a 0-d
    tensor. `negative_weight` m is the released `batch_m` (1 by default, Z then unchanged).

    Raises:
        ValueError: an odd number of rows in the batch, or a temperature that is not above 0.
    """
    batch_rows = (rows if keys is None else keys).shape[0]
    if batch_rows % 2 or not temperature > 0:
        raise ValueError(f'augmentation_loss needs the two views of every image (an even '
                         f'number of rows, got {batch_rows}) and a temperature above 0 (got '
                         f'{temperature})')
    x = F.normalize(rows, dim=1)
    k = x.detach() if keys is None else F.normalize(keys.detach(), dim=1)
    n = k.shape[0]
    if positions is None:
        positions = torch.arange(x.shape[0], device=x.device)
    columns = torch.arange(n, device=x.device)
    is_self = positions[:, None] == columns                                       # r x R
    is_partner = ((positions + n // 2) % n)[:, None] == columns
    s = torch.exp(x @ k.t() / temperature).masked_fill(is_self, 0.0)              # r x R
    positive = (s * is_partner).sum(1)                                             # r
    z = s.sum(1)
    if negative_weight != 1.0:
        z = (z - positive) * negative_weight + positive
    # Zero the partner *before* the log, so its log1p(0) = 0 has a finite gradient.
    negatives = torch.log1p(-s.masked_fill(is_partner, 0.0) / z[:, None])         # r x R
    return -(torch.log(positive / z).sum() + negative_weight * negatives.sum()) / x.shape[0]


def ue_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Unification entropy (UE) loss (Super-AND's L_UE; docs/ALGORITHM.md 5.3).

    logits: R x N; targets: R. The row's own bank entry is set to -10 (it is excluded
    from the neighbourhood being made confident), then the entropy of the softmax over the
    bank is averaged over the rows (the released sum / 2B): a 0-d tensor, in nats.

    Raises:
        ValueError: shapes that do not fit together.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f'ue_loss needs logits R x N and targets R; got '
                         f'{tuple(logits.shape)}, {tuple(targets.shape)}')
    masked = logits.scatter(1, targets[:, None], UE_SELF_LOGIT)
    log_p = torch.log_softmax(masked, dim=1)
    return -(log_p.exp() * log_p).sum(1).mean()


# ----------------------------------------------------------------------------- the named losses
@dataclass
class StepTensors:
    """What the losses of one step read (docs/ALGORITHM.md 5). r = this process's rows."""
    features: torch.Tensor          # r x D embeddings, unit rows, view-major
    logits: torch.Tensor            # r x N bank logits f @ memory^T / T (None without a bank)
    targets: torch.Tensor           # r dataset indexes of each row's image
    neighbours: torch.Tensor        # r x K each row's image's neighbours (-1: none)
    batch_features: torch.Tensor    # R x D the global batch, detached (None: one process)
    batch_logits: torch.Tensor      # R x N its bank logits (None: one process or no bank)
    positions: torch.Tensor         # r: each row's place in the global batch (None)
    aug_input: str = 'logits'       # rows of the augmentation loss: 'logits' or 'features'
    batch_t: float = 0.1            # its temperature
    batch_m: float = 1.0            # the weight of its negative terms


def and_term(s: StepTensors) -> torch.Tensor:
    return and_loss(s.logits, s.targets, s.neighbours)


def aug_term(s: StepTensors) -> torch.Tensor:
    if s.aug_input == 'logits':                 # as released: the bank-similarity profiles
        rows, keys = s.logits, s.batch_logits
    else:
        rows, keys = s.features, s.batch_features
    return augmentation_loss(rows, s.batch_t, s.batch_m, keys, s.positions)


def ue_term(s: StepTensors) -> torch.Tensor:
    return ue_loss(s.logits, s.targets)


@dataclass(frozen=True)
class Loss:
    term: object            # StepTensors -> 0-d tensor
    switch: str             # the component (flag) that switches it on
    title: str              # how the console names it ('AND loss 7.94'; a weight: 'UE weight')
    weight: object = None   # (Schedule, epoch) -> its weight in that epoch; None: 1 throughout

    @property
    def scheduled(self) -> bool:
        """Whether its weight follows a schedule (else it weighs 1 throughout)."""
        return self.weight is not None

    def weight_at(self, schedule: Schedule, epoch: int) -> float:
        """Its weight in `epoch` of a round of `schedule`."""
        return self.weight(schedule, epoch) if self.scheduled else 1.0


# name (its key in log.jsonl and checkpoints): the loss. In the order the step computes them,
# which is also the order of the released total: AND + aug + w(epoch) * UE (ALGORITHM.md 5).
LOSSES = {
    'and': Loss(and_term, 'bank', 'AND loss'),
    'aug': Loss(aug_term, 'aug_loss', 'aug loss'),
    'ue': Loss(ue_term, 'ue_loss', 'UE loss', weight=Schedule.ue_weight),
}


def active_losses(components) -> list:
    """The names of the losses a run with these components (a dict or an object with the
    component attributes) takes, in LOSSES order."""
    get = components.get if isinstance(components, dict) else \
        (lambda name: getattr(components, name))
    return [name for name, loss in LOSSES.items() if get(loss.switch)]


def loss_weights(components, schedule: Schedule, epoch: int) -> dict:
    """{name: weight} in `epoch` of its round, for the losses these components take: what the
    step multiplies each loss by before summing them."""
    return {name: LOSSES[name].weight_at(schedule, epoch) for name in active_losses(components)}
