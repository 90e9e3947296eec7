"""The fast path: the step's parts wrapped so that a GPU runs them fast, without changing what
lib/core/step.py computes; and the guards that keep a run alive when that wrapping fails.

- The network runs under bf16 autocast with channels_last activations (`Autocast`); its
  embeddings come out float32, so the bank, the logits, their softmaxes and the losses stay
  float32 (`--precision fp32`: the released arithmetic).
- With several processes it is wrapped in DistributedDataParallel, BatchNorm optionally over the
  global batch (--sync-bn), and the step all-gathers its embeddings (World.gather_batch).
- `torch.compile` wraps the network and the step's losses: 'reduce-overhead' also captures them
  as CUDA graphs, which removes the per-kernel launch cost that makes the eager step
  launch-bound at batch 128 (docs/ALGORITHM.md section 9). The backward is compiled with them;
  the optimizer step and the bank update stay eager. With several processes and --sync-bn only
  the losses are compiled: SyncBatchNorm's collectives break the network's graph at every
  layer.

The guards (`step_parts`): before the first step of a run (and of every resume) the compiled
step runs on that step's batch, next to the eager step, from the same state, without applying
either (`agreement`): with CUDA graphs CAPTURE_RUNS times, so that compilation (torch.compile
compiles at the first call), the first run and the graphs' capture all happen there. An error in
any of them, or losses or gradients that disagree with the eager step's beyond the tolerances
below, fall back one level (reduce-overhead, default, none), each with one line; the compiled
augmentation falls back to eager on an error of any call (`CallGuard`). An error of the eager
step itself is no compiler's: it is raised as it is. The step itself is then applied once, by
the training loop.

Known ways CUDA graphs fail, and why this code avoids them:
- reading an output of one replay after the next replay overwrote it (pytorch#148439): the
  training loop uses a step's outputs (losses, embeddings) within that step and keeps copies
  (lib/engine.py);
- a tensor mutated inside the graph that the pool does not track as an output
  (pytorch#183313): the compiled losses mutate nothing; the network mutates only its BatchNorm
  buffers, which are module state allocated outside the graph;
- a buffer first allocated inside the compiled region and then passed back in and mutated, a
  segmentation fault that no `try` catches (pytorch#192748): every buffer the graphs read or
  mutate (the bank, the neighbour table, BatchNorm's statistics) is allocated outside them, and
  the UE weight is a Python number applied outside the graphs.
"""
import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .core.losses import active_losses
from .core.step import StepLosses, step_gradients
from .engine import StepParts

COMPILE = torch.compile             # what compiles (a test puts a faulty compiler here)
if not torch.cuda.is_available():
    # Inductor's C++ backend imports cpp_extension, which then logs that no CUDA runtime is
    # found, between the start-up lines: on a machine without CUDA that is no news.
    logging.getLogger('torch.utils.cpp_extension').setLevel(logging.ERROR)
MODES = ('reduce-overhead', 'default', 'none')     # a fallback moves one to the right
CAPTURE_RUNS = 3                    # compiled runs in the check with CUDA graphs: the trees
                                    # run a new function once to warm up, record it on the
                                    # 2nd, replay from the 3rd (without them one run compiles)

# How far the compiled step may be from the eager one on the same batch and state. Both run in
# the run's precision (bf16 against bf16). Measured on the CPU (bench/compile_check.py, AlexNet,
# 16 images x 2 views, PyTorch 2.14.1), the compiled step against the eager one:
#   float32: losses 1e-6 relative, gradient cosine 1 - 3e-7, norm 7e-6;
#   bf16:    losses 6e-4 relative, gradient cosine 1 - 5e-3, norm 6e-4;
# and two eager runs of one step, contiguous against channels_last memory (on a GPU cuDNN's
# choice of algorithm varies like this): gradient cosine 1 - 5e-5; eager bf16 against eager
# float32: losses 2e-3, gradient cosine 1 - 3e-2. So: losses within 2% (30x bf16's distance),
# the gradient's direction within cosine 0.95 (10x) and its size within 10% (150x). A wrong
# step (a scaled or lost term, a missing mask, a sign) moves a loss or the gradient far more.
LOSS_RTOL = 0.02
GRAD_COSINE_MIN = 0.95
GRAD_NORM_RTOL = 0.10


