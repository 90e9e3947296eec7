"""One live run per model folder: `model_dir/run.lock`, held by the run that writes there.

Why an flock'ed file rather than a pid file: the kernel releases an flock when the process that
holds it dies in any way (SIGKILL, a crash, power loss: the lock is not on disk), so a folder left
by a killed run is never locked, with no guessing from a pid that may since belong to another
process or machine. The file itself stays (it is never deleted: a second run could otherwise lock
an unlinked copy); what it holds (pid, host, start time) only names the live run in the refusal.

Only the processes that write a folder take the lock: a training run (fresh, `--resume`,
`--init-from`) on rank 0. `--test_only` and the analysis commands only read and never take it.
"""
import errno
import json
import os
import socket
import time

try:
    import fcntl
except ImportError:           # not on Windows: no lock there, said once at start-up
    fcntl = None

from .errors import UserError

LOCK_NAME = 'run.lock'


class RunLock:
    """The lock of one model folder, held until `release` (or the process's end).
    `note` is a line to print when the folder could not be locked (no file locks there)."""

    def __init__(self, path, handle=None, note=None):
        self.path, self._handle, self.note = path, handle, note

    @property
    def held(self):
        return self._handle is not None

    def release(self):
        if self._handle is not None:
            handle, self._handle = self._handle, None
            try:
                handle.truncate(0)  # names no run once it ended (a killed one's name stays)
            except OSError:
                pass
            handle.close()          # closing the last descriptor releases the flock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def acquire(model_dir):
    """Lock the existing folder `model_dir` for this process; returns the RunLock.

    Raises UserError naming the live run (process id, host, start time) when another process
    holds it. On a filesystem without file locks the RunLock holds nothing and says so in
    `note`: the run goes on, as before this lock existed."""
    path = os.path.join(model_dir, LOCK_NAME)
    if fcntl is None:
        return RunLock(path, note=f'note: this system has no file locks, so a second run in '
                                  f'{model_dir} at the same time is not refused')
    handle = open(path, 'a+')
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            handle.close()
            return RunLock(path, note=f'note: {path} cannot be locked ({err.strerror or err}), '
                                      f'so a second run in {model_dir} at the same time is not '
                                      f'refused')
        handle.seek(0)
        holder = describe_holder(handle.read())
        handle.close()
        raise UserError(f'--model_dir {model_dir} is in use by a live run ({holder}): wait for '
                        f'it to end or stop it, or give this run another --model_dir') from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                             'started': time.strftime('%Y-%m-%d %H:%M:%S')}) + '\n')
    handle.flush()
    return RunLock(path, handle)


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
    except ProcessLookupError:
        return False
    except PermissionError:          # it exists, under another user
        return True
    except OverflowError:
        return False
    return True
