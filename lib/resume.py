"""The resume policy: what --resume and --init-from mean, and what a continued run may change.

- `--resume NAME` continues a run exactly from its last.t7 (optimizer, random states, the step
  it stopped at), in that checkpoint's folder unless --model_dir is typed; with --test_only any
  checkpoint (ckpt.t7, a released file) is only evaluated.
- `--init-from NAME` starts a new run from a checkpoint's weights, bank and anchors, at its
  round, epoch 0, with a fresh optimizer and schedule; never over the file it starts from.
- A resumed run keeps its recipe (a typed component that contradicts it is refused; more
  --rounds train on), its data (the fingerprint), and the meaning of its saved position
  (`check_resume_position`). Which options a resumed run takes from its checkpoint is
  declared with each option (lib/config.py).
"""
import os
from dataclasses import dataclass

import torch

from datasets import describe_fingerprint

from . import checkpoint as ckpt
from .cli import plural
from .config import DEFAULTS
from .console import command, continue_command, quote, retyped, unused_folder
from .core.recipes import COMPONENTS
from .errors import UserError
from .run_folder import BEST, LAST, refuse_file
from .run_log import LOG_NAME, RECORD_START

# What a resumed run may not change: its recipe (rounds may grow, to train on), and what its
# network and bank have seen of each image (its size and normalisation).
RECIPE_OPTIONS = ('method',) + tuple(name for name in COMPONENTS if name != 'rounds') + (
    'image_size', 'mean', 'std')
# The options that give last.t7's position its images: a step is `batch_size` images of the
# epoch's shuffle, which `seed` draws; `epochs` numbers the epochs (log.jsonl's global_epoch)
# and places them in the schedule. The number of processes (a step is the global batch),
# --workers and --pipeline leave a step's images alone; the data fingerprint and the recipe
# check refuse what would change the images themselves.
POSITION_OPTIONS = ('batch_size', 'seed', 'epochs')
MID_EPOCH_CHANGE = {
    'batch_size': 'that step would count other images (some trained twice, some never)',
    'seed': 'the epoch would be shuffled otherwise (some images trained twice, some never)',
    'epochs': 'the epoch would change its schedule halfway'}


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

    @property
    def folder(self):
        """The folder the checkpoint is in: its run's."""
        return os.path.dirname(self.path) or '.'

    def in_its_folder(self, model_dir):
        """Whether `model_dir` (an existing folder) is the checkpoint's own."""
        return os.path.samefile(self.folder, model_dir)

    @property
    def trained_with(self):
        """What `auto` chose for the run's last training, and on how many processes."""
        return (self.state.get('config') or {}).get('trained_with') or {}

    def restore_method(self, method, fingerprint, say):
        """The network, bank and anchors into `method`, once `check_data` let them."""
        note = check_data(self.state, fingerprint, self.path)
        if note:
            say(note)
        method.load(self.state, self.path)
        held = (self.state.get('npc') or {}).get('params')
        if method.bank is not None and held is not None:
            now = (method.bank.temperature, method.bank.momentum)
            if any(abs(float(a) - b) > 1e-6 for a, b in zip(held.tolist(), now)):
                say(f'note: {self.path} was trained with --npc_t {float(held[0]):g} --npc_m '
                    f'{float(held[1]):g}; this run goes on with --npc_t {now[0]:g} --npc_m '
                    f'{now[1]:g}')
        anchors = method.anchors
        if anchors is not None and anchors.num_anchors and \
                anchors.neighbours.shape[1] != anchors.ans_size:
            say(f'note: the {plural(anchors.num_anchors, "anchor")} of {self.path} have '
                f'{plural(anchors.neighbours.shape[1], "neighbour")} each; --ANs_size '
                f'{anchors.ans_size} applies from the next anchor discovery')


