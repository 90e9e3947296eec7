"""The resume policy: what --resume and --init-from mean, and what a run that continues may
and may not change.

- `--resume NAME` continues a run exactly from its last.t7 (optimizer, random states, the step
  it stopped at), in that checkpoint's folder unless --model_dir is typed; with --test_only any
  checkpoint (ckpt.t7, a released file) is only evaluated.
- `--init-from NAME` starts a new run from a checkpoint's weights, bank and anchors, at its
  round, epoch 0, with a fresh optimizer and schedule; never over the file it starts from.
- A resumed run keeps its recipe (a typed component that contradicts it is refused; more
  --rounds train on), its data (the fingerprint), and the meaning of its saved position
  (lib/checkpoint.py check_resume_position). Which options a resumed run takes from its
  checkpoint is declared with each option (lib/config.py).
"""
import hashlib
import os
from dataclasses import dataclass

from . import checkpoint as ckpt
from .cli import plural
from .console import command, retyped, unused_folder
from .core.recipes import COMPONENTS
from .errors import UserError

# What a resumed run may not change: its recipe (rounds may grow, to train on).
RECIPE_OPTIONS = ('method',) + tuple(name for name in COMPONENTS if name != 'rounds')


@dataclass
class Checkpoint:
    """The checkpoint of --resume or --init-from, read and checked against the flags."""
    path: str
    state: dict
    model_dir: str = None       # where a continued run goes on (its folder), None: as given
    resumed: bool = False       # --resume (the run goes on), not --init-from (a new run)

    @property
    def config(self):
        """The options the checkpoint's run had ({} for a released file)."""
        return ckpt.stored_options(self.state, self.path)

    @property
    def options(self):
        """The options this run takes from the checkpoint where not typed: a resumed run
        takes its own; a new run from --init-from takes none (None), only the weights."""
        return self.config if self.resumed else None

    def restore_method(self, method, fingerprint, say):
        """The network, bank and anchors into `method`, once the checkpoint's data is known to
        be this run's (a released file, without fingerprint, is said to be unchecked)."""
        note = ckpt.check_data(self.state, fingerprint, self.path)
        if note:
            say(note)
        method.load(self.state, self.path)


def open_checkpoint(flags, say, world=None):
    """The Checkpoint of --resume or --init-from (None for a fresh run), read and checked
    against the typed flags: a file that is one, that this run does not overwrite, that can
    continue a run when --resume trains, and whose recipe the flags keep. With several
    processes (`world`: on several machines, each reads its own copy) they must all have the
    same one: a process that cannot read it, or has another, stops every process with one
    line naming it."""
    if world is None or world.size == 1:
        return _open_checkpoint(flags, say)
    try:
        checkpoint, problem = _open_checkpoint(flags, say), None
    except UserError as err:
        checkpoint, problem = None, str(err)
    content = None
    if checkpoint is not None:
        digest = hashlib.sha1()
        with open(checkpoint.path, 'rb') as f:
            for block in iter(lambda: f.read(1 << 24), b''):
                digest.update(block)
        content = digest.hexdigest()[:16]
    everyone, differing = world.unlike_main((problem, content))
    needs = ('every node needs the same checkpoint in its --model_dir (a folder all nodes '
             'share, or a copy of rank 0\'s)')
    for rank, (problem, _) in enumerate(everyone):
        if problem is not None:
            raise UserError(f'{world.where(rank)} cannot resume: {problem}; {needs}')
    if differing:
        others = ', '.join(world.where(rank) for rank in differing)
        raise UserError(f'the processes would resume different checkpoints: {others} '
                        f'{"holds" if len(differing) == 1 else "hold"} another file than '
                        f'{world.where(0)} (content {everyone[0][1]}); {needs}')
    return checkpoint


def _open_checkpoint(flags, say):
    typed = flags.typed
    model_dir = typed.get('model_dir', 'checkpoint/')
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise UserError(f'--model_dir {model_dir} is a file, not a folder')
    name = typed.get('resume') or typed.get('init_from')
    if not name:
        return None
    continuing = bool(typed.get('resume')) and not typed.get('test_only')
    path = ckpt.resolve_path(model_dir, name, ckpt.LAST if continuing else ckpt.BEST)
    state = ckpt.load(path)
    if typed.get('init_from') and os.path.abspath(path) in [os.path.abspath(os.path.join(
            model_dir, written)) for written in (ckpt.BEST, ckpt.LAST)]:
        elsewhere = retyped(flags.argv, {'--init-from': path,
                                         '--model_dir': unused_folder(model_dir)})
        raise UserError(f'--init-from {name} is {path}, a file this run would overwrite: '
                        f'start the new run in another folder: {elsewhere}')
    checkpoint = Checkpoint(path, state, resumed=bool(typed.get('resume')))
    if not checkpoint.resumed:
        return checkpoint
    if continuing and not ckpt.can_continue(state):
        raise UserError(f'{path} holds no optimizer state (a best-kNN ckpt.t7 or a released '
                        f'checkpoint), so --resume cannot continue a run from it; '
                        f'--init-from {path} starts a new run from its weights, bank and '
                        f'anchors (in another --model_dir); to evaluate it: '
                        f'{command(*flags.argv, "--test_only")}')
    if continuing and 'model_dir' not in typed and \
            os.path.abspath(os.path.dirname(path)) != os.path.abspath(model_dir):
        # A run continues in its own folder, not in the default one (another run's).
        checkpoint.model_dir = os.path.dirname(path) or '.'
        say(f'continuing the run in {checkpoint.model_dir}, the folder of {path}')
    refuse_recipe_change(typed, checkpoint.config, path)
    return checkpoint


