"""An epoch of training: lib.core.step.train_step over the epoch's batches, with what a long
run needs around it and the algorithm does not.

Loss values stay on the device and are summed there, by name; an epoch reads them back once,
at its end. Every CHECK_EVERY steps on a GPU (every step on the CPU, where a step is slow) one
small read catches a non-finite loss (NonFiniteLoss, with the first bad step) and, across
processes, a stop request, also at the epoch's end; a single process also honours a stop
request at any step boundary, which costs no device read. Every SAMPLE_EVERY steps the
losses are kept for TensorBoard.
"""
from dataclasses import dataclass

import torch

from .core.step import local_batch, train_step

CHECK_EVERY = 20        # steps between the reads that catch a NaN loss or (across processes) a
                        # stop request: one small device sync, not one per step
SAMPLE_EVERY = 50       # steps between sampled loss records (TensorBoard)


@dataclass
class StepParts:
    """What a step touches, as the shell built and wrapped it (lib/build.py, lib/fast_path.py):
    the network (autocast, channels_last, DDP, compile), the step's losses (compile), the
    optimizer, and how the global batch is gathered."""
    net: torch.nn.Module
    step_losses: torch.nn.Module
    optimizer: torch.optim.Optimizer
    gather: object = local_batch
    cuda_graphs: bool = False       # each step starts a new CUDA-graph generation
    world: object = None            # lib.distributed.World; None: one process


class NonFiniteLoss(Exception):
    """A step's loss was NaN or infinite; `step` is the first such step of the epoch."""

    def __init__(self, step):
        super().__init__(f'non-finite loss at step {step}')
        self.step = step


@dataclass
class EpochResult:
    losses: dict        # {name: mean over the epoch's steps (all processes)}
    steps: int          # steps done, counted from the epoch's start
    samples: list       # (step, {name: value}) every SAMPLE_EVERY steps
    sums: dict          # {name: summed value}: what a mid-epoch last.t7 keeps
    stopped: bool       # a stop was requested: the epoch ends early, at `steps`


def run_epoch(parts: StepParts, batches, weights: dict, first_step=0, sums=None,
              stop_requested=lambda: False, sample_every=SAMPLE_EVERY,
              check_every=CHECK_EVERY) -> EpochResult:
    """Run train_step over `batches` (the epoch from `first_step`, with the loss `sums` of the
    steps before it when resuming mid-epoch: {name: value}).

    weights: {loss name: weight} of this epoch, for the losses the run takes. Raises
    NonFiniteLoss (after the check that found it) when any process met a NaN or infinite loss.
    """
    parts.net.train()
    names = list(weights)
    device = next(parts.net.parameters()).device
    world_size = parts.world.size if parts.world is not None else 1
    totals = torch.tensor([float((sums or {}).get(name, 0.0)) for name in names], device=device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    step, stopped, kept = first_step, False, []
    # Across processes a stop is agreed in a collective: every CHECK_EVERY steps on a GPU (a
    # device read each), at every step on the CPU (where a step takes far longer than one).
    if device.type != 'cuda':
        check_every = 1
    for views, indexes in batches:
        if parts.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        losses = train_step(parts.net, parts.step_losses, parts.optimizer, views, indexes,
                            weights, parts.gather)
        values = torch.stack([losses[name].detach() for name in names])
        totals += values
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(values).all(), step,
                                first_bad)
        if sample_every and step % sample_every == 0:
            kept.append((step, values.clone()))
        step += 1
        local_stop = world_size == 1 and stop_requested()
        if local_stop or (step - first_step) % check_every == 0:
            if _check(first_bad, stop_requested(), parts.world):
                stopped = True
                break
    if not stopped and _check(first_bad, stop_requested(), parts.world):
        stopped = True              # (asked for after the last check: stops at the epoch's end)
    if parts.world is not None:
        totals = parts.world.sum(totals) / world_size
    summed = dict(zip(names, totals.tolist()))
    samples = []
    if kept:
        values = torch.stack([v for _, v in kept]).tolist()
        samples = [(s, dict(zip(names, v))) for (s, _), v in zip(kept, values)]
    return EpochResult({name: value / max(step, 1) for name, value in summed.items()}, step,
                       samples, summed, stopped)


def _check(first_bad, stop, world):
    """Raise NonFiniteLoss if any process saw one; whether any process asked to stop."""
    flags = torch.stack((first_bad.float(), torch.tensor(float(stop), device=first_bad.device)))
    if world is not None and world.size > 1:
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    bad, stop = flags.tolist()
    if bad >= 0:
        raise NonFiniteLoss(int(bad))
    return stop > 0
