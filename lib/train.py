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
    aug_input: str = 'logits'      # its rows: 'logits' (bank profile, as released) or 'features'
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
    logits = bank.logits(features) if bank is not None else None                    # V*B x N
    if objective.bank_loss:
        parts[0] = and_loss(logits, targets, neighbour_table[targets])
    if objective.aug_loss:
        rows = logits if objective.aug_input == 'logits' else features
        parts[1] = augmentation_loss(rows, objective.batch_t, objective.batch_m)
    if objective.ue_loss:
        parts[2] = ue_loss(logits, targets)
    total = parts[0] + parts[1] + ue_weight * parts[2]
    return total, torch.stack(parts).detach()


class Trainer:
    """Holds what a step touches: network, bank, anchors, optimizer and the objective.

    On CUDA the network runs under bf16 autocast with channels_last activations, while the
    bank, the logits, their softmaxes and the losses stay float32 (`step_losses` runs outside
    the autocast region). With `compile_mode` the forward pass and the losses are one
    `torch.compile`d graph (its backward compiled with it); 'reduce-overhead' also captures
    them as CUDA graphs, which removes the per-kernel launch cost that makes the eager step
    launch-bound at batch 128 (SPEC 9).
    """

    def __init__(self, net, bank, anchors, optimizer, objective, precision='fp32',
                 channels_last=False, compile_mode='none'):
        self.net, self.bank, self.anchors = net, bank, anchors
        self.optimizer, self.objective = optimizer, objective
        device = next(net.parameters()).device
        self.device_type = device.type
        self.autocast = precision == 'bf16'
        self.channels_last = channels_last
        # A device tensor, so that changing the weight each epoch never recompiles the step.
        self.ue_weight = torch.zeros((), device=device)
        self.cuda_graphs = compile_mode == 'reduce-overhead' and device.type == 'cuda'
        self._forward = self._forward_and_losses
        if compile_mode != 'none':
            if self.cuda_graphs:
                # The bank and the neighbour table are read in place by the captured graph.
                for static in (bank.memory if bank is not None else None,
                               anchors.neighbour_table if anchors is not None else None):
                    if static is not None:
                        torch._dynamo.mark_static_address(static)
            self._forward = torch.compile(self._forward_and_losses, mode=compile_mode,
                                          dynamic=False)

    def set_ue_weight(self, weight):
        self.ue_weight.fill_(weight)

    def _forward_and_losses(self, views, indexes):
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.autocast):
            features = self.net(views)
        table = self.anchors.neighbour_table if self.anchors is not None else None
        total, parts = step_losses(features.float(), indexes, self.bank, table, self.objective,
                                   self.ue_weight)
        return total, parts, features.detach()

    def step(self, views, indexes):
        """One SGD step on V*B views of the B images `indexes`; returns the loss parts."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        if self.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        total, parts, features = self._forward(views, indexes)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        if self.bank is not None:
            self.bank.update(features, indexes)
        return parts

    def train_epoch(self, batches, ue_weight, sample_every=0):
        """Run the steps of `batches`. Returns the mean of each loss part (Python floats), the
        number of steps, and every `sample_every`-th step's parts as (step, [and, aug, ue]).

        Sums and samples stay on the device: the only host synchronisation is one read at the
        end of the epoch.
        """
        self.net.train()
        self.set_ue_weight(ue_weight)
        sums, steps, samples = None, 0, []
        for views, indexes in batches:
            parts = self.step(views, indexes)
            sums = parts if sums is None else sums + parts
            if sample_every and steps % sample_every == 0:
                samples.append((steps, parts.clone()))
            steps += 1
        if sums is None:
            return dict.fromkeys(LOSS_NAMES, 0.0), 0, []
        means = dict(zip(LOSS_NAMES, (sums / steps).tolist()))
        if samples:
            values = torch.stack([parts for _, parts in samples]).tolist()
            samples = [(step, dict(zip(LOSS_NAMES, v))) for (step, _), v in zip(samples, values)]
        return means, steps, samples