def first_line(err):
    """'TypeError: what it says' (its first line): how a fallback names an exception. The
    compiler's wrappers (BackendCompilerFailed: "backend='inductor' raised:") are named with
    the exception they wrap, which says what went wrong."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = type(err).__name__ + (': ' + lines[0] if lines else '')
    inner = getattr(err, 'inner_exception', None)
    if inner is not None:
        return f'{text} {first_line(inner)}'
    if len(lines) > 1 and lines[0].endswith(':'):
        return f'{text} {lines[1]}'
    return text


class Autocast(nn.Module):
    """`net` under bf16 autocast (`bf16`) with channels_last input (`channels_last`): views
    V x 3 x H x W -> V x D float32 embeddings."""

    def __init__(self, net, bf16=True, channels_last=True):
        super().__init__()
        self.net, self.bf16, self.channels_last = net, bf16, channels_last

    def forward(self, views):
        if self.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        with torch.autocast(views.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.net(views).float()


def distribute(config, net, world):
    """DistributedDataParallel over the world's processes (--sync-bn: BatchNorm statistics of
    the global batch); the network itself for a single process."""
    if world.size == 1:
        return net
    from .distributed import sync_batchnorm
    cuda = next(net.parameters()).device.type == 'cuda'
    if config.sync_bn:
        net = sync_batchnorm(net, cuda)
    return torch.nn.parallel.DistributedDataParallel(
        net, device_ids=[world.local_rank] if cuda else None)


def step_losses_of(config, method):
    """The StepLosses of a run's configuration and method state."""
    return StepLosses(method.bank, method.anchors, active_losses(config), config.views,
                      config.aug_input, config.batch_t, config.batch_m)


class CallGuard:
    """`compiled`, with `eager` taking its place for good when a call raises (the compile, a
    recompile, or a run failed): that call's inputs then go through `eager`. For pure functions
    only (the augmentation): running one twice must not change anything. `fallback` is the line
    that says so (None while nothing fell back)."""

    def __init__(self, compiled, eager, what):
        self.compiled, self.eager, self.what = compiled, eager, what
        self.fallback = None

    def __call__(self, *args, **kwargs):
        if self.fallback:
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as err:    # compiling raises many types; each means "use eager"
            self.fallback = f'compiled {self.what} fell back to eager: {first_line(err)}'
            return self.eager(*args, **kwargs)


def compile_augmentation(augment, mode):
    """The batched augmentation, compiled (`mode` other than 'none') behind a CallGuard.
    Never CUDA-graph captured, even under reduce-overhead: two calls per step would need two
    graphs, and the launches left after fusion are few."""
    if mode == 'none' or compile_disabled():
        return augment
    return CallGuard(COMPILE(augment, dynamic=False), augment, 'augmentation')


# ----------------------------------------------------------------------------- the check
@dataclass
class Agreement:
    """The compiled step against the eager one, on one batch and state."""
    losses: dict            # {name: (eager, compiled)}
    grad_cosine: float      # of the two gradients, all trained weights together
    grad_norm_ratio: float  # |compiled gradient| / |eager gradient|
    seconds: float          # the eager run and the compiled runs, compilation included

    def problems(self):
        """What is beyond the tolerances, in words (empty when they agree). Nothing when the
        eager step itself is not finite: that is no compiler's fault, and the training loop's
        first step stops the run with its own message."""
        eager_values = [eager for eager, _ in self.losses.values()]
        if not all(math.isfinite(value) for value in eager_values):
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

    def record(self):
        return dict(losses={name: list(pair) for name, pair in self.losses.items()},
                    grad_cosine=self.grad_cosine, grad_norm_ratio=self.grad_norm_ratio,
                    seconds=self.seconds)


def _forward_backward(parts, views, indexes, weights, params):
    """One step's losses ({name: float}) and gradient (all of `params`, flat, in float64 for
    the comparison), without the SGD step or the bank update: the training step's own code
    (lib/core/step.py step_gradients)."""
    if parts.cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()
    losses, _ = step_gradients(parts.net, parts.step_losses, parts.optimizer, views, indexes,
                               weights, parts.gather)
    gradient = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          .double() for p in params])
    return {name: float(loss.detach()) for name, loss in losses.items()}, gradient


