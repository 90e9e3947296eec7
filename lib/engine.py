"""The loop of a run, read top to bottom: `train` (its rounds and epochs) -> `train_one_epoch`
(an epoch, evaluated, saved and recorded) -> `run_epoch` (its steps) -> lib.core.step.train_step,
with what a long run needs around the algorithm: checkpoints, records, stop signals, a
non-finite loss, a lost process.

Loss values stay on the device and are summed there, by name; an epoch reads them back once,
at its end. Every CHECK_EVERY steps on a GPU (every step on the CPU, where a step is slow) one
small read catches a non-finite loss (NonFiniteLoss, with the first bad step) and, across
processes, a stop request, also at the epoch's end; a single process also honours a stop
request at any step boundary, which costs no device read. Every SAMPLE_EVERY steps the
losses are kept for TensorBoard.
"""
import os
import time
from dataclasses import dataclass

import torch

from . import build, console, resume
from . import checkpoint as ckpt
from .checkpoint_writer import CheckpointWriter
from .config import log_folder
from .core.knn import exact_float32
from .core.losses import loss_weights
from .core.schedules import Schedule, set_learning_rate
from .core.step import train_step
from .errors import UserError
from .fast_path import step_parts
from .method_state import MethodState
from .progress import progress_bar
from .run_log import RunLog, epoch_record
from .stopping import StopSignals, silent, write_line

CHECK_EVERY = 20        # steps between the reads that catch a NaN loss or (across processes) a
                        # stop request: one small device sync, not one per step
SAMPLE_EVERY = 50       # steps between sampled loss records (TensorBoard)


def train(config, settings, world, method, data, checkpoint, say):
    """The rounds and epochs of a run: from its start, from --init-from's weights, or from
    where its last.t7 stopped, in its folder (locked by `run`)."""
    started = time.time()
    # ---------------------------------------------------------------- records
    # (a file that cannot be written: what last.t7 on disk holds then, and how to continue)
    writer = CheckpointWriter(lambda: console.held_text(
        config, resume.progress_on_disk(config.model_dir) or ckpt.Progress()))
    log = RunLog(config.model_dir, log_folder(config) if config.tensorboard else None,
                 enabled=world.main, after=writer.then)
    # ---------------------------------------------------------------- optimizer, resume
    optimizer = build.build_optimizer(config, method.net)
    progress = resume.start(config, checkpoint, optimizer, method, world, say,
                            evaluated=data.knn is not None)
    schedule = Schedule(config.epochs, config.schedule)
    epochs_run, (first_round, first_epoch) = 0, (progress.round, progress.epoch)
    # Signals are answered from here to the end, compiling included (a minute, on some
    # machines), and the last checkpoint's writing. (The stop line is written by the signal
    # handler: write_line, which a print it interrupts cannot collide with.)
    with StopSignals(write_line if world.main else silent, world.size) as stop:
        try:
            with exact_float32(settings.device, settings.precision):     # fp32: no TF32
                # -------------------------------------------------------- the fast path, checked
                parts, compiled = step_parts(config, settings, method, optimizer, world,
                                             data.pipeline, progress,
                                             loss_weights(config, schedule, progress.epoch), say)
                if world.size == 1 and stop():      # while compiling: nothing trained or written
                    # (several processes agree on a stop in the training loop, a few steps on)
                    say(console.stopped_before_training_line(config, stop.name, progress))
                    return
                log.start(config.record(data.mean, data.std), data.train.fingerprint,
                          settings.device, resumed_from=checkpoint.path if config.resume else None,
                          compile=compiled.record(), data=data.record())
                run = Run(config, world, method, data, optimizer, parts, writer, log, progress,
                          schedule, say, {**settings.arithmetic(), 'processes': world.size},
                          lowered_lr(config, checkpoint, first_round, first_epoch))
                console.announce(config, settings, world, schedule, data, log, compiled, say)
                # -------------------------------------------------------- the rounds and epochs
                for round_index in range(first_round, config.rounds):
                    if resume.starts_round(config, progress, round_index, method):
                        record = build.anchor_discovery(method, round_index, data.labels, world)
                        say.progress(console.round_line(record))
                        log.round(record, entropy=method.anchors.entropy)
                    for epoch in range(first_epoch if round_index == first_round else 0,
                                       config.epochs):
                        final = (round_index, epoch) == (config.rounds - 1, config.epochs - 1)
                        stopping_after = bool(config.stop_after) and not final and \
                            epochs_run + 1 >= config.stop_after
                        if not train_one_epoch(run, round_index, epoch, stop,
                                               final or stopping_after):
                            return                  # a stop signal: last.t7 continues from it
                        epochs_run += 1
                        if stopping_after:
                            say(console.stopped_after_line(config, epochs_run))
                            return
        except KeyboardInterrupt:       # a second Ctrl-C: out at once, saying what last.t7 holds
            stop.closing = True         # (an error on its way to its line: no stop line now)
            writer.wait()
            raise KeyboardInterrupt(console.interrupted_line(
                config, held_progress(config, progress, world))) from None
        except RuntimeError as err:     # another process died: one line, not the transport's wall
            stop.closing = True
            lost = console.lost_loader_line if 'DataLoader worker' in str(err) else \
                console.lost_process_line if world.lost_peer(err) else None
            if lost is None:
                raise
            writer.wait()
            raise UserError(lost(config, held_progress(config, progress, world), world)) \
                from None
        except BaseException:
            stop.closing = True
            raise
        finally:
            stop.finishing = True       # (a signal now: the run ends once this is written)
            writer.wait()               # every checkpoint whole on disk before anything is said
            log.close()
        # ---------------------------------------------------------------- the end
        for line in console.end_lines(config, progress, log.jsonl_path):
            say(line)
        log.end(progress, time.time() - started)


