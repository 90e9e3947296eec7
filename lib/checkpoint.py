"""The two checkpoint formats, how they are written, read, checked and restored.

`ckpt.t7` (the best kNN so far) is the released layout, `net npc ANs_discovery acc round
epoch` (`net` with the `module.` prefix the released code's DataParallel expects), so the
released code and ours read each other's files; ours add `config` (the run's options) and
`fingerprint` (of the training data), which the released code ignores.

`last.t7`, written after every epoch (and at a stop signal, mid-epoch), adds what continuing
needs: `optimizer`, `rng`, `next` (round, epoch and step to continue from, with the loss sums
of a part-done epoch) and `best`.

Every write goes to a temporary file that is fsynced, then renamed over the old one: a run
killed mid-write leaves the previous checkpoint whole.
"""
import os
import re
import shutil
import threading
import zipfile
from dataclasses import dataclass

import torch

from datasets import describe_file, describe_fingerprint, shown

from . import run_lock
from .errors import UserError

BEST, LAST = 'ckpt.t7', 'last.t7'
# What to do about a file that is something else than a checkpoint (datasets.describe_file).
FOREIGN_FILE_HINTS = {
    'an HTML page': 'a download that got a web page (a sign-in or error page) instead of the '
                    'file saves this; download the checkpoint again',
    'a gzip archive': 'unpack it (gunzip, or tar xzf for a .tar.gz) and give the checkpoint '
                      'inside',
    'a tar archive': 'unpack it (tar xf) and give the checkpoint inside',
    'a bzip2 archive': 'unpack it (bunzip2, or tar xjf) and give the checkpoint inside',
    'an xz archive': 'unpack it (unxz, or tar xJf) and give the checkpoint inside',
    'a 7-Zip archive': 'unpack it (7z x) and give the checkpoint inside',
    'a RAR archive': 'unpack it (unrar x) and give the checkpoint inside',
    'a Git LFS pointer (a small text file that stands for the real file, which was never '
    'fetched)': 'fetch the real file (git lfs pull) and give it',
}


# ----------------------------------------------------------------------------- files
def save_atomic(state, path):
    """Write `state` to `path` whole or not at all: to `path.tmp<pid>`, fsynced, renamed over
    `path`, and the rename made durable (the folder fsynced), so a kill or power loss leaves
    either the old file or the new one. A failed write (a full disk) removes its temporary."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass                    # never created, or its folder is gone
        raise
    fsync_folder(os.path.dirname(path) or '.')


def fsync_folder(folder):
    """Make the renames in `folder` durable: what log.jsonl says after a checkpoint was written
    must not survive a power loss that the rename does not."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return                      # a system that cannot open folders (Windows)
    try:
        os.fsync(fd)
    except OSError:
        pass                        # some filesystems refuse a folder's fsync: nothing to gain
    finally:
        os.close(fd)


def resolve_path(model_dir, name, in_folder=LAST):
    """The checkpoint file that --resume or --init-from `name` means. A bare file name
    (last.t7) is looked for in `model_dir` first, as released, then here; a path with a folder
    in it (checkpoint/quick/ckpt.t7, which already includes the model dir) is taken as typed
    when it exists, else looked for in `model_dir`. A folder (a model dir) means its
    `in_folder` file: last.t7 to continue a run, ckpt.t7 to evaluate it or start from it."""
    joined = os.path.join(model_dir, name)
    typed_first = os.path.dirname(os.path.normpath(name)) != ''
    looked_in = list(dict.fromkeys([name, joined] if typed_first else [joined, name]))
    for candidate in looked_in:
        if os.path.isdir(candidate):
            return os.path.join(candidate, in_folder)
        if os.path.exists(candidate):
            return candidate
    raise UserError(f'no checkpoint at {looked_in[0]}' +
                    (f' (nor at {looked_in[1]})' if len(looked_in) > 1 else ''))


