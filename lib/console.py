"""What a run says on the console: each line it prints, composed here, and the commands it
suggests. The records of a run are log.jsonl (lib/run_log.py); nothing reads these lines back.

Every command the program suggests is whole and quoted, names the run's folder or the
checkpoint's whole path, and works as printed from the folder it was run in.
"""
import os
import shlex
import shutil
import sys

import datasets

from .cli import plural
from .config import DEFAULTS, MACHINE, typed_words
from .core.losses import LOSSES, active_losses
from .cpu_estimate import cpu_hours_estimate
from .errors import UserError
from .run_folder import BEST, LAST


class Console:
    """Prints a run's lines: on the main process only; `progress` lines (rounds, epochs) not
    under --quiet (set `quiet` once the run's options are known)."""

    def __init__(self, enabled=True, quiet=False):
        self.enabled, self.quiet = enabled, quiet

    def __call__(self, text):
        if self.enabled:
            try:
                print(text, flush=True)
            except OSError:         # a terminal that hung up: the record is log.jsonl
                self.enabled = False

    def progress(self, text):
        if not self.quiet:
            self(text)


# ----------------------------------------------------------------------------- commands
PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quote(word):
    """`word` (a str) quoted for a POSIX shell, as shlex.quote does; where it holds bytes that
    are not valid UTF-8 (escaped as lone surrogates, PEP 383) or a control character, in bash's
    $'...' form, with those as \\xNN: printed, such a name stays one line of ASCII that the
    shell turns back into the very bytes (shlex.quote would print '\\xe9', four characters)."""
    if word.isprintable():          # (a lone surrogate is not)
        return shlex.quote(word)
    escaped = [('\\' + c if c in '\\\'' else c) if c.isprintable()
               else ''.join(f'\\x{byte:02x}' for byte in os.fsencode(c))   # (the very bytes)
               for c in word]
    return "$'" + ''.join(escaped) + "'"


def join(words):
    """The command of `words`, each quote()d: shlex.join for names of any bytes."""
    return ' '.join(quote(str(word)) for word in words)


def project_file(*parts):
    """A file of the project as a command typed in the current folder names it: relative
    (`main.py` in the project, `../sand/main.py` next to it), else its whole path."""
    path = os.path.join(PROJECT, *parts)
    relative = os.path.relpath(path)
    return path if relative.startswith(os.path.join(os.pardir, os.pardir)) else relative


def python():
    """How a command names this interpreter: python3 where that finds this very one on PATH,
    else its whole path. The same file is not enough: a venv's python3 is a link to the
    system's, which runs without the venv's packages; the venv is the link's folder."""
    found, folder = shutil.which('python3'), os.path.dirname(sys.executable)
    same = found is not None and os.path.samefile(found, sys.executable) and \
        os.path.realpath(os.path.dirname(found)) == os.path.realpath(folder)
    return 'python3' if same else quote(sys.executable)


def torchrun():
    """How a command names PyTorch's launcher: torchrun where the one on PATH is in this
    interpreter's folder (its venv's), else python() -m torch.distributed.run (a venv not
    activated has no torchrun on PATH)."""
    found = shutil.which('torchrun')
    if found is not None and os.path.realpath(os.path.dirname(found)) == \
            os.path.realpath(os.path.dirname(sys.executable)):
        return 'torchrun'
    return f'{python()} -m torch.distributed.run'


def launcher(processes=None):
    """How main.py is started: python(), or torchrun (or tools/launch.py) with the options
    this run was started with ('torchrun --nproc_per_node 2'); `processes` asks for a launcher
    of that many processes on this machine instead."""
    if processes is not None:
        return python() if processes == 1 else f'{torchrun()} --nproc_per_node {processes}'
    if 'TORCHELASTIC_RUN_ID' not in os.environ:
        return python()
    found = torchrun_options()
    if found is None:
        processes = quote(os.environ.get('LOCAL_WORLD_SIZE', '1'))
        return f'{torchrun()} --nproc_per_node {processes}'
    program, options = found
    return ' '.join([program, join(options)]) if options else program


