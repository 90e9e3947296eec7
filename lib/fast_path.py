"""The fast path: the step's parts wrapped so that a GPU runs them fast, without changing what
lib/core/step.py computes (DDP, bf16 `Autocast` with channels_last, torch.compile of the network
and the losses, CUDA graphs under 'reduce-overhead'; the SGD step and bank update stay eager),
and its guards: before the first step the compiled step is checked against the eager one
(`agreement`) and falls back one level (MODES) on an error or a disagreement (README, 'The fast
path guards itself'). CUDA graphs' known failures are avoided: the training loop keeps copies of
a step's outputs (pytorch#148439, lib/engine.py); the losses mutate nothing (pytorch#183313);
every buffer the graphs use (bank, neighbour table, BatchNorm statistics) is allocated outside
them (pytorch#192748), and the UE weight is a Python number applied outside.
"""
import logging
import math
import time
from contextlib import closing
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from .core.losses import active_losses
from .core.step import StepLosses, step_gradients
from .distributed import sync_batchnorm
from .engine import StepParts

COMPILE = torch.compile             # what compiles (a test puts a faulty compiler here)
if not torch.cuda.is_available():   # (inductor's C++ backend logs that no CUDA runtime is found)
    logging.getLogger('torch.utils.cpp_extension').setLevel(logging.ERROR)
MODES = ('reduce-overhead', 'default', 'none')     # a fallback moves one to the right
CAPTURE_RUNS = 3        # compiled runs of the check with CUDA graphs: warm-up, record, replay
AFTER_FALLBACKS = 'after the fallbacks above'
NO_GRAPHS = ' (without CUDA there are no CUDA graphs to capture: the same as default)'
ONLY_LOSSES = "; only the losses: SyncBatchNorm breaks the network's graph at every layer"
DISABLED = 'TORCH_COMPILE_DISABLE=1 in the environment makes torch.compile return the code as it is'

# How far the compiled step may be from the eager one (both in the run's precision), from
# bench/compile_check.py's figures (README, 'The agreement check'): a wrong step moves far more.
LOSS_RTOL = 0.02
GRAD_COSINE_MIN = 0.95
GRAD_NORM_RTOL = 0.10


def first_line(err):
    """'TypeError: what it says' (its first line), with the exception a compiler's wrapper
    (BackendCompilerFailed: "backend='inductor' raised:") wraps."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = type(err).__name__ + (': ' + lines[0] if lines else '')
    inner = getattr(err, 'inner_exception', None)
    if inner is not None:
        return f'{text} {first_line(inner)}'
    return f'{text} {lines[1]}' if len(lines) > 1 and lines[0].endswith(':') else text


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


def step_losses_of(config, method):
    """The StepLosses of a run's configuration and method state."""
    return StepLosses(method.bank, method.anchors, active_losses(config), config.views,
                      config.aug_input, config.batch_t, config.batch_m)


class CallGuard:
    """The batched augmentation compiled (never captured as CUDA graphs: two calls a step would
    need two, and few launches are left after fusion), and eager for good from the first call
    that raises, that call included (it is pure); `fallback` is the line that says so."""

    def __init__(self, augment):
        self.compiled, self.eager, self.fallback = COMPILE(augment, dynamic=False), augment, None

    def __call__(self, *args):
        if not self.fallback:
            try:
                return self.compiled(*args)
            except Exception as err:    # compiling raises many types; each means "use eager"
                self.fallback = f'compiled augmentation fell back to eager: {first_line(err)}'
        return self.eager(*args)


def compile_augmentation(augment, mode):
    """What the gpu pipeline augments with under compile `mode` (lib/build.py)."""
    return augment if mode == 'none' or compile_disabled() else CallGuard(augment)


def compile_disabled():
    """Whether TORCH_COMPILE_DISABLE=1 (torch._dynamo.config.disable) switches compiling off."""
    import torch._dynamo        # (here: importing it takes a second)
    return bool(torch._dynamo.config.disable)


# ----------------------------------------------------------------------------- the check
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


