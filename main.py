"""Super-AND: train an embedding without labels, evaluate it by weighted kNN.

    python3 main.py --dataset cifar10 --network resnet18           # the released schedule
    python3 main.py --model_dir checkpoint/run --resume last.t7    # continue a stopped run
    python3 main.py --resume checkpoint/run --test_only            # kNN of its best epoch
    python3 main.py --resume ckpt_SAND.t7 --test_only              # kNN of a released file
    python3 main.py --init-from ckpt_SAND.t7 --model_dir checkpoint/more   # a new run from it
    python3 main.py --dataset folder --data-root photos/           # your own unlabeled images

(ckpt_SAND.t7: the authors' trained checkpoint, downloaded from the released project's page.)

This file sets a run up: its options, checkpoint, folder, data, network, bank and anchors; then
lib/engine.py trains it (its rounds, epochs and steps, top to bottom). The algorithm is
lib/core/ (docs/ALGORITHM.md); the options are declared once in lib/config.py; the rest of lib/
is the shell around the core: data, the fast path, checkpoints, records, processes.
"""
from lib import cli
from lib.config import parse

if __name__ == '__main__':
    cli.parse_first(parse, 'stopped by Ctrl-C: nothing was trained or written')  # (before torch)

import os  # noqa: E402

from lib import build, console, resume, run_folder  # noqa: E402
from lib.config import log_folder, resolve  # noqa: E402
from lib.distributed import WorldError, close_world, init_world  # noqa: E402
from lib.engine import train  # noqa: E402
from lib.method_state import MethodState  # noqa: E402
from lib.stopping import signal_handlers_kept, stopped_at_once  # noqa: E402


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
    # Taken before the data is read: a busy or unwritable folder, or one holding another run,
    # is refused in seconds.
    lock = run_folder.RunLock() if config.test_only else run_folder.take_model_dir(
        config.model_dir, world, say, log_folder(config) if config.tensorboard else None,
        refuse=lambda: resume.refuse_another_run(config, checkpoint))
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
    # (a run that fails leaves its stop handlers: put back below)
    with signal_handlers_kept(), stopped_at_once():
        code = cli.run(lambda _: run(flags, world), error_label=label)
    close_world(world, clean=code == 0)
    return code


if __name__ == '__main__':
    cli.exit_program(main())