def open_checkpoint(flags, say, world=None):
    """The Checkpoint of --resume or --init-from (None for a fresh run): a checkpoint, not
    one this run overwrites, that can continue a run when --resume trains, whose recipe the
    flags keep. Several processes (on several machines each reads its own copy) must have
    the same one: else every process stops with one line naming those that differ."""
    if world is None or world.size == 1:
        return _open_checkpoint(flags, say)
    try:
        checkpoint, problem = _open_checkpoint(flags, say), None
    except UserError as err:
        checkpoint, problem = None, str(err)
    content = ckpt.checkpoint_digest(checkpoint.path) if checkpoint is not None else None
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
    model_dir = typed.get('model_dir', DEFAULTS['model_dir'])
    refuse_file(model_dir, '--model_dir')
    name = typed.get('resume') or typed.get('init_from')
    if not name:
        return None
    continuing = bool(typed.get('resume')) and not typed.get('test_only')
    path = ckpt.resolve_path(model_dir, name, LAST if continuing else BEST)
    state = ckpt.load(path)
    if typed.get('init_from') and os.path.abspath(path) in [os.path.abspath(os.path.join(
            model_dir, written)) for written in (BEST, LAST)]:
        elsewhere = retyped(flags.argv, {'--init-from': path,
                                         '--model_dir': unused_folder(model_dir)})
        raise UserError(f'--init-from {name} is {path}, a file this run would overwrite: '
                        f'start the new run in another folder: {elsewhere}')
    checkpoint = Checkpoint(path, state, resumed=bool(typed.get('resume')))
    if not checkpoint.resumed:
        return checkpoint
    if continuing and not {'optimizer', 'next'} <= set(state):     # weights only
        raise UserError(f'{path} holds no optimizer state (a best-kNN ckpt.t7 or a released '
                        f'checkpoint), so --resume cannot continue a run from it; '
                        f'--init-from {quote(path)} starts a new run from its weights, bank '
                        f'and anchors (in another --model_dir); to evaluate it: '
                        f'{command(*flags.argv, "--test_only")}')
    if continuing and 'model_dir' not in typed and \
            os.path.abspath(checkpoint.folder) != os.path.abspath(model_dir):
        # A run continues in its own folder, not in the default one (another run's).
        checkpoint.model_dir = checkpoint.folder
        say(f'continuing the run in {checkpoint.model_dir}, the folder of {path}')
    refuse_recipe_change(typed, checkpoint.config, path)
    return checkpoint


def refuse_recipe_change(typed, stored, path):
    for key in RECIPE_OPTIONS:
        if key in typed and stored.get(key) is not None and typed[key] != stored[key]:
            value, name = typed[key], key.replace('_', '-')
            words = lambda v: ' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v
            flag = (f'--{name}' if value else f'--no-{name}') if isinstance(value, bool) \
                else f'--{name} {words(value)}'
            why = (f'a resumed run keeps its recipe, image size and normalisation; start a new '
                   f'run in another --model_dir, or one from its weights with --init-from '
                   f'{quote(path)}')
            if typed.get('test_only') and key in ('image_size', 'mean', 'std'):
                if typed.get('knn_features') == 'network':
                    continue            # both sides embedded with it: a scoring of its own
                why = (f'its bank holds the embeddings of the images as they were, so the test '
                       f'images would be scored against others; --knn-features network embeds '
                       f'both sides with {flag}')
            raise UserError(f'{flag} contradicts the run in {path} ({key} = '
                            f'{words(stored[key])}): {why}')