def refuse_recipe_change(typed, stored, path):
    for key in RECIPE_OPTIONS:
        if key in typed and stored.get(key) is not None and typed[key] != stored[key]:
            value, name = typed[key], key.replace('_', '-')
            flag = (f'--{name}' if value else f'--no-{name}') if isinstance(value, bool) \
                else f'--{name} {value}'
            raise UserError(f'{flag} contradicts the run in {path} ({key} = {stored[key]}): a '
                            f'resumed run keeps its recipe; start a new run in another '
                            f'--model_dir, or one from its weights with --init-from {path}')


def note_changed_arithmetic(checkpoint, settings, say):
    """On --resume: one line when this machine trains the run on another pipeline or in
    another arithmetic than the run had (`auto` chose otherwise here): the continuation then
    differs from the unbroken run, and the line says what to type to keep it."""
    before = (checkpoint.state.get('config') or {}).get('trained_with') or {}
    now = settings.arithmetic()
    changed = [name for name in now if before.get(name) not in (None, now[name])]
    if changed:
        was = ', '.join(f'{before[name]} {name}' for name in changed)
        keep = ' '.join(f'--{name} {before[name]}' for name in changed)
        say(f'note: this run last trained with the {was}; here it continues with the '
            f'{", ".join(f"{now[name]} {name}" for name in changed)}, so it will not equal '
            f'the run never stopped (augmentations or rounding differ); to keep it: {keep}')


def note_changed_processes(checkpoint, config, world, say):
    """On --resume: one line when the run continues on another number of processes than it
    last trained on. The data and augmentations are the same (every process takes its share
    of one global batch); without --sync-bn BatchNorm's statistics are each process's own
    share's, so the arithmetic changes; with it they are the global batch's, and only the
    order of floating-point sums over processes differs."""
    before = ((checkpoint.state.get('config') or {}).get('trained_with') or {}).get('processes')
    if before is None or before == world.size:
        return
    was, now = plural(before, 'process', 'processes'), plural(world.size, 'process',
                                                              'processes')
    keep = command('--model_dir', config.model_dir, '--resume', ckpt.LAST, processes=before)
    if config.sync_bn:
        say(f'note: this run last trained on {was}; here it continues on {now}; with --sync-bn '
            f'BatchNorm\'s statistics are the whole batch\'s either way, so it continues as '
            f'the run never stopped up to the rounding of sums over processes; exactly: {keep}')
    else:
        say(f'note: this run last trained on {was}; here it continues on {now}, and without '
            f'--sync-bn each process\'s BatchNorm statistics cover its own share of the batch, '
            f'so it will not equal the run never stopped; to keep it: {keep}')


def nothing_to_train(config, checkpoint, say):
    """Whether the run has nothing left to do: --resume of a finished run (said, and nothing
    written). Refuses --init-from at or past --rounds, and a resume whose options would change
    what its saved position means."""
    if checkpoint is None or config.test_only:
        return False
    if config.init_from:
        start_round = int(checkpoint.state.get('round') or 0)
        if start_round >= config.rounds:
            raise UserError(f'{checkpoint.path} is at round {start_round}; with --rounds '
                            f'{config.rounds} there is nothing left to train; with one more '
                            f'round: {retyped(config.argv, {"--rounds": str(start_round + 1)})}')
        return False
    for note in ckpt.check_resume_position(checkpoint.state, config.record(), checkpoint.path):
        say(note)
    progress = ckpt.progress_of(checkpoint.state)
    if progress.round < config.rounds:
        return False
    best = f'; best kNN top-1 {progress.best_text()}' if progress.best_acc is not None else ''
    say(f'{checkpoint.path}: the run already finished ({plural(config.rounds, "round")} x '
        f'{plural(config.epochs, "epoch")}{best}); nothing to do; more rounds would train on: '
        f'{retyped(config.argv, {"--rounds": str(config.rounds + 1)})}')
    return True


def start(config, checkpoint, optimizer, method, world, say, evaluated=True):
    """The Progress a run starts from: a last.t7's position (its optimizer and random states
    restored), round `r` epoch 0 of an --init-from checkpoint at round r, or the beginning.
    `evaluated`: the run has a kNN accuracy (labels, or --eval-root) to say the best of."""
    if checkpoint is None:
        return ckpt.Progress()
    state, path = checkpoint.state, checkpoint.path
    if config.init_from:
        start_round = int(state.get('round') or 0)
        anchors = method.anchors.num_anchors if method.anchors is not None else 0
        say(f'initialised from {path} (round {state.get("round")} epoch {state.get("epoch")}): '
            f'weights, bank and {plural(anchors, "anchor")} taken; optimizer and schedule '
            f'fresh; training starts at round {start_round} epoch 0')
        return ckpt.Progress(round=start_round)
    if state.get('format', 1) < ckpt.LAST_FORMAT:
        say(f'note: {path} was written by an earlier version of this program (its loss sums '
            f'by position, not by name); it resumes as it is')
    progress = ckpt.restore_training(state, optimizer)
    where = f' step {progress.step}' if progress.step else ''
    best = f' (best kNN top-1 so far: {progress.best_text()})' if evaluated else ''
    say(f'resuming at round {progress.round} epoch {progress.epoch}{where} from {path}{best}')
    repeated = ckpt.repeated_epoch_note(path, progress) if world.main else None
    if repeated:
        say(repeated)
    return progress


def starts_round(config, progress, round_index, method):
    """Whether round `round_index` begins here with an anchor discovery: a round after the
    first, of a method with anchors, entered at its epoch 0 (not continued mid-epoch, and not
    the round an --init-from checkpoint brought its anchors for)."""
    if round_index == 0 or method.anchors is None:
        return False
    if round_index != progress.round:
        return True
    return progress.epoch == 0 and progress.step == 0 and not config.init_from
