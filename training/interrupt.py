"""Stopping a training run on Ctrl-C / SIGTERM without losing it.

The first SIGINT or SIGTERM only records the signal: the trainer finishes the update in
progress (and the evaluation or checkpoint it was due), writes ``checkpoint.pth`` atomically
and returns; the entry point prints the command that resumes the run and exits 128 + signal
(130 for SIGINT, 143 for SIGTERM), as a shell reports a process killed by that signal.
Later signals are ignored while it does so: under torchrun a worker receives Ctrl-C twice
(from the terminal, then forwarded by torchrun), and the second must not cut the checkpoint
short. torchrun gives its workers 30 s after forwarding before it SIGKILLs them.

Data-loader worker processes ignore both signals (:func:`ignore_stop_signals` as their
``worker_init_fn``): Ctrl-C reaches the whole process group, and a worker that died of it
would fail the batch the trainer is finishing.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """``with StopSignals() as stop:`` ... ``stop.signum`` is the first stop signal received
    (None until then). Handlers are installed only in the main thread (elsewhere Python does
    not allow it, and nothing is recorded); the previous handlers come back on exit."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _record(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum


def exit_code(signum: int) -> int:
    """The shell's status for a process stopped by ``signum`` (130 SIGINT, 143 SIGTERM)."""
    return 128 + int(signum)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of data-loader workers: the main process decides when to stop."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