def refuse_another_run(config, checkpoint):
    """Refuse (UserError) to train into a --model_dir that holds another run: a new run, or a
    run resumed from another folder, would overwrite its checkpoints and add its records to
    that run's log.jsonl (one curve of two runs). A folder not yet trained in is taken."""
    folder = config.model_dir
    if checkpoint is not None and config.resume and checkpoint.in_its_folder(folder):
        return                          # the run continues in its own folder
    held = held_run(folder)
    if held is None:
        return
    held, continuable = held
    moved = {} if checkpoint is None else \
        {'--resume' if config.resume else '--init-from': checkpoint.path}
    elsewhere = retyped(config.argv, {**moved, '--model_dir': unused_folder(folder)})
    # (the run held there is continued by its last.t7, if readable: maybe this very command's
    # continuation, typed again)
    there = f'continue it: {continue_command(config)}; or ' if continuable else ''
    if config.resume:
        home = retyped(config.argv, {**moved, '--model_dir': checkpoint.folder})
        raise UserError(f'--model_dir {folder} holds a run ({held}), which continuing '
                        f'{checkpoint.path} there would overwrite: {there}continue '
                        f'{checkpoint.path} in its own folder: {home}, or in an unused one: '
                        f'{elsewhere}')
    raise UserError(f'--model_dir {folder} holds a run ({held}), which this new run would '
                    f'overwrite: {there}start this run in an unused folder: {elsewhere}')


def held_run(folder):
    """(what `folder` holds of a run that trained, 'last.t7 at round 1 epoch 0'; whether its
    last.t7 can continue it: readable and not finished), else None. A log.jsonl without an
    epoch record (a run that ended before its first) is not one."""
    for name in (LAST, BEST):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            held = saved_position(path)     # (None: unreadable, or a released file)
            if held is None:
                return name, False
            text = f'{name} at round {held[0]} epoch {held[1]}' + (', finished' * held[2])
            return text, name == LAST and not held[2]
    if not os.path.isfile(os.path.join(folder, LOG_NAME)):
        return None
    try:
        with open(os.path.join(folder, LOG_NAME), errors='replace') as log:
            trained = RECORD_START + '"epoch"' in log.read()
    except OSError:                 # unreadable: it may hold a run
        return LOG_NAME, False
    return (f'{LOG_NAME} of trained epochs', False) if trained else None


def check_resume_position(state, options, path, argv=()):
    """Refuse (UserError) a resume of the last.t7 `state` whose `options` (now: a dict holding
    POSITION_OPTIONS and `rounds`) would give its saved position other images or epochs;
    returns the notes on what an allowed change does. Mid-epoch nothing may change; at a
    boundary --batch_size and --seed may, and --epochs only in round 0 (later, the epochs
    already logged would be renumbered). `argv`: the words typed, for the commands the
    refusal names."""
    stored, nxt = state.get('config') or {}, state['next']
    changed = [(key, stored[key], options[key]) for key in POSITION_OPTIONS
               if stored.get(key) is not None and options[key] != stored[key]]
    rounds = options.get('rounds')      # None: the method's, resolved later
    if not changed or (rounds is not None and nxt['round'] >= rounds):
        return []                       # nothing changed, or finished: nothing is trained
    new = ' '.join(f'--{key} {value}' for key, _, value in changed)
    old = ' '.join(f'--{key} {value}' for key, value, _ in changed)
    where = f'round {nxt["round"]} epoch {nxt["epoch"]}'
    if nxt.get('step'):
        why = ' and '.join(MID_EPOCH_CHANGE[key] for key, _, _ in changed)
        finish = retyped(argv, {**{f'--{key}': str(value) for key, value, _ in changed},
                                '--stop-after': '1'})
        raise UserError(f'{path} stopped inside {where}, after step {nxt["step"]} with {old}; '
                        f'with {new} {why}, so this resume is refused: finish the epoch with '
                        f'{old}: {finish}; then resume with {new}: {command(*argv)}')
    epochs = [value for key, _, value in changed if key == 'epochs']
    if epochs and (nxt['round'] > 0 or nxt['epoch'] >= epochs[0]):
        raise UserError(f'--epochs {epochs[0]} contradicts the run in {path}, now at {where} '
                        f'of {stored["epochs"]}-epoch rounds: a resumed run keeps its round '
                        f'length after round 0 (log.jsonl numbers its epochs by it) and never '
                        f'skips the rest of a round; resume without --epochs, or start a new '
                        f'run from its weights with --init-from')
    return [f'note: {new} replaces the run\'s {old} from {where} on ({path} ends at an epoch '
            f'boundary, so no image is skipped or trained twice); the run no longer equals one '
            f'trained with {old} throughout']


