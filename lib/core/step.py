"""One Super-AND training step (Han et al. 2020; docs/ALGORITHM.md sections 3, 5 and 6).

`train_step` is the whole step, top to bottom: embed the views, the bank logits and the named
losses (`StepLosses`), their weighted sum and backward (`step_gradients`), then the SGD step and
the memory-bank update.
One process in float32 is the plain case. What makes it fast or distributed wraps its parts
from outside without changing it: bf16 autocast and channels_last wrap `net`, torch.compile and
CUDA graphs wrap `net` and `step_losses` (lib/fast_path.py), DistributedDataParallel wraps
`net`, and several processes pass `gather` (lib/distributed.py), which all-gathers the step's
embeddings so that the augmentation loss sees the global batch and every process moves the
same bank rows.
"""
from typing import NamedTuple

import torch
import torch.nn as nn

from .losses import LOSSES, StepTensors


class Batch(NamedTuple):
    """The global batch of a step (a NamedTuple: torch.compile passes it through graphs)."""
    features: torch.Tensor              # V*B x D embeddings, detached, view-major
    indexes: torch.Tensor               # B dataset indexes
    positions: torch.Tensor = None      # V*b: the global row of each of this process's rows
                                        # (None: one process, whose rows are the batch)


def local_batch(features: torch.Tensor, indexes: torch.Tensor) -> Batch:
    """The global batch of a single process: its own rows."""
    return Batch(features.detach(), indexes)


class StepLosses(nn.Module):
    """The named losses of a step, taken on the memory bank's logits (docs/ALGORITHM.md 5).

    bank: the MemoryBank (None for a method without one); anchors: its ANsDiscovery (or None);
    losses: the names to take, keys of lib.core.losses.LOSSES; views: V augmented views per
    image; aug_input, batch_t, batch_m: the augmentation loss's rows, temperature and weight of
    its negative terms.

    Raises:
        ValueError: an unknown loss name, or a loss that needs the bank without one.
    """

    def __init__(self, bank, anchors, losses, views=2, aug_input='logits', batch_t=0.1,
                 batch_m=1.0):
        super().__init__()
        unknown = [name for name in losses if name not in LOSSES]
        if unknown:
            raise ValueError(f'StepLosses: unknown losses {unknown}; known: {list(LOSSES)}')
        if bank is None and any(name != 'aug' or aug_input == 'logits' for name in losses):
            raise ValueError(f'StepLosses: the losses {list(losses)} (aug on {aug_input}) need '
                             f'the memory bank')
        self.bank, self.anchors = bank, anchors
        self.losses, self.views = tuple(losses), views
        self.aug_input, self.batch_t, self.batch_m = aug_input, batch_t, batch_m

    def forward(self, features: torch.Tensor, indexes: torch.Tensor, batch: Batch) -> dict:
        """features: V*b x D float32 unit rows of this process's b images `indexes`, view-major;
        batch: the global batch. Returns {name: 0-d float32 tensor}, each the mean over this
        process's rows, unweighted."""
        targets = indexes.repeat(self.views)                           # V*b: each row's image
        bank = self.bank
        logits = bank.logits(features) if bank is not None else None    # V*b x N
        several = batch.positions is not None                           # several processes
        tensors = StepTensors(
            features=features, logits=logits, targets=targets,
            neighbours=(self.anchors.neighbour_table[targets] if self.anchors is not None
                        else None),
            batch_features=batch.features if several else None,
            batch_logits=(bank.logits(batch.features) if several and bank is not None
                          and self.aug_input == 'logits' else None),
            positions=batch.positions, aug_input=self.aug_input, batch_t=self.batch_t,
            batch_m=self.batch_m)
        return {name: LOSSES[name].term(tensors) for name in self.losses}


def train_step(net, step_losses, optimizer, views: torch.Tensor, indexes: torch.Tensor,
               weights: dict, gather=local_batch) -> dict:
    """One SGD step on the V*b views of this process's b images `indexes`.

    net: images -> unit embeddings (V*b x 3 x H x W normalised -> V*b x D float32);
    step_losses: a StepLosses (or its compiled form); optimizer: SGD over net's trained
    weights; weights: {loss name: weight} for this epoch (the UE weight follows the schedule);
    gather: (features, indexes) -> the global Batch. Returns the named losses, unweighted, as
    0-d tensors on the device (read back by the caller once an epoch, not here).
    """
    losses, batch = step_gradients(net, step_losses, optimizer, views, indexes, weights, gather)
    optimizer.step()                                           # SGD (Nesterov, weight decay)
    if step_losses.bank is not None:                           # the batch's bank rows move
        step_losses.bank.update(batch.features, batch.indexes)
    return losses


def step_gradients(net, step_losses, optimizer, views: torch.Tensor, indexes: torch.Tensor,
                   weights: dict, gather=local_batch):
    """The step up to its gradients, nothing applied (train_step's arguments): returns the
    named losses and the global Batch, with the weighted sum's gradients in the weights'
    `.grad`: what a check that must not apply the step compares."""
    features = net(views)                                      # embed the views: V*b x D
    batch = gather(features, indexes)                          # the global batch
    losses = step_losses(features, indexes, batch)             # bank logits, the named losses
    total = sum(weights[name] * loss for name, loss in losses.items())
    optimizer.zero_grad(set_to_none=True)
    total.backward()                                           # gradients reach `features`
    return losses, batch