def load(path):
    """The checkpoint dict at `path`, or a UserError saying in one sentence what is wrong."""
    if os.path.isdir(path):
        raise UserError(f'{path} is a folder, not a checkpoint file: give a checkpoint in it, '
                        f'e.g. {os.path.join(path, BEST)}')
    if not os.path.isfile(path):
        raise UserError(f'no checkpoint at {path}')
    size = os.path.getsize(path)
    if size == 0:
        raise UserError(f'checkpoint {path} is empty (0 bytes): it was never written')
    kind = describe_file(path)
    if kind is not None:
        raise UserError(f'{shown(path)} is {kind}, not a PyTorch checkpoint: '
                        + (FOREIGN_FILE_HINTS.get(kind) or 'give the checkpoint file itself'))
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:   # torch.load raises many types; each means an unusable file
        raise UserError(unreadable_reason(path, size, err)) from None
    if not isinstance(state, dict) or not {'net', 'npc'} <= set(state):
        if isinstance(state, dict):
            names = sorted(map(str, state))
            held = 'the keys ' + ', '.join(names[:8]) + (
                f' and {len(names) - 8} more' if len(names) > 8 else '') if names else 'no keys'
        else:
            held = f'a {type(state).__name__}, not a dict of keys'
        raise UserError(f'{path} is not a Super-AND checkpoint: it needs the keys net and npc, '
                        f'and holds {held}')
    return state


def stored_options(state, path=None):
    """The options the checkpoint's run had ({} for a released file), in today's words:
    checkpoints from before --knn-features took the word 'network' stored 'recompute'. The
    data folders it names relative to the folder the run was started in are given whole when
    they are not found from here (`path`: the checkpoint's, for runs that did not record
    where they started)."""
    stored = dict(state.get('config') or {})
    stored.pop('trained_with', None)            # what `auto` chose then: not an option
    started_in = stored.pop('started_in', None) or started_folder(path, stored.get('model_dir'))
    if stored.get('knn_features') == 'recompute':
        stored['knn_features'] = 'network'
    for key in ('data_root', 'eval_root'):
        value = stored.get(key)
        if value and started_in and not os.path.isabs(value) and not os.path.exists(value) \
                and os.path.exists(os.path.join(started_in, value)):
            stored[key] = os.path.normpath(os.path.join(started_in, value))
    return stored


def started_folder(path, model_dir):
    """The folder a run was started in, worked out from its checkpoint's `path` and the
    --model_dir it was given (relative to that folder); None when they do not fit."""
    if not path or not model_dir or os.path.isabs(model_dir):
        return None
    folder, tail = os.path.dirname(os.path.abspath(path)), os.path.normpath(model_dir)
    if tail == '.':
        return folder
    suffix = os.sep + tail
    return folder[:-len(suffix)] or os.sep if folder.endswith(suffix) else None


def unreadable_reason(path, size, err):
    """One sentence on why torch.load failed on `path`, from what the file holds: a PyTorch
    checkpoint is a zip archive with a data.pkl inside (torch.save since 1.6) or a pickle."""
    damaged = (f'checkpoint {path} ({size} bytes) is truncated or damaged: it was not '
               f'completely written or copied')
    with open(path, 'rb') as f:
        head = f.read(2)
    if head == b'PK':
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return damaged
        if not any(name.endswith('data.pkl') for name in names):
            shown_names = ', '.join(names[:3]) + (', ...' if len(names) > 3 else '')
            return (f'{path} is a zip archive holding {shown_names}, not a PyTorch checkpoint: '
                    f'unpack it (unzip) and give the checkpoint inside')
    elif not head.startswith(b'\x80'):          # neither a zip nor a pickle
        return f'{path} is not a PyTorch checkpoint file'
    text = str(err)
    if 'Weights only load failed' in text:
        return (f'{path} holds Python objects other than tensors, numbers and plain '
                f'containers, so it is neither a checkpoint of this program nor of the released '
                f'code, and it is not loaded (unpickling it could run code)')
    return damaged


def writable_folder(folder, flag):
    """Make `folder` (what `flag` names) if it is missing and check that it can be written:
    a UserError in one line if not. Returns the outermost folder it made (None: none), for
    `remove_made` to take back."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f'{flag} {folder} is a file, not a folder')
    made = first_missing(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f'.write-test-{os.getpid()}')
        with open(probe, 'wb') as f:
            f.write(b'0')
        os.remove(probe)
    except OSError as err:
        remove_made(made)
        raise UserError(f'{flag} {folder} cannot be written: {err.strerror or err}') from None
    return made


def first_missing(path):
    """The outermost folder of `path` that does not exist yet (None if it exists)."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
    return missing


