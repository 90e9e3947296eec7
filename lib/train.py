"""One training step and one epoch (docs/ALGORITHM.md sections 3, 5 and 6).

A step: the network embeds the V*B views, the losses are taken on the bank logits, SGD
steps, then the bank rows of the batch move towards the new embeddings. Loss values stay
on the device and are summed there; an epoch reads them back once, at its end.
"""
from dataclasses import dataclass

import torch

from .config import CHECK_EVERY
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


def step_losses(features, indexes, bank, neighbour_table, objective, ue_weight,
                batch_features=None, positions=None):
    """The step's total loss and its parts [AND, augmentation, UE] (a 3-vector, unweighted),
    each the mean over this process's rows.

    features: V*b x D (view-major) of this process's b images `indexes`; neighbour_table:
    N x K (-1 = none). When the global batch is split over processes, `batch_features`
    (V*B x D, detached) is the whole batch and `positions` (V*b) the global row of each local
    row: the augmentation loss compares every local row with the whole batch.
    """
    targets = indexes.repeat(objective.views)                                      # V*b
    zero = features.new_zeros(())
    parts = [zero, zero, zero]
    logits = bank.logits(features) if bank is not None else None                    # V*b x N
    if objective.bank_loss:
        parts[0] = and_loss(logits, targets, neighbour_table[targets])
    if objective.aug_loss:
        if objective.aug_input == 'logits':
            rows = logits
            keys = None if batch_features is None else bank.logits(batch_features)
        else:
            rows, keys = features, batch_features
        parts[1] = augmentation_loss(rows, objective.batch_t, objective.batch_m, keys, positions)
    if objective.ue_loss:
        parts[2] = ue_loss(logits, targets)
    total = parts[0] + parts[1] + ue_weight * parts[2]
    return total, torch.stack(parts).detach()


class NonFiniteLoss(Exception):
    """A step's loss was NaN or infinite; `step` is the first such step of the epoch."""

    def __init__(self, step):
        super().__init__(f'non-finite loss at step {step}')
        self.step = step


@dataclass
class EpochResult:
    losses: dict        # mean of each loss part over the epoch's steps (all ranks)
    steps: int          # steps done, counted from the epoch's start
    samples: list       # (step, {part: value}) every `sample_every` steps
    sums: list          # the summed parts, what a mid-epoch checkpoint keeps
    stopped: bool       # a stop was requested: the epoch ends early, at `steps`


