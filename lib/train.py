"""One training step and one epoch (SPEC sections 3, 5 and 6).

A step: the network embeds the V*B views, the losses are taken on the bank logits, SGD
steps, then the bank rows of the batch move towards the new embeddings. Loss values stay
on the device and are summed there; an epoch reads them back once, at its end.
"""
from dataclasses import dataclass

import torch

from .losses import and_loss, augmentation_loss, ue_loss

LOSS_NAMES = ('and', 'aug', 'ue')


@dataclass
class Objective:
    """Which losses a step takes, and on what (the released Super-AND by default)."""
    views: int = 2                 # augmented views per image per step
    bank_loss: bool = True         # AND loss through the memory bank (instance loss in round 0)
    aug_loss: bool = True          # in-batch augmentation-invariance loss (needs views == 2)
    aug_input: str = 'logits'      # its rows: 'logits' (bank-similarity profile, as released) or 'features'
    ue_loss: bool = True           # unification entropy loss, weighted by the UE schedule
    batch_t: float = 0.1           # temperature of the augmentation loss
    batch_m: float = 1.0           # weight of its negative terms


def step_losses(features, indexes, bank, neighbour_table, objective, ue_weight):
    """The step's total loss and its parts [AND, augmentation, UE] (a 3-vector, unweighted).

    features: V*B x D (view-major); indexes: B; neighbour_table: N x K (-1 = none).
    """
    targets = indexes.repeat(objective.views)                                      # V*B
    zero = features.new_zeros(())
    parts = [zero, zero, zero]
    logits = bank.logits(features.float()) if bank is not None else None            # V*B x N
    if objective.bank_loss:
        parts[0] = and_loss(logits, targets, neighbour_table[targets])
    if objective.aug_loss:
        rows = logits if objective.aug_input == 'logits' else features.float()
        parts[1] = augmentation_loss(rows, objective.batch_t, objective.batch_m)
    if objective.ue_loss:
        parts[2] = ue_loss(logits, targets)
    total = parts[0] + parts[1] + ue_weight * parts[2]
    return total, torch.stack(parts).detach()


class Trainer:
    """Holds what a step touches: network, bank, anchors, optimizer and the objective."""

    def __init__(self, net, bank, anchors, optimizer, objective):
        self.net, self.bank, self.anchors = net, bank, anchors
        self.optimizer, self.objective = optimizer, objective

    def step(self, views, indexes, ue_weight):
        features = self.net(views)
        table = self.anchors.neighbour_table if self.anchors is not None else None
        total, parts = step_losses(features, indexes, self.bank, table, self.objective, ue_weight)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        if self.bank is not None:
            self.bank.update(features, indexes)
        return parts

    def train_epoch(self, batches, ue_weight):
        """Run the steps of `batches`; returns the mean of each loss part as Python floats."""
        self.net.train()
        sums, steps = None, 0
        for views, indexes in batches:
            parts = self.step(views, indexes, ue_weight)
            sums = parts if sums is None else sums + parts
            steps += 1
        means = (sums / max(steps, 1)).tolist() if sums is not None else [0.0, 0.0, 0.0]
        return dict(zip(LOSS_NAMES, means)), steps