def torchrun_options():
    """(the launcher as typed here: 'torchrun', or 'python3 tools/launch.py' by a path that
    works from the current folder; the options it was given, up to the script), read from
    the launcher's command line (this process's parent, on Linux); None when unknown."""
    try:
        with open(f'/proc/{os.getppid()}/cmdline', 'rb') as f:
            words = [os.fsdecode(w) for w in f.read().split(b'\0') if w]
    except OSError:
        return None
    script = os.path.abspath(sys.argv[0])
    ours = os.path.join(PROJECT, 'tools', 'launch.py')
    for start, word in enumerate(words):
        if os.path.basename(word) == 'torchrun' or word == 'torch.distributed.run':
            program = torchrun()
        elif os.path.abspath(word) == ours:
            program = f'{python()} {quote(project_file("tools", "launch.py"))}'
        else:
            continue
        for end in range(start + 1, len(words)):
            if os.path.abspath(words[end]) == script:
                return program, words[start + 1:end]
    return None


def command(*argv, processes=None):
    """The main.py command of `argv`, as it works typed in the current folder, with this
    run's launcher (or one of `processes`)."""
    return (f'{launcher(processes)} {quote(project_file("main.py"))} '
            + join(argv))


def tool_command(name, *argv):
    """The command of tools/<name>.py with `argv`, as it works typed in the current folder:
    `-m tools.<name>` in the project folder, the script's path elsewhere."""
    program = (f'-m tools.{name}' if os.path.abspath(os.getcwd()) == PROJECT
               else quote(project_file('tools', name + '.py')))
    return f'{python()} {program} ' + join(argv)


def continue_command(config, *more, processes=None):
    """The command that continues the run of `config` from its last.t7, repeating what was
    typed of this machine (--cache-dir, --workers: no checkpoint keeps them)."""
    return command('--model_dir', config.model_dir, '--resume', LAST,
                   *typed_words(config.argv, MACHINE), *more, processes=processes)


def retyped(argv, changes):
    """The command as the user typed it (`argv`), with the options of `changes` ({'--rounds':
    '3'}) given these values instead (however they were typed): what an error suggests."""
    changed = {flag[2:].replace('-', '_') for flag in changes}
    kept = typed_words(argv, set(DEFAULTS) - changed)
    for flag, value in changes.items():
        kept += [flag, value]
    return command(*kept)


def unused_folder(model_dir):
    """`model_dir` with the first -2, -3, ... that names nothing yet: a new run's folder."""
    base = os.path.normpath(model_dir)
    number = 2
    while os.path.exists(f'{base}-{number}'):
        number += 1
    return f'{base}-{number}'


# ----------------------------------------------------------------------------- start-up
def method_line(config):
    """One line naming the method and every component, starring those that differ from the
    method's recipe (by a flag, now or in the run a checkpoint continues)."""
    from .core.recipes import COMPONENTS, RECIPES
    recipe, parts = RECIPES[config.method], []
    for name in COMPONENTS:
        value = getattr(config, name)
        text = ('on' if value else 'off') if isinstance(value, bool) else str(value)
        parts.append(f'{name}={text}' + ('*' if value != recipe[name] else ''))
    starred = any(part.endswith('*') for part in parts)
    return (f'method {config.method}: ' + ' '.join(parts)
            + (f'  (* differs from the {config.method} recipe)' if starred else ''))


def report_reading(image_set, say):
    """The files that could not be read, named, the notes on how the others were read, and
    what reading them cost."""
    for line in skipped_lines(image_set.skipped):
        say(line)
    for note in image_set.notes:
        say(note)
    if image_set.read_stats is not None and image_set.read_stats.files:
        say(reading_line(image_set.read_stats))