def remove_made(made):
    """Remove the folders `writable_folder` made, where they are still empty."""
    if made is None:
        return
    for folder, _, _ in sorted(os.walk(made), key=lambda entry: -len(entry[0])):
        try:
            os.rmdir(folder)
        except OSError:
            pass


def prepare_model_dir(model_dir, checkpoint_bytes=None, log_folder=None):
    """Make `model_dir` ready for a training run, at start-up rather than after hours of
    training (before its data is read): create it (and the TensorBoard `log_folder`, when
    given), check that both can be written, lock it for this process (a UserError naming the
    live run that holds it), remove the temporaries of dead runs, and when `checkpoint_bytes`
    is given check that it has room for checkpoints of that size (`check_room` does it later
    otherwise). A refusal leaves no folder it made. Returns the held RunLock, which the caller
    releases when the run ends."""
    made = writable_folder(log_folder, '--log-dir') if log_folder else None
    try:
        writable_folder(model_dir, '--model_dir')
        lock = run_lock.acquire(model_dir)
    except BaseException:
        remove_made(made)
        raise
    try:
        remove_dead_temporaries(model_dir)
        if checkpoint_bytes is not None:
            check_free_space(model_dir, checkpoint_bytes)
    except BaseException:
        lock.release()
        remove_made(made)
        raise
    return lock


class NoLock:
    """What the processes other than rank 0 hold of the run's folder: nothing."""
    note = None

    def release(self):
        pass


def take_model_dir(model_dir, world, say, log_folder=None):
    """`prepare_model_dir` on rank 0 (the process that writes), checked once; every process
    stops with its UserError if it fails. Returns rank 0's RunLock (its note, on a system
    without file locks, said), or a NoLock."""
    problem, lock = None, NoLock()
    if world.main:
        try:
            lock = prepare_model_dir(model_dir, log_folder=log_folder)
        except UserError as err:
            problem = str(err)
    problem = world.share(problem)
    if problem:
        raise UserError(problem)
    if lock.note:
        say(lock.note)
    return lock


def check_room(model_dir, checkpoint_bytes, world):
    """`check_free_space` on rank 0, once the checkpoints' size is known; every process stops
    with its UserError if there is not enough."""
    problem = None
    if world.main:
        try:
            check_free_space(model_dir, checkpoint_bytes)
        except UserError as err:
            problem = str(err)
    problem = world.share(problem)
    if problem:
        raise UserError(problem)


def remove_dead_temporaries(model_dir):
    """Remove the `*.t7.tmp<pid>` files of processes that no longer exist (a run killed while
    writing); a live process's file is its checkpoint being written, and is left alone."""
    for name in os.listdir(model_dir):
        match = re.fullmatch(r'.+\.t7\.tmp(\d+)', name)
        if match and not run_lock.process_exists(int(match.group(1))):
            try:
                os.remove(os.path.join(model_dir, name))
            except FileNotFoundError:
                pass                # gone meanwhile


def space_needed(model_dir, checkpoint_bytes):
    """Bytes of free space a run writing checkpoints of `checkpoint_bytes` into `model_dir`
    needs: last.t7, ckpt.t7 and the temporary copy of one while it is written, less what the
    last.t7 and ckpt.t7 already there hold (each counted up to `checkpoint_bytes`): they are
    replaced, not added to. Returns (needed, counted as replaced)."""
    replaced = 0
    for name in (LAST, BEST):
        try:
            replaced += min(os.path.getsize(os.path.join(model_dir, name)), checkpoint_bytes)
        except OSError:
            pass                    # not there
    return 3 * checkpoint_bytes - replaced, replaced


def check_free_space(model_dir, checkpoint_bytes):
    """UserError when `model_dir`'s filesystem lacks `space_needed`."""
    needed, replaced = space_needed(model_dir, checkpoint_bytes)
    free = shutil.disk_usage(model_dir).free
    if free < needed:
        counted = (f'; the {replaced / 2**20:.0f} MiB of the checkpoints there, which they '
                   f'replace, already counted' if replaced else '')
        raise UserError(f'--model_dir {model_dir} has {free / 2**20:.0f} MiB free, but the '
                        f'checkpoints need about {needed / 2**20:.0f} MiB more (last.t7, '
                        f'ckpt.t7 and a temporary copy while writing{counted})')


