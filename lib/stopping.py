"""Stopping a run cleanly: SIGTERM (a scheduler's preemption, `kill`) or Ctrl-C asks the
training loop to write last.t7 at the next step boundary and exit, instead of dying with the
epoch in progress lost. A second Ctrl-C interrupts at once."""
import signal
import threading


class StopSignals:
    """Context manager; calling it says whether a stop was asked for."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = None
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
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __call__(self):
        return self.received is not None

    @property
    def name(self):
        return signal.Signals(self.received).name if self.received is not None else 'nothing'
