"""The fast path: the step's parts wrapped so that a GPU runs them fast, without changing what
lib/core/step.py computes (DDP, bf16 `Autocast` with channels_last, torch.compile of the network
and the losses, CUDA graphs under 'reduce-overhead'; the SGD step and bank update stay eager),
and its guards: before the first step the compiled step is checked against the eager one
(lib/agreement.py) and falls back one level (MODES) on an error or a disagreement (README, 'The fast
path guards itself'). CUDA graphs' known failures are avoided: the training loop keeps copies of
a step's outputs (pytorch#148439, lib/engine.py); the losses mutate nothing (pytorch#183313);
every buffer the graphs use (bank, neighbour table, BatchNorm statistics) is allocated outside
them (pytorch#192748), and the loss weights are Python numbers applied outside.
"""
import logging
from contextlib import closing
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from .agreement import CAPTURE_RUNS, Agreement, agreement
from .core.losses import active_losses
from .core.step import StepLosses, local_batch
from .distributed import sync_batchnorm

COMPILE = torch.compile             # what compiles (a test puts a faulty compiler here)
if not torch.cuda.is_available():   # (inductor's C++ backend logs that no CUDA runtime is found)
    logging.getLogger('torch.utils.cpp_extension').setLevel(logging.ERROR)
MODES = ('reduce-overhead', 'default', 'none')     # a fallback moves one to the right
AFTER_FALLBACKS = 'after the fallbacks above'
NO_GRAPHS = ' (without CUDA there are no CUDA graphs to capture: the same as default)'
ONLY_LOSSES = "; only the losses: SyncBatchNorm breaks the network's graph at every layer"
DISABLED = 'TORCH_COMPILE_DISABLE=1 in the environment makes torch.compile return the code as it is'


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


# ----------------------------------------------------------------------------- the step's parts
@dataclass
class StepParts:
    """What a step touches, as `step_parts` built and wrapped it: the network (autocast,
    channels_last, DDP, compile), the step's losses (compile), the optimizer, and how the
    global batch is gathered (one process: its own rows; nothing distributed on the path)."""
    net: torch.nn.Module
    step_losses: torch.nn.Module
    optimizer: torch.optim.Optimizer
    gather: object = local_batch
    cuda_graphs: bool = False       # each step starts a new CUDA-graph generation
    world: object = None            # lib.distributed.World; None: one process


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
    several = world if world.size > 1 else None
    gather = world.gather_batch if several else local_batch
    eager = StepParts(net, losses, optimizer, gather, False, several)
    report = CompileReport(settings.compile)
    if settings.compile == 'none' or compile_disabled():
        report.used = 'none'
        report.why = settings.compile_why if settings.compile == 'none' else DISABLED
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
                              gather, cuda_graphs, several)
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
