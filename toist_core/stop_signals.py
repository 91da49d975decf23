"""SIGINT and SIGTERM as a request to stop, recorded for the program to act on when it can.

Both the training loop (finish the update, write the checkpoint) and the ROS node (shut down
in the order rclpy needs) stop at a point of their own choosing rather than wherever a
``KeyboardInterrupt`` would land. The first signal is kept; later ones are ignored while the
program stops (under torchrun a worker receives Ctrl-C twice: from the terminal, then forwarded).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """``with StopSignals() as stop:`` ... ``stop.signum`` is the first stop signal received (None
    until then), ``stop.requested`` whether there was one. Handlers are installed only in the main
    thread (elsewhere Python does not allow it, and nothing is recorded); the previous handlers
    come back on exit."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        # Set with the first signal, for code that looks at its own steps (a KeyboardInterrupt that
        # ``raising`` sends can be lost: raised inside a __del__, Python prints it and goes on).
        self.event = threading.Event()
        self._previous: dict[int, object] = {}
        self._raising = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def raising(self) -> Iterator[None]:
        """Inside, the first stop signal also raises ``KeyboardInterrupt`` where the main thread
        is (as soon as the C call under way returns): for work with no point at which to look for
        a request, such as a model loading for seconds. One received before raises on entry."""
        if self.requested:
            raise KeyboardInterrupt
        self._raising = True
        try:
            yield
        finally:
            self._raising = False

    def _record(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            self.event.set()
            if self._raising:
                raise KeyboardInterrupt
