"""A run's folder (--model_dir): its checkpoints' names, one live run at a time, and the
checks made before the data is read rather than after hours of training. No torch here: the
commands name the files while they parse their flags.

One live run: `run.lock`, flock'ed by the run that writes there (training, on rank 0). Not a
pid file: the kernel releases an flock however its process dies, so a killed run's folder is
never locked, with no guessing from a pid that may since be another process's. The file is
kept (its text only names the live run), except by a run that recorded nothing: that one takes
back what it made (`RunLock.release`), and a run that then locks the unlinked file tries again.
"""
import errno
import json
import os
import re
import shutil
import socket
import time

try:
    import fcntl
except ImportError:           # not on Windows: no lock there, said once at start-up
    fcntl = None

from .errors import UserError
from .run_log import LOG_NAME

BEST, LAST = 'ckpt.t7', 'last.t7'       # the best kNN epoch; where the run continues from
LOCK_NAME = 'run.lock'
TEMPORARY = re.compile(r'.+\.(?:t7|npz)\.tmp(\d+)')    # a checkpoint's or .npz's `temporary`


def temporary(path):
    """Where this process writes `path` before renaming it over `path` (save_atomic)."""
    return f'{path}.tmp{os.getpid()}'


# ----------------------------------------------------------------------------- the lock
class RunLock:
    """The lock of one model folder, held until `release` (or the process's end). `note` is a
    line to print when the folder could not be locked (no file locks there). RunLock() holds
    nothing: what --test_only and the processes other than rank 0 hold."""
    made, before = (), None         # prepare_model_dir's: what `release` may take back

    def __init__(self, path=None, handle=None, note=None):
        self.path, self._handle, self.note = path, handle, note

    @property
    def held(self):
        return self._handle is not None

    def release(self):
        """Unlock. A run that recorded nothing (refused, failed or interrupted before its first
        checkpoint or log record) removes the files and empty folders it made, nothing else."""
        recorded = False
        if self.before is not None:
            before, self.before, now = self.before, None, footprint(os.path.dirname(self.path))
            recorded = any(now.get(name) != before.get(name) for name in (LOG_NAME, LAST, BEST))
            if not recorded:
                # run.lock and config.json where new, removed while locked (a run waiting on
                # the lock then finds it unlinked and locks anew: `acquire`)
                for name in set(now) - set(before):
                    if name == LOCK_NAME and not (self.held and same_file(self._handle,
                                                                          self.path)):
                        continue        # (another run's lock now: never removed)
                    try:
                        os.remove(os.path.join(os.path.dirname(self.path), name))
                    except OSError:
                        pass
        if self._handle is not None:
            handle, self._handle = self._handle, None
            try:
                handle.truncate(0)  # names no run once it ended (a killed one's name stays)
            except OSError:
                pass
            handle.close()          # closing the last descriptor releases the flock
        made, self.made = self.made, ()
        for folders in made if not recorded else ():
            remove_made(folders)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def acquire(model_dir):
    """The RunLock of the existing folder `model_dir`; a UserError naming the live run that
    holds it. Without file locks it holds nothing and says so in `note`; the run goes on."""
    path = os.path.join(model_dir, LOCK_NAME)
    unlocked = f'so a second run in {model_dir} at the same time is not refused'
    if fcntl is None:
        return RunLock(path, note=f'note: this system has no file locks, {unlocked}')
    try:
        handle = open(path, 'a+')
    except FileNotFoundError:       # a refused run removed the folder it made meanwhile
        os.makedirs(model_dir, exist_ok=True)
        return acquire(model_dir)
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            handle.close()
            return RunLock(path, note=f'note: {path} cannot be locked ({err.strerror or err}), '
                                      f'{unlocked}')
        handle.seek(0)
        holder = describe_holder(handle.read())
        handle.close()
        raise UserError(f'--model_dir {model_dir} is in use by a live run ({holder}): wait for '
                        f'it to end or stop it, or give this run another --model_dir') from None
    if not same_file(handle, path):     # its refused holder removed it (and the folder, if
        handle.close()                  # it made it) before this lock: lock the new one
        os.makedirs(model_dir, exist_ok=True)
        return acquire(model_dir)
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                             'started': time.strftime('%Y-%m-%d %H:%M:%S')}) + '\n')
    handle.flush()
    return RunLock(path, handle)


