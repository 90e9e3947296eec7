"""Checkpoints written in the background, so that training does not wait for the disk (a
last.t7 of ResNet18 is ~180 MB, and its fsync takes seconds on some disks)."""
import threading

import torch

from . import checkpoint
from .errors import UserError


class CheckpointWriter:
    """`submit` copies the state first (to CPU memory; the GPU is synchronised once) and writes
    it in a thread; it first waits for the previous write, so at most one copy is held and files
    are written in order. A kill loses at most the epochs since the last whole file, as every
    file is still written atomically (`checkpoint.save_atomic`). `then` runs a function once
    everything submitted is on disk (log.jsonl's records: the log never claims an epoch that
    last.t7 cannot continue after), without making training wait. `wait` (at the end of a run,
    and before any message that names a checkpoint) returns once everything is on disk and
    every such function has run, or raises the first error. `held()` (optional) ends the line
    of a file that could not be written (a full disk): what is on disk, and what to do."""

    def __init__(self, held=None):
        self._held = held
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
        """Write each (state, path) of `jobs`, in order."""
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
                checkpoint.save_atomic(state, path)
        except Exception as err:      # raised in the training thread at the next wait
            cause = os_error_of(err)
            held = f'; {self._held()}' if self._held is not None else ''
            self._fail(err if cause is None else   # no OSError behind it: a bug
                       UserError(f'cannot write checkpoint {path}: {cause.strerror or cause}'
                                 f'{held}'))
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
        if self._error is not None:
            error, self._error = self._error, None
            raise error


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
