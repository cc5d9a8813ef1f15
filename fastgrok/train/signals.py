"""Stopping on a signal: SIGINT/SIGTERM make a running Trainer checkpoint and raise Interrupted.

A grid's worker process leaves SIGINT to its driver (`only(SIGTERM)`), and a SIGTERM it receives outside
a Trainer's run is noted (`note_stop`) for the next run, which then checkpoints and stops at its first
chance instead of training its batch.
"""
from __future__ import annotations

import signal

_stop_signals = (signal.SIGINT, signal.SIGTERM)
_pending: int | None = None


class Interrupted(Exception):
    """Raised after a checkpoint was written because the process was asked to stop."""


def only(*signals: int) -> None:
    """The signals a Trainer stops on in this process (a grid worker: SIGTERM alone)."""
    global _stop_signals
    _stop_signals = tuple(signals)


def note_stop(signum: int | None) -> None:
    """A stop signal received outside a Trainer's run (None: forget it): the next run stops at once."""
    global _pending
    _pending = signum


class StopSignals:
    """Within `with StopSignals() as stop:`, the stop signals set `stop.signal` (a second one raises
    KeyboardInterrupt: stop now) instead of their usual action; a pending one (note_stop) is already set."""

    def __init__(self):
        self.signal: int | None = _pending
        self._old = {}

    def __enter__(self) -> "StopSignals":
        try:
            for sig in _stop_signals:
                self._old[sig] = signal.signal(sig, self._on_signal)
        except ValueError:          # not the main thread: no handlers, checkpoints still happen
            self._old = {}
        return self

    def __exit__(self, *exc) -> None:
        for sig, h in self._old.items():
            signal.signal(sig, h)

    def _on_signal(self, signum, frame) -> None:
        if self.signal is not None:         # second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum
