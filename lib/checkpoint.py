"""The two checkpoint formats, written whole and read back with a sentence on what is wrong.

`ckpt.t7` (the best kNN so far) is the released layout, `net npc ANs_discovery acc round
epoch` (`net` with the `module.` prefix the released code's DataParallel expects), so the
released code and ours read each other's files; ours add `config` (the run's options) and
`fingerprint` (of the training data), which the released code ignores.

`last.t7`, written after every epoch (and at a stop signal, mid-epoch), adds what continuing
needs: `optimizer`, `rng`, `next` (round, epoch and step to continue from, with the loss sums
of a part-done epoch) and `best`.

Every write goes to a temporary file that is fsynced, then renamed over the old one: a run
killed mid-write leaves the previous checkpoint whole. What a resume may do: lib/resume.py.
"""
import hashlib
import os
import zipfile
from dataclasses import dataclass

import torch

from datasets import describe_file, shown

from .errors import UserError
from .run_folder import BEST, LAST, temporary

# last.t7's layout: 2 keeps the loss sums of a part-done epoch by name. The files of version 1
# (no `format` key) kept them as a list [AND, aug, UE], zeros for the losses a run did not take.
LAST_FORMAT = 2
LEGACY_LOSS_ORDER = ('and', 'aug', 'ue')


# ----------------------------------------------------------------------------- the formats
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
    """Where a last.t7 written at the end of `epoch` of `round_index` continues."""
    if epoch + 1 < epochs:
        return dict(round=round_index, epoch=epoch + 1, step=0)
    return dict(round=round_index + 1, epoch=0, step=0)


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
    the resume trains that epoch again (and says so: resume.repeated_epoch_note) to the same
    result, which is again the best, so ckpt.t7 is written again. The other order would leave
    a last.t7 whose `best` names an epoch that ckpt.t7 never got, and nothing would mend that."""
    jobs = [(last_state(method, optimizer, progress, next_position, config, fingerprint),
             os.path.join(model_dir, LAST))]
    if is_best:
        jobs.insert(0, (best_state(method, progress, config, fingerprint),
                        os.path.join(model_dir, BEST)))
    writer.submit(jobs)
    progress.saved = (progress.round, progress.epoch)
    progress.resumes_at = (next_position['round'], next_position['epoch'],
                           next_position.get('step', 0))


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


# ----------------------------------------------------------------------------- writing
def save_atomic(state, path, write=None):
    """Write `state` to `path` whole or not at all: to `path.tmp<pid>` by `write(state, file)`
    (None: torch.save; tools/embed.py's .npz files pass their own), fsynced, renamed over
    `path`, and the rename made durable (the folder fsynced), so a kill or power loss leaves
    either the old file or the new one. A failed write (a full disk) removes its temporary."""
    tmp = temporary(path)
    try:
        with open(tmp, 'wb') as f:
            (write or torch.save)(state, f)
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


def checkpoint_digest(path):
    """The first 16 hex digits of the SHA-1 of a checkpoint file's bytes: the same file (the
    same weights) on every process or machine, and for the embeddings made with it."""
    digest = hashlib.sha1()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 24), b''):
            digest.update(block)
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- reading
# What to do about a file that is something else than a checkpoint (datasets.describe_file;
# a zip archive without data.pkl is found by `unreadable_reason`).
UNPACK = {'a gzip archive': 'gunzip, or tar xzf for a .tar.gz', 'a tar archive': 'tar xf',
          'a bzip2 archive': 'bunzip2, or tar xjf', 'an xz archive': 'unxz, or tar xJf',
          'a 7-Zip archive': '7z x', 'a RAR archive': 'unrar x', 'a zip archive': 'unzip'}
FOREIGN_FILE_HINTS = {
    'an HTML page': 'a download that got a web page (a sign-in or error page) instead of the '
                    'file saves this; download the checkpoint again',
    'a Git LFS pointer (a small text file that stands for the real file, which was never '
    'fetched)': 'fetch the real file (git lfs pull) and give it',
    **{kind: f'unpack it ({how}) and give the checkpoint inside' for kind, how in UNPACK.items()}}


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
    elsewhere = ''
    if len(looked_in) > 1:
        here = ' in this folder' if os.path.dirname(looked_in[1]) == '' else ''
        elsewhere = f' (nor at {looked_in[1]}{here})'
    raise UserError(f'no checkpoint at {looked_in[0]}{elsewhere}{not_yet_written(looked_in[0])}')


def not_yet_written(path):
    """Where `path` (a missing checkpoint) is in a run's folder: why it may not be there yet
    (the first epoch not finished; only last.t7 of a run stopped in its first epoch)."""
    folder, name = os.path.split(path)
    if not os.path.isfile(os.path.join(folder or '.', 'log.jsonl')):
        return ''
    run = f'the run in {shown(folder or os.curdir)}'
    held = [written for written in (BEST, LAST) if os.path.isfile(os.path.join(folder, written))]
    if not held:
        return (f': {run} has written none yet (the first is written at the end of its first '
                f'epoch)')
    if name == BEST and held == [LAST]:
        return (f': {run} has last.t7 only (ckpt.t7 is written once an epoch is evaluated): '
                f'give {os.path.join(folder, LAST)}')
    return f': {run} holds {" and ".join(held)}'


def load(path):
    """The checkpoint dict at `path`, or a UserError saying in one sentence what is wrong."""
    if os.path.isdir(path):
        raise UserError(f'{path} is a folder, not a checkpoint file: give a checkpoint in it, '
                        f'e.g. {os.path.join(path, BEST)}')
    if not os.path.isfile(path):
        raise UserError(f'no checkpoint at {path}{not_yet_written(path)}')
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
    """The options the checkpoint's run had ({} for a released file), in today's words (before
    --knn-features took 'network' it was 'recompute'); data folders relative to where the run
    started given whole when not found from here, and its TensorBoard folder whole when it
    continues from another folder (`path`, the checkpoint's, tells where runs started that did
    not record it)."""
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
    log_dir = stored.get('log_dir')     # (where the run's TensorBoard events already are)
    if log_dir and started_in and not os.path.isabs(log_dir) and \
            os.path.realpath(started_in) != os.path.realpath(os.getcwd()):
        stored['log_dir'] = os.path.normpath(os.path.join(started_in, log_dir))
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
                    + FOREIGN_FILE_HINTS['a zip archive'])
    elif not head.startswith(b'\x80'):          # neither a zip nor a pickle
        return f'{path} is not a PyTorch checkpoint file'
    text = str(err)
    if 'Weights only load failed' in text:
        return (f'{path} holds Python objects other than tensors, numbers and plain '
                f'containers, so it is neither a checkpoint of this program nor of the released '
                f'code, and it is not loaded (unpickling it could run code)')
    return damaged