@dataclass
class Run:
    """What the epochs of a run share."""
    config: object              # lib.config.RunConfig
    world: object               # lib.distributed.World
    method: MethodState
    data: object                # lib.build.RunData
    optimizer: torch.optim.Optimizer
    parts: object               # lib.fast_path.StepParts: the step as wrapped
    writer: CheckpointWriter
    log: RunLog
    progress: object            # lib.checkpoint.Progress
    schedule: Schedule
    say: object                 # lib.console.Console
    trained_with: dict          # the pipeline and arithmetic `auto` chose: kept in checkpoints
    lowered_lr: tuple           # (round, epoch, the run's lr): continued with a lower --lr

    def save(self, is_best, position):
        """last.t7, continuing from `position`, and ckpt.t7 when `is_best` (rank 0 writes)."""
        if self.world.main:
            record = self.config.record(self.data.mean, self.data.std)
            record['trained_with'] = self.trained_with
            record['started_in'] = os.getcwd()      # (relative paths are relative to it)
            ckpt.write(self.writer, self.config.model_dir, self.method, self.optimizer,
                       self.progress, position, record, self.data.train.fingerprint, is_best)


def train_one_epoch(run, round_index, epoch, stop, ends_run=False):
    """Train an epoch (from the step a stopped run left), evaluate, save and record it.
    Returns False when a stop signal ended it early: last.t7 then continues from that step.
    `ends_run`: no epoch follows (the last, or --stop-after's): a signal after its steps is
    told that the run ends once its checkpoint is written, not that it stops at a next step."""
    config, progress, started = run.config, run.progress, time.time()
    lr, weights = run.schedule.learning_rate(config.lr, epoch), \
        loss_weights(config, run.schedule, epoch)
    set_learning_rate(run.optimizer, lr)
    first_step, sums = progress.step, progress.loss_sums
    progress.step, progress.loss_sums = 0, None
    batches = progress_bar(run.data.pipeline.train_batches(round_index, epoch, first_step),
                           total=run.data.pipeline.steps_per_epoch, initial=first_step,
                           desc=f'round {round_index} epoch {epoch}',
                           enabled=not config.quiet and run.world.main)
    try:
        result = run_epoch(run.parts, batches, weights, first_step, sums, stop)
        if not run.method.finite(run.world):    # never saved, evaluated or called the best
            raise NonFiniteLoss(None)
    except NonFiniteLoss as bad:
        run.writer.wait()               # the message names the last.t7 on disk
        retried = run.lowered_lr is not None and run.lowered_lr[:2] == (round_index, epoch)
        raise console.non_finite_loss(config, progress, round_index, epoch, bad.step,
                                      run.lowered_lr[2] if retried else None) from None
    stop.finishing = ends_run and not result.stopped
    if result.stopped:
        progress.round, progress.epoch = round_index, epoch
        run.save(False, dict(round=round_index, epoch=epoch, step=result.steps,
                             loss_sums=result.sums))
        run.log.stop(stop.name, round_index, epoch, result.steps,
                     console.continue_command(config))
        run.writer.wait()
        run.say(console.stopped_line(config, stop.name, round_index, epoch, result.steps))
        return False
    accuracy = build.evaluate(config, run.method, run.data, run.world)
    is_best = progress.record(round_index, epoch, accuracy[0] if accuracy else None)
    run.save(is_best, ckpt.following(round_index, epoch, config.epochs))
    record = epoch_record(config, run.method, run.data, progress, round_index, epoch, lr,
                          weights, result.losses, accuracy, run.world)
    record['seconds'] = time.time() - started
    run.log.steps(record['global_epoch'] * run.data.pipeline.steps_per_epoch, result.samples,
                  lr)
    run.log.epoch(record)
    run.say.progress(console.epoch_line(config, record))
    return True


def held_progress(config, progress, world):
    """Where the last.t7 that the lines of a stopped run name continues from: this process's
    own record on rank 0, which writes it; on the others, the file on their disk, read now
    (None: there is none on this machine; rank 0 may have died before writing any)."""
    return progress if world.main else resume.progress_on_disk(config.model_dir)


def lowered_lr(config, checkpoint, round_index, epoch):
    """(round, epoch, the run's lr) where this --resume continues the run at `round_index`
    `epoch` with a lower --lr than its checkpoint's (what a non-finite loss suggests), else
    None."""
    if not config.resume or checkpoint is None:
        return None
    before = checkpoint.config.get('lr')
    return (round_index, epoch, before) if before and config.lr < before else None


class NonFiniteLoss(Exception):
    """A step's loss was NaN or infinite; `step` is the first such step of the epoch (None:
    the losses were finite, the weights, statistics or bank are not)."""

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


def run_epoch(parts, batches, weights: dict, first_step=0, sums=None,
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
