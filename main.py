"""Super-AND: train an embedding without labels, evaluate it by weighted kNN.

    python3 main.py --dataset cifar10 --network resnet18           # the released schedule
    python3 main.py --model_dir checkpoint/run --resume last.t7    # continue a stopped run
    python3 main.py --resume checkpoint/run --test_only            # kNN of its best epoch
    python3 main.py --resume ckpt_SAND.t7 --test_only              # kNN of a released file
    python3 main.py --init-from ckpt_SAND.t7 --model_dir checkpoint/more   # a new run from it
    python3 main.py --dataset folder --data-root photos/           # your own unlabeled images

(ckpt_SAND.t7: the authors' trained checkpoint, downloaded from the released project's page.)

This file is the story of a run. The algorithm is lib/core/ (docs/ALGORITHM.md); the options
are declared in lib/config.py; the rest of lib/ is the shell around the core: data, the fast
path, checkpoints, records, processes.
"""
import sys

from lib import cli
from lib.config import parse

if __name__ == '__main__':
    cli.parse_first(parse)          # flags answered before torch is imported (seconds)

import os  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from lib import build, console, resume, run_folder  # noqa: E402
from lib import checkpoint as ckpt  # noqa: E402
from lib.checkpoint_writer import CheckpointWriter  # noqa: E402
from lib.config import log_folder, resolve  # noqa: E402
from lib.core.schedules import Schedule, set_learning_rate  # noqa: E402
from lib.distributed import WorldError, close_world, init_world  # noqa: E402
from lib.engine import NonFiniteLoss, run_epoch  # noqa: E402
from lib.errors import UserError  # noqa: E402
from lib.fast_path import step_parts  # noqa: E402
from lib.method_state import MethodState  # noqa: E402
from lib.progress import progress_bar  # noqa: E402
from lib.run_log import RunLog, epoch_record  # noqa: E402
from lib.stopping import StopSignals, signal_handlers_kept, silent, write_line  # noqa: E402


def run(flags, world):
    """Train, or with --test_only evaluate. Everything the run holds (DistributedDataParallel's
    reducer holds the process group) is released when this returns, so the group closes last."""
    say = console.Console(world.main)
    # ---------------------------------------------------------------- configuration
    checkpoint = resume.open_checkpoint(flags, say, world)  # --resume/--init-from, else None
    config = resolve(flags, checkpoint and checkpoint.options, say,
                     checkpoint and checkpoint.model_dir)
    say.quiet = config.quiet
    settings = build.device_settings(config, world)
    say(console.method_line(config))
    if resume.nothing_to_train(config, checkpoint, say):
        return
    if config.resume and not config.test_only:
        resume.note_changed_arithmetic(checkpoint, settings, say)
        resume.note_changed_processes(checkpoint, config, world, say)
    # ---------------------------------------------------------------- the run's folder
    # Taken before the data is read: a busy or unwritable folder is refused in seconds.
    lock = run_folder.RunLock() if config.test_only else run_folder.take_model_dir(
        config.model_dir, world, say, log_folder(config) if config.tensorboard else None)
    try:
        # ------------------------------------------------------------ data
        data = build.run_data(config, settings, world, say)
        build.check_same_data(data, world)              # (on every node: the same images)
        # ------------------------------------------------------------ network, bank, anchors
        method = MethodState.build(config, len(data.train), settings.device)
        if checkpoint is not None:
            checkpoint.restore_method(method, data.train.fingerprint, say)
        if config.test_only:
            top1, top5 = build.evaluate(config, method, data, world)
            say(console.test_only_line(checkpoint, top1, top5))
            return
        run_folder.check_room(config.model_dir, method.checkpoint_bytes(), world)
        train(config, settings, world, method, data, checkpoint, say)
    finally:
        lock.release()


def train(config, settings, world, method, data, checkpoint, say):
    """The rounds and epochs of a run: from its start, from --init-from's weights, or from
    where its last.t7 stopped, in its folder (locked by `run`)."""
    started = time.time()
    # ---------------------------------------------------------------- records
    writer = CheckpointWriter()
    log = RunLog(config.model_dir, log_folder(config) if config.tensorboard else None,
                 enabled=world.main, after=writer.then)
    # ---------------------------------------------------------------- optimizer, resume
    optimizer = build.build_optimizer(config, method.net)
    progress = resume.start(config, checkpoint, optimizer, method, world, say,
                            evaluated=data.knn is not None)
    schedule = Schedule(config.epochs, config.schedule)
    epochs_run, (first_round, first_epoch) = 0, (progress.round, progress.epoch)
    try:
        # Signals are answered from here on, compiling included (a minute, on some machines).
        # (The stop line is written by the signal handler: write_line, which a print it
        # interrupts cannot collide with.)
        with StopSignals(write_line if world.main else silent, world.size) as stop:
            # -------------------------------------------------------- the fast path, checked
            parts, compiled = step_parts(config, settings, method, optimizer, world,
                                         data.pipeline, progress, build.loss_weights(
                                             config, schedule.ue_weight(progress.epoch)), say)
            if world.size == 1 and stop():      # while compiling: nothing trained or written
                # (several processes agree on a stop in the training loop, a few steps on)
                say(console.stopped_before_training_line(config, stop.name, progress))
                return
            log.start(config.record(data.mean, data.std), data.train.fingerprint,
                      settings.device, resumed_from=checkpoint.path if config.resume else None,
                      compile=compiled.record(), data=data.record())
            run = Run(config, world, method, data, optimizer, parts, writer, log, progress,
                      schedule, say, {**settings.arithmetic(), 'processes': world.size})
            console.announce(config, settings, world, schedule, data, log, compiled, say)
            # -------------------------------------------------------- the rounds and epochs
            for round_index in range(first_round, config.rounds):
                if resume.starts_round(config, progress, round_index, method):
                    record = build.anchor_discovery(method, round_index, data.labels, world)
                    say.progress(console.round_line(record))
                    log.round(record, entropy=method.anchors.entropy)
                for epoch in range(first_epoch if round_index == first_round else 0,
                                   config.epochs):
                    if not train_one_epoch(run, round_index, epoch, stop):
                        return                  # a stop signal: last.t7 continues from it
                    epochs_run += 1
                    if config.stop_after and epochs_run >= config.stop_after and \
                            (round_index, epoch) != (config.rounds - 1, config.epochs - 1):
                        say(console.stopped_after_line(config, epochs_run))
                        return
    except KeyboardInterrupt:       # a second Ctrl-C: out at once, saying what last.t7 holds
        writer.wait()
        raise KeyboardInterrupt(console.interrupted_line(config, progress)) from None
    except RuntimeError as err:     # another process died: one line, not the transport's wall
        lost = console.lost_loader_line if 'DataLoader worker' in str(err) else \
            console.lost_process_line if world.lost_peer(err) else None
        if lost is None:
            raise
        writer.wait()
        raise UserError(lost(config, progress, world)) from None
    finally:
        writer.wait()               # every checkpoint whole on disk before anything is said
        log.close()
    # ---------------------------------------------------------------- the end
    for line in console.end_lines(config, progress, log.jsonl_path):
        say(line)
    log.end(progress, time.time() - started)


