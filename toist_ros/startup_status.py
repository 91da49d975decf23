"""``/diagnostics`` while the node starts.

The model loads, the start-up task is encoded and the network warms up before any executor
spins, so no timer can report then: that takes seconds (a real TOIST checkpoint on a robot,
tens of seconds), and a monitor saw no status at all, as if the node were not there. A thread
publishes the status "starting: <step>" at ERROR level every ``diagnostics.period_s`` until the
node is ready (or failed), when the regular report takes over.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

from toist_ros.health import ERROR


class StartupStopped(Exception):
    """A stop was asked for while the node started: raised at the next step (a lifecycle
    transition runs in an executor thread, which a signal cannot interrupt)."""


class StartupDiagnostics:
    """``with StartupDiagnostics(publish, period_s) as startup: startup.step("loading the model")``.

    ``publish(level, message)`` sends one report; it is called at once for every step and then
    every ``period_s`` seconds from a thread of its own, until the ``with`` block ends.
    ``stop``: set when a stop is asked for; the next :meth:`step` then raises :class:`StartupStopped`."""

    def __init__(self, publish: Callable[[int, str], None], period_s: float,
                 stop: Optional[threading.Event] = None) -> None:
        self._publish = publish
        self._stop = stop
        self._period_s = period_s
        self._step = "starting"
        self._lock = threading.Lock()  # one report at a time: the thread's and a step's
        self._done = threading.Event()
        # Waited on instead of Thread.join: Python 3.11's join, interrupted by a signal's
        # exception, marks a thread still running as stopped, and a second join returns at once.
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._run, name="toist_startup_diagnostics", daemon=True)

    def __enter__(self) -> "StartupDiagnostics":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        try:
            self._ended.wait()
        except BaseException:
            # A stop signal raised here (start-up is interruptible): the thread must still end
            # before the node it publishes through is destroyed. Only the first signal raises.
            self._ended.wait()
            raise

    def step(self, name: str) -> None:
        """The start-up step now under way, reported at once (unless a stop was asked for)."""
        if self._stop is not None and self._stop.is_set():
            raise StartupStopped(f"stopped before {name!r} (a stop signal)")
        self._step = name
        self._report()

    def _run(self) -> None:
        try:
            while not self._done.wait(self._period_s):
                self._report()
        finally:
            self._ended.set()

    def _report(self) -> None:
        with self._lock:
            if not self._done.is_set():
                self._publish(ERROR, f"starting: {self._step}")