def same_file(handle, path):
    """Whether the open `handle` is the file at `path` now (by inode, not by the link count,
    which NFS keeps at 1 for a removed file still open)."""
    held, now = os.fstat(handle.fileno()), _stat(path)
    return now is not None and (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


def footprint(model_dir):
    """{name: (inode, size, modified)} of the files in `model_dir` that a run writes."""
    names = (LOG_NAME, LAST, BEST, 'config.json', LOCK_NAME)
    return {name: (stat.st_ino, stat.st_size, stat.st_mtime_ns) for name in names
            if (stat := _stat(os.path.join(model_dir, name)))}


def _stat(path):
    try:
        return os.stat(path)
    except OSError:
        return None


def describe_holder(text):
    """'process 123, started 2026-11-27 17:28:48' (and its host when not this one) from the
    lock file's text; the holder writes it just after locking, so it may still be empty."""
    try:
        holder = json.loads(text)
        pid, started = int(holder['pid']), holder['started']
    except (ValueError, KeyError, TypeError):
        return 'a process that has not yet written its id'
    host = holder.get('host')
    where = f' on {host}' if host and host != socket.gethostname() else ''
    return f'process {pid}{where}, started {started}'


def process_exists(pid):
    """Whether a process with id `pid` exists on this machine (signal 0 probes it)."""
    if pid <= 0:                     # 0 and negative ids name process groups, not a process
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:          # it exists, under another user
        return True
    except (ProcessLookupError, OverflowError):
        return False
    return True


# ----------------------------------------------------------------------------- start-up
def refuse_file(folder, flag):
    """UserError when `folder` (what `flag` names) is a file."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f'{flag} {folder} is a file, not a folder')


def writable_folder(folder, flag):
    """Make `folder` (what `flag` names) if it is missing and check that it can be written
    (a UserError if not). Returns the folders it made, innermost first, for `remove_made` to
    take back."""
    refuse_file(folder, flag)
    made, path = [], os.path.abspath(folder)
    while not os.path.exists(path):
        made.append(path)
        path = os.path.dirname(path)
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


def remove_made(made):
    """Remove the folders `writable_folder` made (innermost first) while they are empty: never
    a folder it did not make, nor one something was put in."""
    for folder in made:
        try:
            os.rmdir(folder)
        except OSError:
            return


def prepare_model_dir(model_dir, checkpoint_bytes=None, log_folder=None, refuse=None):
    """Make `model_dir` (and the TensorBoard `log_folder`) a writable folder, lock it, call
    `refuse` (a check that may raise), remove the temporaries of dead runs, and check its room
    for checkpoints of `checkpoint_bytes` (None: `check_room` does, later). A refusal leaves
    nothing it made, and so does the run it returns the lock of if it records nothing."""
    lock = RunLock()                # (holds nothing until acquired)
    made = lock.made = []
    try:
        if log_folder:
            made.append(writable_folder(log_folder, '--log-dir'))
        made.append(writable_folder(model_dir, '--model_dir'))
        before = footprint(model_dir)
        lock = acquire(model_dir)
        lock.made, lock.before = made, before
        if refuse is not None:
            refuse()
        remove_dead_temporaries(model_dir)
        if checkpoint_bytes is not None:
            check_free_space(model_dir, checkpoint_bytes)
    except BaseException:
        lock.release()
        raise
    return lock


def on_rank_0(world, check):
    """`check()` on rank 0 (the process that writes), its result returned there; every
    process stops with its UserError if it fails."""
    problem, result = None, None
    if world.main:
        try:
            result = check()
        except UserError as err:
            problem = str(err)
        except Exception:           # a bug: its traceback here, and the others do not wait
            world.share('rank 0 failed while preparing --model_dir (its traceback says why)')
            raise
    problem = world.share(problem)
    if problem:
        raise UserError(problem)
    return result


def take_model_dir(model_dir, world, say, log_folder=None, refuse=None):
    """`prepare_model_dir` on rank 0: its RunLock (its note said), a RunLock() elsewhere."""
    lock = on_rank_0(world, lambda: prepare_model_dir(model_dir, log_folder=log_folder,
                                                      refuse=refuse)) or RunLock()
    if lock.note:
        say(lock.note)
    return lock


def check_room(model_dir, checkpoint_bytes, world):
    """`check_free_space` on rank 0, once the checkpoints' size is known."""
    on_rank_0(world, lambda: check_free_space(model_dir, checkpoint_bytes))


def remove_dead_temporaries(model_dir):
    """Remove the `*.t7.tmp<pid>` and `*.npz.tmp<pid>` files of processes that no longer exist
    (a run or a tool killed while writing); a live process's file is being written, and is left
    alone."""
    for name in os.listdir(model_dir):
        match = TEMPORARY.fullmatch(name)
        if match and not process_exists(int(match.group(1))):
            try:
                os.remove(os.path.join(model_dir, name))
            except FileNotFoundError:
                pass                # gone meanwhile


def space_needed(model_dir, checkpoint_bytes):
    """(bytes free `model_dir` needs for checkpoints of `checkpoint_bytes`, bytes counted as
    replaced): last.t7, ckpt.t7 and a temporary copy, less what those already there hold (each
    up to `checkpoint_bytes`), which they replace."""
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