def skipped_lines(skipped):
    """'skipped PATH: REASON' for each (path, reason) of a file that could not be read, then
    the count: what every command says of them."""
    lines = [f'skipped {datasets.shown(where)}: {reason}' for where, reason in skipped]
    return lines + ([f'skipped {plural(len(skipped), "unreadable file")}'] if skipped else [])


def reading_line(stats):
    """'images: 60000 files read in 3.1 s, all from the image cache /root/.cache/super-and',
    or how many were decoded, on how many processes, at what rate, and where to."""
    if not stats.decoded:
        return (f'images: {plural(stats.files, "file")} read in {stats.seconds:.1f} s, all from '
                f'the image cache {datasets.shown(stats.cache)}')
    rate = stats.decoded / max(stats.seconds, 1e-9)
    where = f'the image cache {datasets.shown(stats.cache)}' if stats.cached else 'memory'
    found = f', {stats.from_cache} from the cache' if stats.from_cache else ''
    return (f'images: {plural(stats.files, "file")} read in {stats.seconds:.1f} s: '
            f'{stats.decoded} decoded on {plural(stats.processes, "process", "processes")} '
            f'({rate:.0f} images/s) into {where}{found}')


def size_text(count):
    """'4.7 MB', '7.86 GB': bytes in the unit that shows them."""
    return f'{count / 2 ** 30:.2f} GB' if count >= 2 ** 30 else f'{count / 2 ** 20:.1f} MB'


def device_data_line(pipeline):
    """Where the gpu pipeline keeps the images: on the device, or streamed to it."""
    size = f'{size_text(pipeline.data_bytes)} of images'
    budget = (size_text(pipeline.memory_budget) if pipeline.memory_budget is not None
              else 'no')
    if pipeline.resident:
        return f'data: {size} held on the device ({budget} budget, --data-memory)'
    return (f'data: {size} exceed the {budget} budget (--data-memory): each batch is read from '
            f'the host and copied to the device, augmented there')


def data_line(config, train, test, mean, std):
    source = f'from {datasets.shown(train.source)}; {config.image_size} px'
    if not train.labelled:
        text = (f'data: {plural(len(train), "unlabeled image")} (no classes, no test split), '
                f'{source}')
    elif train.num_labelled < len(train):         # STL-10: its unlabeled split too
        text = (f'data: {len(train)} training images ({train.num_labelled} labelled) and '
                f'{len(test)} test images, {plural(len(train.classes), "class", "classes")}, '
                f'{source}')
    else:
        text = (f'data: {len(train)} training and {len(test)} test images, '
                f'{plural(len(train.classes), "class", "classes")}, {source}')
    return text + f', mean {tuple(mean)} std {tuple(std)}'


def eval_root_line(config, train, test):
    classes = plural(len(train.classes), 'class', 'classes')
    return (f'kNN evaluation on {datasets.shown(config.eval_root)}: {len(train)} training and '
            f'{len(test)} test images, {classes} (network embeddings)')


def knn_warnings(config, knn):
    """Warnings for kNN settings whose accuracy means nothing."""
    if knn is None:
        return []
    found, count = [], len(knn.train_labels)
    if 'knn_features' in config.typed and config.knn_features == 'bank' and not config.bank:
        found.append('note: this run has no memory bank, so the kNN compares with the '
                     'network\'s embeddings of the training images (--knn-features network)')
    if knn.num_classes < 2:
        found.append(f'warning: {plural(knn.num_classes, "class", "classes")}: every kNN vote '
                     f'goes to it, so the accuracy means nothing')
    elif note := top5_note(knn.num_classes, config.knn_k):
        found.append(note)
    if config.knn_k >= count:
        found.append(f'warning: --knn-k {config.knn_k} is at least the {count} labelled training '
                     f'images: every test image is voted on by all of them, so the accuracy '
                     f'means little; use a smaller --knn-k')
    return found