@dataclass
class Run:
    """What the epochs of a run share."""
    config: object
    world: object
    method: MethodState
    data: build.RunData
    optimizer: object
    parts: object               # lib.engine.StepParts: the step as the fast path wrapped it
    writer: CheckpointWriter
    log: RunLog
    progress: ckpt.Progress
    schedule: Schedule
    say: console.Console
    trained_with: dict          # the pipeline and arithmetic `auto` chose: kept in checkpoints

    def save(self, is_best, position):
        """last.t7, continuing from `position`, and ckpt.t7 when `is_best` (rank 0 writes)."""
        if self.world.main:
            record = self.config.record(self.data.mean, self.data.std)
            record['trained_with'] = self.trained_with
            record['started_in'] = os.getcwd()      # (relative paths are relative to it)
            ckpt.write(self.writer, self.config.model_dir, self.method, self.optimizer,
                       self.progress, position, record, self.data.train.fingerprint, is_best)


def train_one_epoch(run, round_index, epoch, stop):
    """Train an epoch (from the step a stopped run left), evaluate, save and record it.
    Returns False when a stop signal ended it early: last.t7 then continues from that step."""
    config, progress, started = run.config, run.progress, time.time()
    lr, ue_weight = run.schedule.learning_rate(config.lr, epoch), run.schedule.ue_weight(epoch)
    set_learning_rate(run.optimizer, lr)
    first_step, sums = progress.step, progress.loss_sums
    progress.step, progress.loss_sums = 0, None
    batches = progress_bar(run.data.pipeline.train_batches(round_index, epoch, first_step),
                           total=run.data.pipeline.steps_per_epoch, initial=first_step,
                           desc=f'round {round_index} epoch {epoch}',
                           enabled=not config.quiet and run.world.main)
    try:
        result = run_epoch(run.parts, batches, build.loss_weights(config, ue_weight),
                           first_step, sums, stop)
    except NonFiniteLoss as bad:
        run.writer.wait()               # the message names the last.t7 on disk
        raise console.non_finite_loss(config, progress, round_index, epoch, bad.step) \
            from None
    if result.stopped:
        progress.round, progress.epoch = round_index, epoch
        run.save(False, dict(round=round_index, epoch=epoch, step=result.steps,
                             loss_sums=result.sums))
        run.log.stop(stop.name, round_index, epoch, result.steps,
                     console.continue_command(config.model_dir))
        run.writer.wait()
        run.say(console.stopped_line(config, stop.name, round_index, epoch, result.steps))
        return False
    accuracy = build.evaluate(config, run.method, run.data, run.world)
    is_best = progress.record(round_index, epoch, accuracy[0] if accuracy else None)
    run.save(is_best, ckpt.following(round_index, epoch, config.epochs))
    record = epoch_record(config, run.method, run.data, progress, round_index, epoch, lr,
                          ue_weight, result.losses, accuracy, run.world)
    record['seconds'] = time.time() - started
    run.log.steps(record['global_epoch'] * run.data.pipeline.steps_per_epoch, result.samples,
                  lr)
    run.log.epoch(record)
    run.say.progress(console.epoch_line(config, record))
    return True


def main(argv=None):
    try:
        flags = parse(argv)
    except SystemExit as exit_:        # -h, or a flag error already printed
        return exit_.code
    try:
        world = init_world(flags.typed.get('device', 'auto'))
    except WorldError as err:
        return cli.one_line_error(err, f'error (rank {os.environ.get("RANK", "?")})')
    label = 'error' if world.size == 1 else f'error (rank {world.rank})'
    with signal_handlers_kept():        # (a run that fails leaves its stop handlers: below)
        code = cli.run(lambda _: run(flags, world), error_label=label)
    close_world(world, clean=code == 0)
    return code


if __name__ == '__main__':
    sys.exit(main())