def _from_mapped(path, read):
    """`read(state)` of the checkpoint at `path` mapped, not read (mmap: no tensor's bytes are
    loaded); None when there is none, it cannot be read, or `read` finds what it needs
    missing (a released file has no position)."""
    try:
        return read(torch.load(path, map_location='cpu', weights_only=True, mmap=True))
    except Exception:
        return None


def saved_position(path):
    """(round, epoch, finished) of the checkpoint at `path`, reading no tensor (mmap):
    `finished` when it is a last.t7 whose run trained all its rounds; None when it is
    unreadable or has no position (a released file)."""
    def position(state):
        rounds = (state.get('config') or {}).get('rounds')
        finished = 'next' in state and rounds is not None and state['next']['round'] >= rounds
        return int(state['round']), int(state['epoch']), finished
    return _from_mapped(path, position)


def progress_on_disk(model_dir):
    """The Progress of the last.t7 in `model_dir` as it is on disk now (mmap: no tensor is
    read), None when there is none or it cannot be read."""
    return _from_mapped(os.path.join(model_dir, LAST), ckpt.progress_of)


def repeated_epoch_note(path, progress):
    """A note when the ckpt.t7 beside the last.t7 at `path` holds the epoch where `progress`
    continues, or a later one: a run killed after writing ckpt.t7 and before last.t7 (written
    in that order), whose epoch is now trained again. None otherwise."""
    best = os.path.join(os.path.dirname(path), BEST)
    if os.path.basename(path) != LAST or not os.path.isfile(best):
        return None
    held = saved_position(best)
    if held is None or held[:2] < (progress.round, progress.epoch):
        return None
    return (f'note: {best} holds round {held[0]} epoch {held[1]}, which {path} had not reached '
            f'(the run was stopped between writing the two): training repeats from round '
            f'{progress.round} epoch {progress.epoch}')


def check_data(state, fingerprint, path):
    """Refuse (UserError) a checkpoint whose bank belongs to other training data than
    `fingerprint`; a note for a file without a fingerprint (a released one) or for the same
    images labelled otherwise (the labels only score), else None."""
    stored = state.get('fingerprint')
    if stored is None:
        return (f'note: {path} has no data fingerprint (a released or older checkpoint): '
                f'that its bank belongs to these training images could not be checked')
    if stored == fingerprint:
        return None
    same_images = all(stored.get(k) == fingerprint.get(k) for k in ('images', 'content'))
    if same_images:         # the bank's rows are these images, in order
        return (f'note: {path} was trained on these images in this order with other labels '
                f'({describe_fingerprint(stored)}); its bank fits them, and the labels now '
                f'given only score the kNN accuracy')
    before, now = stored.get('images', 0), fingerprint.get('images', 0)
    subset = (state.get('config') or {}).get('subset')
    if before == now:
        what = ('the same number of images, of other content (a file changed, or one removed '
                'and one added); put the folder back as it was, or give --data-root a copy of it')
    else:
        what = (f'{abs(now - before)} images {"more" if now > before else "fewer"}; give the '
                f'--data-root it was trained on, '
                + (f'with --subset {subset}' if subset else 'without --subset'))
    raise UserError(f'checkpoint {path} was trained on other data: it holds '
                    f'{describe_fingerprint(stored)}; --data-root gives '
                    f'{describe_fingerprint(fingerprint)} ({what}); its memory bank has one '
                    f'row per training image, in order, so it needs the data it was trained on '
                    f'(a new run on the data as it is now starts afresh)')