def agreement(eager, compiled, batch, weights, buffers, runs=CAPTURE_RUNS, compare=True):
    """Run the `compiled` StepParts `runs` times (and with `compare` the `eager` ones once) on
    `batch` = (views, indexes), each from the same state: the network's `buffers` (BatchNorm's
    statistics, which a training forward updates) are restored after every run and the
    gradients cleared, and neither the SGD step nor the bank update is applied. Returns the
    Agreement of the last compiled run with the eager run (None without `compare`); raises what
    the runs raise, with a `stage` attribute: 'eager' (the eager step: no compiler's error),
    'compile and first run' or 'capture' (the later compiled runs)."""
    views, indexes = batch
    params = [p for group in eager.optimizer.param_groups for p in group['params']]
    saved = [b.detach().clone() for b in buffers]

    def restore():
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)
        eager.optimizer.zero_grad(set_to_none=True)

    started = time.time()
    try:
        if compare:
            try:
                eager_losses, eager_grad = _forward_backward(eager, views, indexes, weights,
                                                             params)
            except Exception as err:
                err.stage = 'eager'
                raise
            restore()
        for run in range(runs):
            try:
                compiled_losses, compiled_grad = _forward_backward(compiled, views, indexes,
                                                                   weights, params)
            except Exception as err:
                err.stage = 'compile and first run' if run == 0 else 'capture'
                raise
            restore()
    finally:
        restore()
    if not compare:
        return None
    norm, compiled_norm = float(eager_grad.norm()), float(compiled_grad.norm())
    cosine = float(eager_grad @ compiled_grad) / (norm * compiled_norm) \
        if norm > 0 and compiled_norm > 0 else float('nan')
    return Agreement({name: (eager_losses[name], compiled_losses[name]) for name in eager_losses},
                     cosine, compiled_norm / norm if norm > 0 else float('nan'),
                     time.time() - started)


# ----------------------------------------------------------------------------- the step's parts
@dataclass
class CompileReport:
    """Which compile mode a run trains with, and why: for its start-up line and log.jsonl."""
    asked: str                          # the mode --compile gave (auto resolved)
    used: str = None
    why: str = ''
    check: Agreement = None
    fallbacks: list = field(default_factory=list)
    checked: bool = True                # False: --compile-check off

    def line(self):
        text = f'compile: {self.used}'
        if self.used != self.asked:
            text += f' (asked for {self.asked})'
        text += f', {self.why}' if self.why else ''
        if self.check is not None:
            text += f'; the first step agrees with the eager step: {self.check.text()}'
        elif self.used != 'none' and not self.checked:
            text += '; not compared with the eager step (--compile-check off)'
        return text

    def record(self):
        check = self.check.record() if self.check is not None else None
        return dict(asked=self.asked, used=self.used, why=self.why, fallbacks=self.fallbacks,
                    check=check if self.checked else 'off')


def compile_disabled():
    """Whether torch.compile is switched off for this process (TORCH_COMPILE_DISABLE=1, read
    by PyTorch into torch._dynamo.config.disable): it then returns what it is given."""
    try:
        import torch._dynamo
        return bool(torch._dynamo.config.disable)
    except (ImportError, AttributeError):
        return os.environ.get('TORCH_COMPILE_DISABLE') == '1'