# ----------------------------------------------------------------------------- progress
@dataclass
class Progress:
    """Where a run is: the position to continue from, and its last and best accuracy.
    Accuracies are fractions; None until the first evaluation (and in runs without labels)."""
    round: int = 0
    epoch: int = 0
    step: int = 0                       # > 0: continue inside the epoch (after a stop signal)
    loss_sums: dict = None              # {loss name: sum} of the epoch's first `step` steps
    acc: float = None
    best_acc: float = None
    best_round: int = None
    best_epoch: int = None
    saved: tuple = None                 # (round, epoch) last.t7 holds, for messages
    resumes_at: tuple = None            # (round, epoch, step) last.t7 continues from

    def record(self, round_index, epoch, acc):
        """An epoch was evaluated (acc None without labels): whether it is the best so far."""
        self.round, self.epoch, self.acc = round_index, epoch, acc
        best = acc is None or self.best_acc is None or acc > self.best_acc
        if best:
            self.best_acc, self.best_round, self.best_epoch = acc, round_index, epoch
        return best

    def best_text(self):
        if self.best_acc is None:
            return 'none yet' if self.best_round is None else 'not evaluated'
        return (f'{100 * self.best_acc:.2f}% (round {self.best_round} epoch '
                f'{self.best_epoch})')


def following(round_index, epoch, epochs):
    """The position (round, epoch, step 0) after `epoch` of `round_index` in rounds of
    `epochs` epochs: where a last.t7 written at its end continues."""
    if epoch + 1 < epochs:
        return dict(round=round_index, epoch=epoch + 1, step=0)
    return dict(round=round_index + 1, epoch=0, step=0)


# ----------------------------------------------------------------------------- the formats
def best_state(method, progress, config, fingerprint):
    """ckpt.t7: the released keys, the run's options and its data's fingerprint."""
    return {**method.state_dict(), 'acc': progress.acc, 'round': progress.round,
            'epoch': progress.epoch, 'config': config, 'fingerprint': fingerprint}


def last_state(method, optimizer, progress, next_position, config, fingerprint):
    """last.t7: ckpt.t7's keys, plus the optimizer, the random states, where to continue
    (`next_position`: round, epoch, step and, mid-epoch, loss_sums) and the best so far."""
    state = best_state(method, progress, config, fingerprint)
    state.update(format=LAST_FORMAT, optimizer=optimizer.state_dict(), rng=rng_state(),
                 next=next_position,
                 best={'acc': progress.best_acc, 'round': progress.best_round,
                       'epoch': progress.best_epoch})
    return state


def write(writer, model_dir, method, optimizer, progress, next_position, config, fingerprint,
          is_best):
    """last.t7, and ckpt.t7 when `is_best`, through `writer` (a CheckpointWriter).

    ckpt.t7 goes first. A kill between the two leaves a ckpt.t7 one epoch ahead of last.t7:
    the resume trains that epoch again (and says so: `repeated_epoch_note`) to the same result,
    which is again the best, so ckpt.t7 is written again. The other order would leave a last.t7
    whose `best` names an epoch that ckpt.t7 never got, and nothing would mend that."""
    jobs = [(last_state(method, optimizer, progress, next_position, config, fingerprint),
             os.path.join(model_dir, LAST))]
    if is_best:
        jobs.insert(0, (best_state(method, progress, config, fingerprint),
                        os.path.join(model_dir, BEST)))
    writer.submit(jobs)
    progress.saved = (progress.round, progress.epoch)
    progress.resumes_at = (next_position['round'], next_position['epoch'],
                           next_position.get('step', 0))


def snapshot(value):
    """A copy of a checkpoint dict whose tensors are CPU copies: what training changes in
    place next cannot reach it."""
    if isinstance(value, torch.Tensor):
        return value.detach().to('cpu', copy=True)
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(v) for v in value)
    return value


def os_error_of(error):
    """The OSError `error` is or was raised in handling of (a full disk in torch.save reaches
    the caller as a RuntimeError of its zip writer), or None."""
    seen = set()
    while error is not None and not isinstance(error, OSError) and id(error) not in seen:
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return error if isinstance(error, OSError) else None


