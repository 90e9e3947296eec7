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
from dataclasses import dataclass

import torch

from datasets import describe_fingerprint

from .errors import UserError

BEST, LAST = 'ckpt.t7', 'last.t7'


# ----------------------------------------------------------------------------- files
def save_atomic(state, path):
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def resolve_path(model_dir, name, in_folder=LAST):
    """The checkpoint file that --resume or --init-from `name` means. A bare file name
    (last.t7) is looked for in `model_dir` first, as released, then here; a path with a folder
    in it (checkpoint/quick/ckpt.t7, which already includes the model dir) is taken as typed
    when it exists, else looked for in `model_dir`. A folder (a model dir) means its
    `in_folder` file: last.t7 to continue a run, ckpt.t7 to evaluate it or start from it."""
    joined = os.path.join(model_dir, name)
    typed_first = os.path.dirname(os.path.normpath(name)) != ''
    for candidate in dict.fromkeys([name, joined] if typed_first else [joined, name]):
        if os.path.isdir(candidate):
            return os.path.join(candidate, in_folder)
        if os.path.exists(candidate):
            return candidate
    raise UserError(f'no checkpoint at {joined}' + (f' (nor at {name})' if joined != name
                                                      else ''))


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
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:   # torch.load raises many types; each means an unusable file
        raise UserError(unreadable_reason(path, size, err)) from None
    if not isinstance(state, dict) or not {'net', 'npc'} <= set(state):
        keys = sorted(map(str, state))[:8] if isinstance(state, dict) else type(state).__name__
        raise UserError(f'{path} is not a Super-AND checkpoint: it needs the keys net and npc, '
                        f'and holds {keys}')
    return state


def unreadable_reason(path, size, err):
    """One sentence on why torch.load failed on `path`."""
    text = str(err)
    if isinstance(err, EOFError) or 'central directory' in text or 'truncated' in text \
            or 'zip archive' in text:
        return (f'checkpoint {path} ({size} bytes) is truncated or damaged: it was not '
                f'completely written or copied')
    if 'Weights only load failed' in text:
        return (f'{path} holds Python objects other than tensors, numbers and plain '
                f'containers, so it is neither a checkpoint of this program nor of the released '
                f'code, and it is not loaded (unpickling it could run code)')
    return f'{path} is not a PyTorch checkpoint file'


def prepare_model_dir(model_dir, needed_bytes):
    """Create `model_dir`, check that it can be written and holds `needed_bytes` more, and
    remove temporaries a killed run left behind: at start-up, not after hours of training."""
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise UserError(f'--model_dir {model_dir} is a file, not a folder')
    try:
        os.makedirs(model_dir, exist_ok=True)
        probe = os.path.join(model_dir, f'.write-test-{os.getpid()}')
        with open(probe, 'wb') as f:
            f.write(b'0')
        os.remove(probe)
    except OSError as err:
        raise UserError(f'--model_dir {model_dir} cannot be written: '
                        f'{err.strerror or err}') from None
    free = shutil.disk_usage(model_dir).free
    if free < needed_bytes:
        raise UserError(f'--model_dir {model_dir} has {free / 2**20:.0f} MiB free, but the '
                        f'checkpoints need about {needed_bytes / 2**20:.0f} MiB (last.t7, '
                        f'ckpt.t7 and a temporary copy while writing)')
    for name in os.listdir(model_dir):
        if re.fullmatch(r'.+\.t7\.tmp\d+', name):
            os.remove(os.path.join(model_dir, name))


# ----------------------------------------------------------------------------- progress
@dataclass
class Progress:
    """Where a run is: the position to continue from, and its last and best accuracy.
    Accuracies are fractions; None until the first evaluation (and in runs without labels)."""
    round: int = 0
    epoch: int = 0
    step: int = 0                       # > 0: continue inside the epoch (after a stop signal)
    loss_sums: list = None              # the loss sums of the epoch's first `step` steps
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
    """The (round, epoch) after `epoch` of `round_index` in rounds of `epochs` epochs."""
    return (round_index, epoch + 1) if epoch + 1 < epochs else (round_index + 1, 0)