def note_changed_arithmetic(checkpoint, settings, say):
    """On --resume: one line when this machine trains the run on another pipeline or in
    another arithmetic than the run had (`auto` chose otherwise here): the continuation then
    differs from the unbroken run, and the line says what to type to keep it."""
    before, now = checkpoint.trained_with, settings.arithmetic()
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
    before = checkpoint.trained_with.get('processes')
    if before is None or before == world.size:
        return
    was, now = plural(before, 'process', 'processes'), plural(world.size, 'process',
                                                              'processes')
    keep = continue_command(config, processes=before)
    if config.sync_bn:
        say(f'note: this run last trained on {was}; here it continues on {now}; with --sync-bn '
            f'BatchNorm\'s statistics are the whole batch\'s either way, so it continues as '
            f'the run never stopped up to the rounding of sums over processes; exactly: {keep}')
    else:
        say(f'note: this run last trained on {was}; here it continues on {now}, and without '
            f'--sync-bn each process\'s BatchNorm statistics cover its own share of the batch, '
            f'so it will not equal the run never stopped; to keep it: {keep}')


def nothing_to_train(config, checkpoint, say):
    """Whether the run has nothing left to do: --resume of a finished run (said). Refuses
    --init-from at or past --rounds, and a resume that changes what its position means."""
    if checkpoint is None or config.test_only:
        return False
    if config.init_from:
        start_round = int(checkpoint.state.get('round') or 0)
        if start_round >= config.rounds:
            raise UserError(f'{checkpoint.path} is at round {start_round}; with --rounds '
                            f'{config.rounds} there is nothing left to train; with one more '
                            f'round: {retyped(config.argv, {"--rounds": str(start_round + 1)})}')
        return False
    for note in check_resume_position(checkpoint.state, config.record(), checkpoint.path,
                                      config.argv):
        say(note)
    progress = ckpt.progress_of(checkpoint.state)
    if progress.round < config.rounds:
        return False
    # Counted from the checkpoint, not from a typed --rounds that asks for fewer.
    trained, own = progress.round, checkpoint.config.get('rounds') or progress.round
    best = f'; best kNN top-1 {progress.best_text()}' if progress.best_acc is not None else ''
    where = ('the run already finished' if own <= trained else
             f'--rounds {config.rounds} asks for no more than the run has trained')
    if own <= trained and config.rounds < trained:
        where += f', and --rounds {config.rounds} is fewer rounds than it trained'
    more = {'--rounds': str(max(own, trained + 1))}
    if os.path.isdir(config.model_dir) and not checkpoint.in_its_folder(config.model_dir) and \
            held_run(config.model_dir) is not None:
        more['--model_dir'] = checkpoint.folder     # (not into another run's folder)
    say(f'{checkpoint.path}: {where} ({trained} of {plural(own, "round")} x '
        f'{plural(config.epochs, "epoch")} trained{best}); nothing to do; more rounds would '
        f'train on: {retyped(config.argv, more)}')
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
        taken = ['weights'] + (['bank'] if method.bank is not None else []) + (
            [plural(method.anchors.num_anchors, 'anchor')] if method.anchors is not None else [])
        say(f'initialised from {path} (round {state.get("round")} epoch {state.get("epoch")}): '
            f'{" and ".join([", ".join(taken[:-1]), taken[-1]]) if taken[1:] else taken[0]} '
            f'taken; optimizer and schedule fresh; '
            f'training starts at round {start_round} epoch 0')
        return ckpt.Progress(round=start_round)
    if state.get('format', 1) < ckpt.LAST_FORMAT:
        say(f'note: {path} was written by an earlier version of this program (its loss sums '
            f'by position, not by name); it resumes as it is')
    optimizer.load_state_dict(state['optimizer'])
    for group in optimizer.param_groups:    # the run's options (its records say), not the file's
        group.update(momentum=config.momentum, weight_decay=config.weight_decay,
                     nesterov=config.nesterov and config.momentum > 0)
    ckpt.set_rng_state(state.get('rng'))
    progress = ckpt.progress_of(state)
    where = f' step {progress.step}' if progress.step else ''
    best = f' (best kNN top-1 so far: {progress.best_text()})' if evaluated else ''
    say(f'resuming at round {progress.round} epoch {progress.epoch}{where} from {path}{best}')
    repeated = repeated_epoch_note(path, progress) if world.main else None
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