class CheckpointWriter:
    """Writes checkpoints in the background, so that training does not wait for the disk
    (a last.t7 of ResNet18 is ~180 MB, and its fsync takes seconds on some disks).

    `submit` copies the state first (to CPU memory; the GPU is synchronised once) and writes it
    in a thread; it first waits for the previous write, so at most one copy is held and files
    are written in order. A kill loses at most the epochs since the last whole file, as every
    file is still written to a temporary name, fsynced and renamed. `then` runs a function
    once everything submitted is on disk (log.jsonl's records: the log never claims an epoch
    that last.t7 cannot continue after), without making training wait. `wait` (at the end of a
    run, and before any message that names a checkpoint) returns once everything is on disk
    and every such function has run, or raises the first error."""

    def __init__(self):
        self._error = None
        self._lock = threading.Lock()
        self._busy, self._after = False, []
        # Set when no write is in flight. `wait` waits on it, not on Thread.join: a Ctrl-C
        # that interrupts a join can leave the thread marked finished while it still writes
        # (CPython's _wait_for_tstate_lock), and the process would then exit mid-write
        # ("terminate called without an active exception") after saying the file is there.
        self._idle = threading.Event()
        self._idle.set()

    def submit(self, jobs):
        self.wait()
        copies = [(snapshot(state), path) for state, path in jobs]
        thread = threading.Thread(target=self._write, args=(copies,), name='checkpoint-writer')
        self._busy = True
        self._idle.clear()
        try:
            thread.start()
        except BaseException:       # no thread (or a Ctrl-C before it ran): nothing in flight
            self._busy = False
            self._idle.set()
            raise

    def then(self, function):
        """Call `function()` once the checkpoints submitted so far are on disk: now when none
        is being written, else in the writer's thread after the last rename (in the order
        given). It is never called for a write that failed."""
        with self._lock:
            if self._error is not None:
                return                # that write failed: the next wait raises its error
            if self._busy:
                self._after.append(function)
                return
        function()

    def _write(self, jobs):
        try:
            self._write_and_follow(jobs)
        finally:
            self._idle.set()

    def _write_and_follow(self, jobs):
        try:
            for state, path in jobs:
                save_atomic(state, path)
        except Exception as err:      # raised in the training thread at the next wait
            cause = os_error_of(err)
            self._fail(err if cause is None else   # no OSError behind it: a bug
                       UserError(f'cannot write checkpoint {path}: {cause.strerror or cause}'))
            return
        while True:
            with self._lock:
                if not self._after:
                    self._busy = False
                    return
                function = self._after.pop(0)
            try:
                function()
            except Exception as err:  # raised in the training thread at the next wait
                self._fail(err)
                return

    def _fail(self, error):
        with self._lock:
            self._error = self._error or error
            self._busy, self._after = False, []

    def wait(self):
        while not self._idle.wait(0.1):     # (an interrupted wait leaves the Event as it was)
            pass
        self._raise()

    def _raise(self):
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def can_continue(state):
    """Whether `state` holds what continuing a run needs (a last.t7), not just weights."""
    return 'optimizer' in state and 'next' in state


# last.t7's layout: 2 keeps the loss sums of a part-done epoch by name. The files of version 1
# (no `format` key) kept them as a list [AND, aug, UE], zeros for the losses a run did not take.
LAST_FORMAT = 2
LEGACY_LOSS_ORDER = ('and', 'aug', 'ue')


def progress_of(state):
    """The Progress a last.t7 continues from (of either format)."""
    nxt, best = state['next'], dict(state.get('best') or {})
    if best.get('acc') is None or best['acc'] < 0:    # older files: -1 meant "none yet"
        best = {}
    acc, sums = state.get('acc'), nxt.get('loss_sums')
    if isinstance(sums, (list, tuple)):
        sums = dict(zip(LEGACY_LOSS_ORDER, sums))
    return Progress(round=nxt['round'], epoch=nxt['epoch'], step=nxt.get('step', 0),
                    loss_sums=sums, acc=acc if acc is None or acc >= 0 else None,
                    best_acc=best.get('acc'), best_round=best.get('round'),
                    best_epoch=best.get('epoch'), saved=(state['round'], state['epoch']),
                    resumes_at=(nxt['round'], nxt['epoch'], nxt.get('step', 0)))


def restore_training(state, optimizer):
    """Optimizer and random states of a last.t7; returns its Progress."""
    optimizer.load_state_dict(state['optimizer'])
    set_rng_state(state.get('rng'))
    return progress_of(state)


