"""Stopping a run cleanly: SIGTERM (a scheduler's preemption, `kill`), SIGHUP (the terminal
closed) or Ctrl-C asks the training loop to write last.t7 at the next step boundary and exit,
instead of dying with the epoch in progress lost. The first signal is answered at once with a
line saying so; a second Ctrl-C interrupts at once (KeyboardInterrupt, which the entry point
turns into exit code 130). With several processes the stop happens at a step they agree on,
and what is written is said once it is (a process may be gone: no promise before).

After SIGHUP the terminal is gone: the run's output that went to it goes nowhere from then on
(as under nohup), so that no write to the closed terminal can end the run; the stop is in
log.jsonl.
"""
import os
import signal
import stat
import sys
import threading
from contextlib import contextmanager

NAMES = {signal.SIGINT: 'Ctrl-C', signal.SIGTERM: 'SIGTERM', signal.SIGHUP: 'SIGHUP'}
# Set when a training loop's StopSignals ends without an error (its files written), cleared by
# each stopped_at_once(): a signal in the moments left (the run folder's unlock) is ignored,
# not answered with "nothing was trained or written".
TRAINING_ENDED = threading.Event()


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
    to the first signal (a no-op on the processes that do not print); `processes` > 1: the
    stop waits for a step every process agrees on."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self, say=write_line, processes=1):
        self.received = None
        self.say = say
        self.processes = processes
        self.closing = False
        self.finishing = False      # training is over: its last checkpoint is being written
        self._previous = {}

    def __enter__(self):
        self._previous = install(self._handle, self.SIGNALS)
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
            # An error is on its way to its one line: a signal now (torchrun ends the other
            # processes when one fails) must not kill the process before it is said. The
            # handlers stay, ignoring signals; `restore()` puts the previous ones back.
            self.closing = True
            return False
        if exc_type is None:
            TRAINING_ENDED.set()
        self.restore()
        return False

    def restore(self):
        previous, self._previous = self._previous, {}
        put_back(previous)

    def _handle(self, signum, frame):
        if self.closing:
            return
        if self.received is not None:
            if signum == signal.SIGINT:
                # (what last.t7 then holds, the training loop says: it knows)
                raise KeyboardInterrupt('interrupted: stopped at once (a second Ctrl-C)')
            return
        self.received = signum
        if signum == signal.SIGHUP:
            detach_from_terminal()
        again = '; Ctrl-C again to quit at once' if signum == signal.SIGINT else ''
        if self.finishing:
            self.say(f'{NAMES.get(signum, signum)}: the run is ending: it stops once its last '
                     f'checkpoint is written{again}')
        elif self.processes > 1:
            self.say(f'{NAMES.get(signum, signum)}: stopping at a step all '
                     f'{self.processes} processes agree on{again}')
        else:
            self.say(f'{NAMES.get(signum, signum)}: stopping at the next step, after writing '
                     f'last.t7{again}')

    def __call__(self):
        return self.received is not None

    @property
    def name(self):
        """The signal received ('SIGTERM'), or, when the processes agreed to stop on another
        process's signal, saying so."""
        if self.received is None:
            return 'a stop signal to another process'
        return NAMES.get(self.received, str(self.received))


class StoppedAtOnce(KeyboardInterrupt):
    """A stop signal before training (or in an evaluation): out at once, with a line and the
    signal's exit code (128 + its number: 130 for Ctrl-C)."""

    def __init__(self, signum):
        super().__init__(f'stopped by {NAMES[signum]}: nothing was trained or written')
        self.exit_code = 128 + signum


@contextmanager
def stopped_at_once():
    """SIGTERM, SIGHUP and Ctrl-C end the start-up (checkpoint, data, network) and an
    evaluation: StoppedAtOnce, whose line says that nothing was trained or written and whose
    run takes back the folder it made, where the default action of the first two killed the
    process and left its run.lock. Training answers them itself (StopSignals, which puts these
    handlers back after it)."""
    def stop(signum, frame):
        if signum == signal.SIGHUP:
            detach_from_terminal()
        if not TRAINING_ENDED.is_set():
            raise StoppedAtOnce(signum)
    TRAINING_ENDED.clear()
    previous = install(stop, (signal.SIGTERM, signal.SIGHUP, signal.SIGINT))
    try:
        yield
    finally:
        put_back(previous)


@contextmanager
def signal_handlers_kept():
    """The stop signals' handlers as they were, put back on the way out: a run that fails
    leaves StopSignals' (which then ignore signals) until its error has been said."""
    previous = {sig: signal.getsignal(sig) for sig in StopSignals.SIGNALS} \
        if threading.current_thread() is threading.main_thread() else {}
    try:
        yield
    finally:
        put_back(previous)


def install(handler, signals):
    """`handler` for each of `signals` (in the main thread: only it may set them); returns
    {signal: the handler it replaced} for `put_back`. An ignored signal stays ignored: `nohup`
    ignores SIGHUP so that closing the terminal does not stop the run, and a shell's
    background job ignores Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in signals
            if signal.getsignal(sig) is not signal.SIG_IGN}


def put_back(previous):
    """The handlers `install` replaced, back."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def detach_from_terminal():
    """Standard output and error onto /dev/null where they are a terminal (one that hung up:
    every write to it would fail, and isatty no longer says it is one, so any character
    device is taken for it); files and pipes are kept."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    for descriptor in (1, 2):
        try:
            if stat.S_ISCHR(os.fstat(descriptor).st_mode):
                os.dup2(null, descriptor)
        except OSError:
            pass
    os.close(null)


def ignore_interrupts(worker_id=None):
    """For loader worker processes: Ctrl-C, and SIGTERM from a scheduler or `kill -- -PGID`,
    reach a whole process group, but only the main process decides how to stop. A worker that
    got them would die under the loader, or answer them with the handler it inherited on fork
    (a second stop line). So each worker leaves the group for one of its own; the main process
    shuts its workers down when it stops, and can still end one that hangs (SIGTERM to the
    worker itself, which PyTorch's worker answers by exiting)."""
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