def top5_note(num_classes, knn_k=None):
    """With 5 classes or fewer the five best-scored classes are all of them: the note that
    top-5 then says little (the kNN's: a hit whenever the image's class got any of the
    `knn_k` votes, lib/core/knn.topk_correct) or nothing (a probe's: 100%), else None."""
    if num_classes > 5:
        return None
    classes = plural(num_classes, 'class', 'classes')
    if knn_k is None:
        return (f'note: with {classes}, the five best-scored classes are all of them, so top-5 '
                f'is 100% by construction')
    return (f'note: with {classes}, kNN top-5 is a hit whenever the image\'s class got any of '
            f'its {knn_k} neighbours\' votes, so it says little; top-1 is the measure')


def schedule_line(schedule, base_lr, losses):
    """One line: the lr, and the weight of each of `losses` (names) that follows a schedule,
    from the round's start and at each change."""
    def changes(value):
        text, last = f'{value(0):g}', value(0)
        for epoch in range(1, schedule.epochs):
            if value(epoch) != last:
                text += f', {value(epoch):g} from epoch {epoch}'
                last = value(epoch)
        return text
    origin = ('released, absolute epochs' if schedule.kind == 'released'
              else 'scaled to the round: 0.4, 0.6, 0.8 of it')
    line = (f'schedule per round of {plural(schedule.epochs, "epoch")} ({origin}): lr '
            + changes(lambda epoch: schedule.learning_rate(base_lr, epoch)))
    for name in losses:
        if LOSSES[name].scheduled:
            weight = changes(lambda epoch: round(LOSSES[name].weight_at(schedule, epoch), 10))
            line += f'; {weight_title(name)} {weight}' + (' throughout' if ',' not in weight
                                                          else '')
    return line


def weight_title(name):
    """'UE weight': how the console names a loss's weight."""
    return LOSSES[name].title.removesuffix(' loss') + ' weight'


def announce(config, settings, world, schedule, data, log, compiled, say):
    """The lines that start training: the schedule, the compile mode and why (`compiled`, a
    fast_path.CompileReport), the run's shape and where it logs, and on a CPU an estimate of
    the time it takes when that is more than an hour."""
    losses = active_losses(config)
    say(schedule_line(schedule, config.lr, losses))
    for name in losses:
        if LOSSES[name].scheduled and \
                not any(LOSSES[name].weight_at(schedule, e) for e in range(config.epochs)):
            say(f'warning: the {LOSSES[name].title} is on, but its weight stays 0 in every '
                f'epoch of these {config.epochs}-epoch rounds (--schedule {config.schedule}), '
                f'so it trains nothing; use --schedule scaled or more --epochs')
    if compiled.asked != 'none':
        say(compiled.line())
    steps = data.pipeline.steps_per_epoch
    where = log.jsonl_path + (f' and {log.tensorboard_folder}' if log.writer is not None else '')
    say(f'training {config.network} on {config.dataset} ({settings.device}, '
        f'{plural(world.size, "process", "processes")}, {settings.pipeline} pipeline, '
        f'{settings.precision}, compile {compiled.used}): '
        f'{plural(config.rounds, "round")} x {plural(config.epochs, "epoch")}, '
        f'{plural(steps, "step")} of {config.batch_size} images; logs in {where}')
    if not settings.cuda:
        hours = cpu_hours_estimate(config.network, config.sobel, config.views,
                                   config.image_size,
                                   config.rounds * config.epochs * steps * config.batch_size,
                                   data.knn.pipeline.num_test if data.knn else 0,
                                   config.rounds * config.epochs)
        if hours > 1:
            days = f' ({hours / 24:,.0f} days)' if hours > 48 else ''
            say(f'estimated time on this CPU: about {hours:,.0f} hours{days}, from a rate '
                f'measured on 2 cores; one GPU is meant to take about 1.5 hours for the '
                f'released 5 x 200 epochs of CIFAR-10 (an estimate: README)')