class Trainer:
    """Holds what a step touches: network, bank, anchors, optimizer and the objective.

    On CUDA the network runs under bf16 autocast with channels_last activations, while the
    bank, the logits, their softmaxes and the losses stay float32 (`step_losses` runs outside
    the autocast region). With `compile_mode` the forward pass and the losses are one
    `torch.compile`d graph (its backward compiled with it); 'reduce-overhead' also captures
    them as CUDA graphs, which removes the per-kernel launch cost that makes the eager step
    launch-bound at batch 128 (docs/ALGORITHM.md section 9). With several processes (`world`),
    the embeddings and indexes of the step are all-gathered between the network and the losses.
    """

    def __init__(self, net, bank, anchors, optimizer, objective, precision='fp32',
                 channels_last=False, compile_mode='none', world=None):
        from .distributed import World
        self.net, self.bank, self.anchors = net, bank, anchors
        self.optimizer, self.objective = optimizer, objective
        self.world = world or World()
        device = next(net.parameters()).device
        self.device = device
        self.autocast = precision == 'bf16'
        self.channels_last = channels_last
        # A device tensor, so that changing the weight each epoch never recompiles the step.
        self.ue_weight = torch.zeros((), device=device)
        self.cuda_graphs = compile_mode == 'reduce-overhead' and device.type == 'cuda'
        # The compiled step functions, if any. Eager steps call the methods themselves: a bound
        # method stored on self is a reference cycle, which would keep the network (and DDP's
        # reducer, which holds the process group) alive after the run, until the cyclic
        # collector runs, possibly only at exit, after destroy_process_group.
        self._forward = self._embed = self._losses = None
        if compile_mode != 'none':
            if self.cuda_graphs:
                # The bank and the neighbour table are read in place by the captured graph.
                for static in (bank.memory if bank is not None else None,
                               anchors.neighbour_table if anchors is not None else None):
                    if static is not None:
                        torch._dynamo.mark_static_address(static)
            compiled = lambda fn: torch.compile(fn, mode=compile_mode, dynamic=False)  # noqa: E731
            if self.world.size == 1:
                self._forward = compiled(self._forward_and_losses)
            else:   # the all-gather sits between two graphs
                self._embed, self._losses = compiled(self._embed_views), compiled(self._step_losses)

    def set_ue_weight(self, weight):
        self.ue_weight.fill_(weight)

    def _embed_views(self, views):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.net(views).float()

    def _step_losses(self, features, indexes, batch_features=None, positions=None):
        table = self.anchors.neighbour_table if self.anchors is not None else None
        return step_losses(features, indexes, self.bank, table, self.objective, self.ue_weight,
                           batch_features, positions)

    def _forward_and_losses(self, views, indexes):
        features = self._embed_views(views)
        total, parts = self._step_losses(features, indexes)
        return total, parts, features.detach()

    def step(self, views, indexes):
        """One SGD step on the V*b views of this process's b images `indexes`; returns the
        loss parts. The bank rows of the whole global batch move."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        if self.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        if self.world.size == 1:
            total, parts, batch_features = (self._forward or self._forward_and_losses)(
                views, indexes)
            batch_indexes = indexes
        else:
            features = (self._embed or self._embed_views)(views)
            views_per_image = self.objective.views
            batch_features = self.world.gather_views(features.detach(), views_per_image)
            batch_indexes = self.world.gather(indexes)
            positions = self.world.global_rows(views_per_image, indexes.shape[0], self.device)
            total, parts = (self._losses or self._step_losses)(features, indexes, batch_features,
                                                               positions)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        if self.bank is not None:
            self.bank.update(batch_features, batch_indexes)
        return parts

    def train_epoch(self, batches, ue_weight, sample_every=0, first_step=0, sums=None,
                    stop_requested=lambda: False, check_every=CHECK_EVERY):
        """Run the steps of `batches` (the epoch from `first_step`, with the loss `sums` of
        the steps before it when resuming mid-epoch).

        Sums and samples stay on the device. Every `check_every` steps (and at the end) one
        small read checks for a non-finite loss (raising NonFiniteLoss with the first bad
        step) and, across ranks, for a stop request; a single process also honours a stop
        request at any step boundary, which costs no device read.
        """
        self.net.train()
        self.set_ue_weight(ue_weight)
        sums = torch.tensor(sums or [0.0, 0.0, 0.0], device=self.device)
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        step, samples, stopped = first_step, [], False
        for views, indexes in batches:
            parts = self.step(views, indexes)
            sums += parts
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(parts).all(), step,
                                    first_bad)
            if sample_every and step % sample_every == 0:
                samples.append((step, parts.clone()))
            step += 1
            local_stop = self.world.size == 1 and stop_requested()
            if local_stop or (step - first_step) % check_every == 0:
                if self._check(first_bad, stop_requested()):
                    stopped = True
                    break
        self._check(first_bad, False)
        sums = (self.world.sum(sums) / self.world.size).tolist()
        losses = dict(zip(LOSS_NAMES, (v / max(step, 1) for v in sums)))
        if samples:
            values = torch.stack([parts for _, parts in samples]).tolist()
            samples = [(s, dict(zip(LOSS_NAMES, v))) for (s, _), v in zip(samples, values)]
        return EpochResult(losses, step, samples, sums, stopped)

    def _check(self, first_bad, stop):
        """Raise NonFiniteLoss if any rank saw one; whether any rank asked to stop."""
        flags = torch.stack((first_bad.float(), torch.tensor(float(stop), device=self.device)))
        if self.world.size > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        bad, stop = flags.tolist()
        if bad >= 0:
            raise NonFiniteLoss(int(bad))
        return stop > 0