# ----------------------------------------------------------------------------- the formats
def best_state(method, progress, config, fingerprint):
    """ckpt.t7: the released keys, the run's options and its data's fingerprint."""
    return {**method.state_dict(), 'acc': progress.acc, 'round': progress.round,
            'epoch': progress.epoch, 'config': config, 'fingerprint': fingerprint}


def last_state(method, optimizer, progress, next_position, config, fingerprint):
    """last.t7: ckpt.t7's keys, plus the optimizer, the random states, where to continue
    (`next_position`: round, epoch, step and, mid-epoch, loss_sums) and the best so far."""
    state = best_state(method, progress, config, fingerprint)
    state.update(optimizer=optimizer.state_dict(), rng=rng_state(), next=next_position,
                 best={'acc': progress.best_acc, 'round': progress.best_round,
                       'epoch': progress.best_epoch})
    return state


def write(writer, model_dir, method, optimizer, progress, next_position, config, fingerprint,
          is_best):
    """last.t7, and ckpt.t7 when `is_best`, through `writer` (a CheckpointWriter)."""
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


class CheckpointWriter:
    """Writes checkpoints in the background, so that training does not wait for the disk
    (a last.t7 of ResNet18 is ~180 MB, and its fsync takes seconds on some disks).

    `submit` copies the state first (to CPU memory; the GPU is synchronised once) and writes it
    in a thread; it first waits for the previous write, so at most one copy is held and files
    are written in order. A kill loses at most the epochs since the last whole file, as every
    file is still written to a temporary name, fsynced and renamed. `wait` (at the end of a run,
    and before any message that names a checkpoint) returns once everything is on disk, or
    raises the write's error."""

    def __init__(self):
        self._thread, self._error = None, None

    def submit(self, jobs):
        self.wait()
        copies = [(snapshot(state), path) for state, path in jobs]
        self._thread = threading.Thread(target=self._write, args=(copies,),
                                        name='checkpoint-writer')
        self._thread.start()

    def _write(self, jobs):
        try:
            for state, path in jobs:
                save_atomic(state, path)
        except OSError as err:
            self._error = UserError(f'cannot write checkpoint {path}: {err.strerror or err}')
        except Exception as err:      # anything else is a bug: raised in the training thread
            self._error = err

    def wait(self):
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise()

    def _raise(self):
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def can_continue(state):
    """Whether `state` holds what continuing a run needs (a last.t7), not just weights."""
    return 'optimizer' in state and 'next' in state


def progress_of(state):
    """The Progress a last.t7 continues from."""
    nxt, best = state['next'], dict(state.get('best') or {})
    if best.get('acc') is None or best['acc'] < 0:    # older files: -1 meant "none yet"
        best = {}
    acc = state.get('acc')
    return Progress(round=nxt['round'], epoch=nxt['epoch'], step=nxt.get('step', 0),
                    loss_sums=nxt.get('loss_sums'), acc=acc if acc is None or acc >= 0 else None,
                    best_acc=best.get('acc'), best_round=best.get('round'),
                    best_epoch=best.get('epoch'), saved=(state['round'], state['epoch']),
                    resumes_at=(nxt['round'], nxt['epoch'], nxt.get('step', 0)))


def restore_training(state, optimizer):
    """Optimizer and random states of a last.t7; returns its Progress."""
    optimizer.load_state_dict(state['optimizer'])
    set_rng_state(state.get('rng'))
    return progress_of(state)


def check_data(state, fingerprint, path):
    """Refuse (UserError) a checkpoint whose bank belongs to other training data than
    `fingerprint`. Returns a note for a file without a fingerprint (a released checkpoint),
    else None."""
    stored = state.get('fingerprint')
    if stored is None:
        return (f'note: {path} has no data fingerprint (a released or older checkpoint): '
                f'that its bank belongs to these training images could not be checked')
    if stored != fingerprint:
        raise UserError(f'checkpoint {path} was trained on other data: it holds '
                        f'{describe_fingerprint(stored)}; --data-root gives '
                        f'{describe_fingerprint(fingerprint)}')
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
