"""Stopping a run cleanly: SIGTERM (a scheduler's preemption, `kill`) or Ctrl-C asks the
training loop to write last.t7 at the next step boundary and exit, instead of dying with the
epoch in progress lost. The first signal is answered at once with a line saying so; a second
Ctrl-C interrupts at once (KeyboardInterrupt, which the entry point turns into exit code 130).
"""
import os
import signal
import sys
import threading

NAMES = {signal.SIGINT: 'Ctrl-C', signal.SIGTERM: 'SIGTERM'}


def write_line(text):
    """One line on stdout, unbuffered: safe inside a signal handler (a print there can collide
    with the print the handler interrupted: `RuntimeError: reentrant call`), and quiet when
    nobody reads (a closed pipe)."""
    try:
        sys.stdout.flush()
        descriptor = sys.stdout.fileno()
    except (OSError, ValueError, RuntimeError):     # no file behind stdout (captured in tests)
        sys.stdout.write(text + '\n')
        return
    try:
        os.write(descriptor, (text + '\n').encode(errors='backslashreplace'))
    except OSError:
        pass


def silent(text):
    """The `say` of the processes that do not print (all but the main one)."""


class StopSignals:
    """Context manager; calling it says whether a stop was asked for. `say` prints the answer
    to the first signal (a no-op on the processes that do not print)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, say=write_line):
        self.received = None
        self.say = say
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame):
        if self.received is not None:
            if signum == signal.SIGINT:
                # (what last.t7 then holds, the training loop says: it knows)
                raise KeyboardInterrupt('interrupted: stopped at once (a second Ctrl-C)')
            return
        self.received = signum
        again = '; Ctrl-C again to quit at once' if signum == signal.SIGINT else ''
        self.say(f'{NAMES.get(signum, signum)}: stopping at the next step, after writing '
                 f'last.t7{again}')

    def __call__(self):
        return self.received is not None

    @property
    def name(self):
        return NAMES.get(self.received, 'nothing') if self.received is not None else 'nothing'


def ignore_interrupts(worker_id=None):
    """For loader worker processes: Ctrl-C, and SIGTERM from a scheduler or `kill -- -PGID`,
    reach a whole process group, but only the main process decides how to stop. A worker that
    got them would die under the loader, or answer them with the handler it inherited on fork
    (a second stop line). So each worker leaves the group for one of its own; the main process
    shuts its workers down when it stops, and can still end one that hangs (SIGTERM to the
    worker itself, which PyTorch's worker answers by exiting)."""
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
