"""Stopping a training run on Ctrl-C / SIGTERM without losing it.

The first SIGINT or SIGTERM is only recorded (:class:`toist_core.stop_signals.StopSignals`):
the trainer finishes the update in progress (and the evaluation or checkpoint it was due),
writes ``checkpoint.pth`` atomically and returns; the entry point prints the command that
resumes the run and exits 128 + signal (130 for SIGINT, 143 for SIGTERM), as a shell reports a
process killed by that signal. torchrun gives its workers 30 s after forwarding a signal before
it SIGKILLs them.

Data-loader worker processes ignore both signals (:func:`ignore_stop_signals` as their
``worker_init_fn``): Ctrl-C reaches the whole process group, and a worker that died of it
would fail the batch the trainer is finishing.
"""

from __future__ import annotations

import signal

from toist_core.stop_signals import STOP_SIGNALS

__all__ = ["exit_code", "ignore_stop_signals"]


def exit_code(signum: int) -> int:
    """The shell's status for a process stopped by ``signum`` (130 SIGINT, 143 SIGTERM)."""
    return 128 + int(signum)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of data-loader workers: the main process decides when to stop."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