# The options that give last.t7's position its images: a step is `batch_size` images of the
# epoch's shuffle, which `seed` draws, and `epochs` numbers the epochs (global_epoch in
# log.jsonl) and places them in the schedule. The rest leave a saved step's images alone: the
# number of processes (a step is the global batch, shared among them), --workers and
# --pipeline (one order for both); what would change the images themselves (--data-root,
# --subset, --dataset) is refused by the data fingerprint, --views and the other components
# by the recipe check.
POSITION_OPTIONS = ('batch_size', 'seed', 'epochs')
MID_EPOCH_CHANGE = {
    'batch_size': 'that step would count other images (some trained twice, some never)',
    'seed': 'the epoch would be shuffled otherwise (some images trained twice, some never)',
    'epochs': 'the epoch would change its schedule halfway'}


def check_resume_position(state, options, path):
    """Refuse (UserError) a resume of the last.t7 `state` whose `options` (the run's options
    now: a dict holding POSITION_OPTIONS and `rounds`) would make its saved position other
    images or other epochs; returns the note lines saying what a change allowed at an epoch
    boundary does. Mid-epoch nothing may change; at a boundary --batch_size and --seed may, and
    --epochs only inside round 0 (later, the epochs already logged would be renumbered)."""
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
        raise UserError(f'{path} stopped inside {where}, after step {nxt["step"]} with {old}; '
                        f'with {new} {why}, so this resume is refused: resume with {old} '
                        f'--stop-after 1 to finish the epoch, then with {new}')
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


def repeated_epoch_note(path, progress):
    """A note when the ckpt.t7 beside the last.t7 at `path` holds the epoch where `progress`
    continues, or a later one: a run killed after writing ckpt.t7 and before last.t7 (written
    in that order), whose epoch is now trained again. None otherwise."""
    best = os.path.join(os.path.dirname(path), BEST)
    if os.path.basename(path) != LAST or not os.path.isfile(best):
        return None
    try:            # mmap: only the two numbers are read, not the tensors
        state = torch.load(best, map_location='cpu', weights_only=True, mmap=True)
        held = (int(state['round']), int(state['epoch']))
    except Exception:     # unreadable, or no position (a released file): nothing to say
        return None
    if held < (progress.round, progress.epoch):
        return None
    return (f'note: {best} holds round {held[0]} epoch {held[1]}, which {path} had not reached '
            f'(the run was stopped between writing the two): training repeats from round '
            f'{progress.round} epoch {progress.epoch}')


def check_data(state, fingerprint, path):
    """Refuse (UserError) a checkpoint whose bank belongs to other training data than
    `fingerprint`. Returns a note for a file without a fingerprint (a released checkpoint),
    else None."""
    stored = state.get('fingerprint')
    if stored is None:
        return (f'note: {path} has no data fingerprint (a released or older checkpoint): '
                f'that its bank belongs to these training images could not be checked')
    if stored != fingerprint:
        what = ('the same number of images, of other content (a file changed, or one removed '
                'and one added)' if stored.get('images') == fingerprint.get('images') else
                f'{abs(fingerprint.get("images", 0) - stored.get("images", 0))} images '
                f'{"more" if fingerprint.get("images", 0) > stored.get("images", 0) else "fewer"}')
        raise UserError(f'checkpoint {path} was trained on other data: it holds '
                        f'{describe_fingerprint(stored)}; --data-root gives '
                        f'{describe_fingerprint(fingerprint)} ({what}); its memory bank has one '
                        f'row per training image, in order, so it needs the data it was '
                        f'trained on: put the folder back as it was, or give --data-root a '
                        f'copy of it (a new run on the data as it is now starts afresh)')
    return None


# ----------------------------------------------------------------------------- random states
def rng_state():
    state = {'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, device_count=None):
    """Restore the CPU state and the CUDA state of each GPU that exists here (a run resumed on
    fewer GPUs than it was saved on keeps the first ones; on more, the others stay seeded)."""
    if state and 'torch' in state:
        torch.set_rng_state(state['torch'])
    if state and state.get('cuda') and torch.cuda.is_available():
        count = torch.cuda.device_count() if device_count is None else device_count
        for index, cuda_state in enumerate(state['cuda'][:count]):
            torch.cuda.set_rng_state(cuda_state, index)