def step_parts(config, settings, method, optimizer, world, pipeline=None, position=None,
               weights=None, say=print):
    """The StepParts a run trains with, and their CompileReport: `method`'s network wrapped
    for the device (DDP with several processes, autocast, channels_last) and, as
    `settings.compile` asks, compiled with the step's losses. With the training `pipeline`,
    the `position` where training starts (round, epoch, step: a Progress) and the loss
    `weights` of that epoch, each compile mode is first tried on that step's batch
    (`agreement`; unless --compile-check off, also compared with the eager step) and falls
    back one level on an error or a disagreement, saying so in one line through `say`."""
    net = distribute(config, method.net, world)
    if settings.precision == 'bf16' or settings.cuda:
        net = Autocast(net, bf16=settings.precision == 'bf16', channels_last=settings.cuda)
    losses = step_losses_of(config, method)
    eager = StepParts(net, losses, optimizer, world.gather_batch, False, world)
    report = CompileReport(settings.compile)
    if settings.compile == 'none':
        report.used, report.why = 'none', ('as asked' if config.compile == 'none'
                                           else 'the default on the CPU')
        return eager, report
    if compile_disabled():
        report.used, report.why = 'none', ('TORCH_COMPILE_DISABLE=1 in the environment makes '
                                           'torch.compile return the code as it is')
        return eager, report
    only_losses = world.size > 1 and config.sync_bn
    buffers = list(method.net.buffers())
    report.checked = check = config.compile_check == 'on'

    def first_batch():
        """The batch of the first step to train (drawing it runs the compiled augmentation,
        under its guard, whose fallback is said here); a resume at the end of an epoch, with
        no step left, checks on the epoch's first batch: the check applies nothing."""
        for step in (position.step, 0):
            batches = pipeline.train_batches(position.round, position.epoch, step)
            batch = next(batches, None)
            batches.close()
            if batch is not None:
                break
        fallback = getattr(getattr(pipeline, 'augment', None), 'fallback', None)
        if fallback and fallback not in report.fallbacks:
            report.fallbacks.append(fallback)
            say(fallback)
        return batch

    batch = first_batch() if pipeline is not None else None
    for mode in MODES[MODES.index(settings.compile):-1]:
        cuda_graphs = mode == 'reduce-overhead' and settings.cuda
        stage = 'setup'
        try:
            if cuda_graphs:
                for static in (method.bank.memory if method.bank is not None else None,
                               method.anchors.neighbour_table if method.anchors is not None
                               else None):
                    if static is not None:
                        torch._dynamo.mark_static_address(static)
            parts = StepParts(net if only_losses else COMPILE(net, mode=mode, dynamic=False),
                              COMPILE(losses, mode=mode, dynamic=False), optimizer,
                              world.gather_batch, cuda_graphs, world)
            failed, found = None, None
            if batch is not None:
                stage = 'compile and first run'
                found = agreement(eager, parts, batch, weights, buffers,
                                  CAPTURE_RUNS if cuda_graphs else 1, compare=check)
                failed = found.problems() if found is not None else []
        except Exception as err:        # compiling raises many types; each means "fall back"
            if getattr(err, 'stage', None) == 'eager':
                raise                   # the eager step failed: no compiler's error
            failed = [f'{getattr(err, "stage", stage)}: {first_line(err)}']
        if world.size > 1:
            # Every process falls back alike, on the reasons of the first that failed. (A
            # compile error met by some processes only would leave the others waiting in the
            # step's collectives; compile errors follow from the code and the shapes, which
            # every process shares.)
            everyone = [None] * world.size
            torch.distributed.all_gather_object(everyone, failed)
            if not failed:
                failed = next(([f'process {rank}: {reason}' for reason in reasons]
                               for rank, reasons in enumerate(everyone) if reasons), [])
        if not failed:
            report.used, report.check = mode, found
            report.why = why_mode(config, settings, mode, only_losses)
            return parts, report
        line = f'compile {mode} fell back: ' + '; '.join(failed)
        report.fallbacks.append(line)
        say(line)
        torch._dynamo.reset()          # nothing of the failed mode is reused
        augment = getattr(pipeline, 'augment', None)
        if isinstance(augment, CallGuard) and not augment.fallback:
            batch = first_batch()      # the augmentation recompiles here, under its guard
    report.used, report.why = 'none', 'after the fallbacks above'
    return eager, report


def why_mode(config, settings, mode, only_losses):
    """Why a run trains with `mode`, in a few words."""
    if mode != settings.compile:
        why = 'after the fallbacks above'
    elif config.compile == 'auto':
        why = 'the default on CUDA'
    else:
        why = 'as asked'
    if mode == 'reduce-overhead' and not settings.cuda:
        why += ' (without CUDA there are no CUDA graphs to capture: the same as default)'
    if only_losses:
        why += '; only the losses: SyncBatchNorm breaks the network\'s graph at every layer'
    return why
