"""Per-epoch schedules inside a round (docs/ALGORITHM.md section 6): the learning rate and
the UE-loss weight. `epoch` counts from 0 in each round; both reset at every round's start.

The released run has 200-epoch rounds and absolute milestones: lr x0.1 at epochs 120 and 160,
UE weight 0.2 * (epoch // 80). `scaled` (the default) puts the same milestones at the same
fractions of the round (0.4, 0.6, 0.8 of --epochs), so a short round still has its UE loss
and its lr steps; at 200 epochs it is exactly the released schedule. `released` keeps the
absolute epochs, whatever the round length.
"""
import math
from dataclasses import dataclass

from .constants import (LR_DECAY_EVERY, LR_DECAY_FACTOR, LR_DECAY_START, LR_STEP_FRACTIONS,
                        UE_STEP_FRACTIONS, UE_WEIGHT_EVERY, UE_WEIGHT_STEP)

SCHEDULES = ('scaled', 'released')


def milestone(fraction: float, epochs: int) -> int:
    """The epoch at `fraction` of a round of `epochs`: floor(fraction * epochs + 0.5), so
    0.4, 0.6, 0.8 of 200 are exactly 80, 120, 160."""
    return math.floor(fraction * epochs + 0.5)


@dataclass(frozen=True)
class Schedule:
    """The lr and UE weight of every epoch of a round of `epochs` epochs."""
    epochs: int
    kind: str = 'scaled'

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f'schedule {self.kind!r} is not one of {SCHEDULES}')

    @property
    def lr_steps(self) -> list:
        """Epochs (inside the round) from which the lr is multiplied by 0.1 once more."""
        if self.kind == 'released':
            return [e for e in range(LR_DECAY_START + LR_DECAY_EVERY, self.epochs,
                                     LR_DECAY_EVERY)]
        return [milestone(f, self.epochs) for f in LR_STEP_FRACTIONS]

    @property
    def ue_steps(self) -> list:
        """Epochs (inside the round) from which the UE weight grows by 0.2."""
        if self.kind == 'released':
            return list(range(UE_WEIGHT_EVERY, self.epochs, UE_WEIGHT_EVERY))
        return [milestone(f, self.epochs) for f in UE_STEP_FRACTIONS]

    def learning_rate(self, base_lr: float, epoch: int) -> float:
        """base_lr, times 0.1 for every lr step reached (released: 0.03 to epoch 119, 0.003
        for 120-159, 0.0003 from 160)."""
        return base_lr * LR_DECAY_FACTOR ** sum(epoch >= step for step in self.lr_steps)

    def ue_weight(self, epoch: int) -> float:
        """0.2 per UE step reached (released: 0.2 * (epoch // 80))."""
        return UE_WEIGHT_STEP * sum(epoch >= step for step in self.ue_steps)


def set_learning_rate(optimizer, lr: float) -> None:
    """Every parameter group of `optimizer` at learning rate `lr`."""
    for group in optimizer.param_groups:
        group['lr'] = lr