# ----------------------------------------------------------------------------- rounds, epochs
def round_line(record):
    """The line of an anchor discovery (`build.anchor_discovery`'s record)."""
    count, entries = record['anchors'], record['entries']
    if count == 0:
        detail = 'so no (anchor, neighbour) pairs yet'
    elif record['consistency'] is not None:
        detail = (f'label consistency of (anchor, neighbour) pairs '
                  f'{record["consistency"]:.2f}%')
    else:
        detail = f'mean (anchor, neighbour) cosine {record["neighbour_similarity"]:.3f}'
    return (f'round {record["round"]}: {plural(count, "anchor")} ({100 * count / entries:.1f}% '
            f'of {entries}), {detail} ({record["seconds"]:.1f} s)')


def epoch_line(config, record):
    """The line of an epoch (its log.jsonl record)."""
    losses = ', '.join(f'{LOSSES[name].title} {value:.4f}'
                       for name, value in record['loss'].items())
    parts = [f"round {record['round']} epoch {record['epoch']:3d}/{config.epochs}",
             f"lr {record['lr']:.5f}"]
    parts += [f'{weight_title(name)} {weight:.1f}' for name, weight
              in record['weights'].items() if LOSSES[name].scheduled]
    parts.append(losses)
    if 'knn_top1' in record:
        parts += [f"kNN top-1 {record['knn_top1']:.2f}% top-5 {record['knn_top5']:.2f}%",
                  f"best {record['best_top1']:.2f}%"]
    if 'bank' in record:
        bank = record['bank']
        text = (f"bank entropy {bank['entropy_mean']:.3f} ({bank['entropy_min']:.3f}-"
                f"{bank['entropy_max']:.3f}), nearest cos {bank['nearest_similarity']:.3f}")
        if 'anchor_similarity' in bank:
            text += f", anchor-neighbour cos {bank['anchor_similarity']:.3f}"
        parts.append(text)
    parts.append(f"{record['seconds']:.1f} s")
    return ' | '.join(parts)


def test_only_line(checkpoint, top1, top5):
    state = checkpoint.state
    where = f"round {state.get('round', '?')} epoch {state.get('epoch', '?')}"
    return (f'kNN accuracy of {checkpoint.path} ({where}): top-1 {100 * top1:.2f}% '
            f'top-5 {100 * top5:.2f}%')


# ----------------------------------------------------------------------------- stops and the end
def last_path(config):
    return os.path.join(config.model_dir, LAST)


def non_finite_loss(config, progress, round_index, epoch, step, lowered_from=None):
    """The UserError of a NaN or infinite loss at `step`, or (`step` None) of weights, BatchNorm
    statistics or bank entries that became so (once the checkpoint it names is on disk).
    `lowered_from`: the run's learning rate, where this run continued from last.t7 with a lower
    one and failed in that very epoch: a lower one again is not offered (the weights may be
    past saving, and the suggestion would loop), but starting over."""
    lower = f'{config.lr / 10:g}'
    saved = progress.saved
    if saved and lowered_from is not None:
        kept = (f'{last_path(config)} holds round {saved[0]} epoch {saved[1]}, the last epoch '
                f'whose values were all finite, but continuing from it with a lower learning '
                f'rate (--lr {config.lr:g}; the run had {lowered_from:g}) failed in its first '
                f'epoch, so its weights have likely grown past what a learning rate brings '
                f'back: start the run over in an unused folder, with the command that started '
                f'it and --lr {lower} --model_dir {quote(unused_folder(config.model_dir))}')
    elif saved:
        kept = (f'{last_path(config)} still holds round {saved[0]} epoch {saved[1]}, the last '
                f'epoch whose values were all finite; a lower learning rate may help: '
                f'{continue_command(config, "--lr", lower)}')
    else:
        kept = (f'no checkpoint had been written yet; a lower learning rate may help: '
                f'{retyped(config.argv, {"--lr": lower})}')
    what = (f'non-finite loss (NaN or infinite) at round {round_index} epoch {epoch} step '
            f'{step}' if step is not None else f'non-finite weights, BatchNorm statistics or '
            f'bank entries (NaN or infinite) after round {round_index} epoch {epoch}')
    return UserError(f'{what}: stopped; {kept}')