# ----------------------------------------------------------------------------- the step's parts
@dataclass
class CompileReport:
    """Which compile mode a run trains with, and why: for its start-up line and log.jsonl."""
    asked: str                          # the mode settled from --compile
    used: str = None
    why: str = ''
    check: Agreement = None
    fallbacks: list = field(default_factory=list)
    checked: bool = True                # False: --compile-check off

    def fall_back(self, line, say):
        if line and line not in self.fallbacks:
            self.fallbacks.append(line)
            say(line)

    def line(self):
        text = f'compile: {self.used}' + (f' (asked for {self.asked})'
                                          if self.used != self.asked else '')
        text += f', {self.why}' if self.why else ''
        if self.check is not None:
            text += f'; the first step agrees with the eager step: {self.check.text()}'
        elif self.used != 'none' and not self.checked:
            text += '; not compared with the eager step (--compile-check off)'
        return text

    def record(self):
        check = asdict(self.check) if self.check is not None else None
        return dict(asked=self.asked, used=self.used, why=self.why, fallbacks=self.fallbacks,
                    check=check if self.checked else 'off')


def step_parts(config, settings, method, optimizer, world, pipeline=None, position=None,
               weights=None, say=print):
    """The StepParts a run trains with (DDP, autocast, channels_last; compiled as `settings`
    say) and their CompileReport. With the training `pipeline`, the `position` (a Progress) and
    that epoch's loss `weights`, each mode is first tried on the first step's batch and falls
    back one level on an error or a disagreement, with one line through `say`."""
    net = method.net
    if world.size > 1:
        net = sync_batchnorm(net, settings.cuda) if config.sync_bn else net
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[world.local_rank] if settings.cuda else None)
    if settings.precision == 'bf16' or settings.cuda:
        net = Autocast(net, bf16=settings.precision == 'bf16', channels_last=settings.cuda)
    losses = step_losses_of(config, method)
    eager = StepParts(net, losses, optimizer, world.gather_batch, False, world)
    report = CompileReport(settings.compile)
    if settings.compile == 'none' or compile_disabled():
        report.used = 'none'    # (settings without `compile_why`, a test's, were typed)
        report.why = getattr(settings, 'compile_why', 'as asked') \
            if settings.compile == 'none' else DISABLED
        return eager, report
    report.checked = config.compile_check == 'on'
    only_losses = world.size > 1 and config.sync_bn

    def first_batch():
        """The first step's batch (with no step left in its epoch, the epoch's first: the check
        applies nothing); drawing it runs the guarded augmentation, whose fallback is said."""
        step = position.step if position.step < pipeline.steps_per_epoch else 0
        with closing(pipeline.train_batches(position.round, position.epoch, step)) as batches:
            batch = next(batches, None)
        report.fall_back(getattr(getattr(pipeline, 'augment', None), 'fallback', None), say)
        return batch

    batch = first_batch() if pipeline is not None else None
    for mode in MODES[MODES.index(settings.compile):-1]:
        cuda_graphs = mode == 'reduce-overhead' and settings.cuda
        found, failed = None, []
        try:
            if cuda_graphs:
                for static in (getattr(method.bank, 'memory', None),
                               getattr(method.anchors, 'neighbour_table', None)):
                    if static is not None:
                        torch._dynamo.mark_static_address(static)
            parts = StepParts(net if only_losses else COMPILE(net, mode=mode, dynamic=False),
                              COMPILE(losses, mode=mode, dynamic=False), optimizer,
                              world.gather_batch, cuda_graphs, world)
            if batch is not None:
                found = agreement(eager, parts, batch, weights, list(method.net.buffers()),
                                  CAPTURE_RUNS if cuda_graphs else 1, compare=report.checked)
                failed = found.problems() if found is not None else []
        except Exception as err:        # compiling raises many types; each means "fall back"
            if getattr(err, 'stage', None) == 'eager':
                raise                   # the eager step failed: no compiler's error
            failed = [f'{getattr(err, "stage", "setup")}: {first_line(err)}']
        # Every process falls back alike (one left compiled would wait in the collectives).
        everyone = world.gather_objects(failed)
        failed = failed or next(([f'process {rank}: {reason}' for reason in reasons]
                                 for rank, reasons in enumerate(everyone) if reasons), [])
        if not failed:
            report.used, report.check = mode, found
            report.why = (settings.compile_why if mode == settings.compile else AFTER_FALLBACKS) \
                + (NO_GRAPHS if mode == 'reduce-overhead' and not settings.cuda else '') \
                + (ONLY_LOSSES if only_losses else '')
            return parts, report
        report.fall_back(f'compile {mode} fell back: ' + '; '.join(failed), say)
        torch._dynamo.reset()           # nothing of the failed mode is reused
        augment = getattr(pipeline, 'augment', None)
        if isinstance(augment, CallGuard) and not augment.fallback:
            batch = first_batch()       # the augmentation recompiles here, under its guard
    report.used, report.why = 'none', AFTER_FALLBACKS
    return eager, report
