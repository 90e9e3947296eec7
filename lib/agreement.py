"""The first-step check of the fast path (lib/fast_path.py): the compiled step against the
eager one, on the first step's batch and from the same state, applying neither; and how far
apart they may be. An error is raised with the stage it happened in.
"""
import math
import time
from dataclasses import dataclass

import torch

from .core.step import step_gradients

CAPTURE_RUNS = 3        # compiled runs of the check with CUDA graphs: warm-up, record, replay

# How far the compiled step may be from the eager one (both in the run's precision), from
# bench/compile_check.py's figures (README, 'The agreement check'): a wrong step moves far more.
LOSS_RTOL = 0.02
GRAD_COSINE_MIN = 0.95
GRAD_NORM_RTOL = 0.10


@dataclass
class Agreement:
    """The compiled step against the eager one, on one batch and state."""
    losses: dict            # {name: (eager, compiled)}
    grad_cosine: float      # of the two gradients, all trained weights together
    grad_norm_ratio: float  # |compiled gradient| / |eager gradient|
    seconds: float          # the eager run and the compiled runs, compilation included

    def problems(self):
        """What is beyond the tolerances, in words; nothing when the eager step is not finite
        (no compiler's fault: the training loop's first step stops the run)."""
        if not all(math.isfinite(eager) for eager, _ in self.losses.values()):
            return []
        found = [f'{name} loss {eager:.6g} eager, {compiled:.6g} compiled'
                 for name, (eager, compiled) in self.losses.items()
                 if not abs(compiled - eager) <= LOSS_RTOL * max(abs(eager), 1e-3)]
        if not (self.grad_cosine >= GRAD_COSINE_MIN
                and abs(self.grad_norm_ratio - 1) <= GRAD_NORM_RTOL):
            found.append(f'gradients at cosine {self.grad_cosine:.6f} with norm ratio '
                         f'{self.grad_norm_ratio:.4f} (compiled / eager)')
        return found

    def text(self):
        losses = ', '.join(f'{name} {eager:.5g} / {compiled:.5g}'
                           for name, (eager, compiled) in self.losses.items())
        return (f'losses eager / compiled: {losses}; gradients cosine {self.grad_cosine:.6f}, '
                f'norm ratio {self.grad_norm_ratio:.4f} ({self.seconds:.1f} s)')


def agreement(eager, compiled, batch, weights, buffers, runs=CAPTURE_RUNS, compare=True):
    """The Agreement of the `compiled` StepParts' last of `runs` runs with the `eager` ones'
    (None without `compare`: no eager run) on `batch` = (views, indexes), each run from the same
    state (`buffers` and gradients restored; no SGD step or bank update). An error is raised
    with its `stage`: 'eager', 'compile and first run' or 'capture'."""
    params = [p for group in eager.optimizer.param_groups for p in group['params']]
    saved = [b.detach().clone() for b in buffers]
    stages = [(eager, 'eager')] * compare + [(compiled, 'compile and first run')] + \
        [(compiled, 'capture')] * (runs - 1)
    started, results = time.time(), []
    for parts, stage in stages:
        try:
            if parts.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            losses, _ = step_gradients(parts.net, parts.step_losses, parts.optimizer, *batch,
                                       weights, parts.gather)
            results.append(({name: float(loss.detach()) for name, loss in losses.items()},
                            torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p))
                                       .reshape(-1).double() for p in params])))
        except Exception as err:
            err.stage = stage
            raise
        finally:
            with torch.no_grad():
                for buffer, value in zip(buffers, saved):
                    buffer.copy_(value)
            eager.optimizer.zero_grad(set_to_none=True)
    if not compare:
        return None
    (eager_losses, eager_grad), (compiled_losses, compiled_grad) = results[0], results[-1]
    norm, compiled_norm = float(eager_grad.norm()), float(compiled_grad.norm())
    cosine = float(eager_grad @ compiled_grad) / (norm * compiled_norm) \
        if norm > 0 and compiled_norm > 0 else float('nan')
    return Agreement({name: (eager_losses[name], compiled_losses[name]) for name in eager_losses},
                     cosine, compiled_norm / norm if norm > 0 else float('nan'),
                     time.time() - started)