def stopped_line(config, signal_name, round_index, epoch, steps):
    return (f'stopped by {signal_name} at round {round_index} epoch {epoch} step {steps}: '
            f'{last_path(config)} written; continue with: '
            f'{continue_command(config)}')


def continues_from(progress):
    """'continues from round R epoch E[ step S]': where the last.t7 on disk resumes."""
    round_index, epoch, step = progress.resumes_at
    return f'continues from round {round_index} epoch {epoch}' + (f' step {step}' if step else '')


def stopped_before_training_line(config, signal_name, progress):
    """A stop signal before the first step (while compiling): what is on disk is as it was."""
    if progress.resumes_at is None:
        return (f'stopped by {signal_name} before the first step (while compiling): nothing '
                f'trained, nothing written')
    return (f'stopped by {signal_name} before the first step (while compiling): '
            f'{last_path(config)} still {continues_from(progress)}; continue with: '
            f'{continue_command(config)}')


def held_text(config, progress):
    """What last.t7 holds and the command that continues it, or that there is none yet: how
    the lines of a run that cannot go on end. `progress` None: a process that does not write
    checkpoints found none on its disk (engine.held_progress)."""
    if progress is None:
        return f'no checkpoint is in {config.model_dir} on this machine (rank 0 writes them)'
    if progress.resumes_at is None:
        return 'no checkpoint had been written yet'
    return (f'{last_path(config)} {continues_from(progress)}; continue with: '
            f'{continue_command(config)}')


def lost_process_line(config, progress, world):
    """Another process of the run is gone (killed, out of memory): this one cannot go on."""
    lost = (f'process rank {1 - world.rank} (of 2)' if world.size == 2
            else f'another of the {world.size} processes')
    return (f'{lost} of this run stopped or stopped answering (killed, out of memory, or '
            f'stuck?), and this one cannot go on without it; {held_text(config, progress)}')


def lost_loader_line(config, progress, world):
    """A data-loader worker process died (the kernel's out-of-memory killer, a kill)."""
    return (f'a data-loader worker process was killed (out of memory? --workers '
            f'{config.workers} starts that many; fewer take less memory); '
            f'{held_text(config, progress)}')


def stopped_after_line(config, epochs_run):
    return (f'stopping after {plural(epochs_run, "epoch")} (--stop-after); continue with: '
            f'{continue_command(config)}')


def interrupted_line(config, progress):
    """What a second Ctrl-C leaves: what last.t7 holds, and the command that continues it."""
    return f'interrupted: stopped at once (a second Ctrl-C); {held_text(config, progress)}'


def end_lines(config, progress, log_path):
    """The lines of a finished run: its result, and which file holds what."""
    best, last = os.path.join(config.model_dir, BEST), last_path(config)
    rounds_epochs = f'{plural(config.rounds, "round")} x {plural(config.epochs, "epoch")}'
    if progress.best_acc is not None:
        return [f'done: best kNN top-1 {100 * progress.best_acc:.2f}% (round '
                f'{progress.best_round} epoch {progress.best_epoch}, best-on-test as '
                f'released), final {100 * progress.acc:.2f}%',
                f'files: {best} holds the best epoch (round {progress.best_round} epoch '
                f'{progress.best_epoch}), {last} the last (round {progress.round} epoch '
                f'{progress.epoch}); the log is {log_path}']
    return [f'done: {rounds_epochs} without labels (no kNN accuracy)',
            f'files: {best} and {last} hold the last epoch (round {progress.round} epoch '
            f'{progress.epoch}; without labels there is no best); the log is {log_path}']
