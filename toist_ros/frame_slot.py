"""The hand-over between image callbacks and the inference thread: one latest-frame slot per camera.

Image callbacks ``put`` and return at once; a frame that was still waiting is replaced and
counted as dropped, so the inference thread always gets the newest frame and never a
backlog. With several cameras ``take`` serves the camera that has waited longest: since its
slot was filled, a replacing frame keeping the slot's place (had the newest frame's arrival
counted, a camera faster than the model would always be the youngest waiting and never served
while another camera had a frame waiting). So the cameras are served in turn. One-shot requests (the ``segment_image``
service) go through ``put_request``: queued in order, never dropped, served before frames, but
never twice in a row while a frame waits (four clients calling back to back stopped every camera:
its frames only replaced each other).

A camera's frames reach the model in time order: a frame older than the newest one already put
for its camera (by ``order_ns``: header stamp, else arrival) is dropped, not stored, so a big
compressed frame whose decode finished after a smaller, newer one's can never be published after
it. Only within ``REORDER_WINDOW_NS``: a frame older by more than that means the clock went back
(a bag played again, a simulator reset), and it starts the order afresh.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Optional

REORDER_WINDOW_NS = 1_000_000_000
STORED, REPLACED, OLDER = "stored", "replaced", "older"   # what ``put`` did


class FrameSlots:
    def __init__(self, num_sources: int = 1) -> None:
        if num_sources < 1:
            raise ValueError(f"need at least one source, got {num_sources}")
        self._cond = threading.Condition()
        self._frames: list[Optional[tuple[float, Any]]] = [None] * num_sources
        self._requests: collections.deque = collections.deque()
        self._closed = False
        self._request_served_last = False
        self.received = [0] * num_sources   # frames put, per source
        self.dropped = [0] * num_sources        # frames replaced before inference took them, per source
        self.out_of_order = [0] * num_sources   # frames older than one already put (dropped), per source
        self._newest_ns = [0] * num_sources

    def put(self, source: int, frame: Any, order_ns: int = 0) -> str:
        """Store ``frame`` as the newest of ``source`` unless it is older than the newest put
        (``order_ns``: its time in ns; 0 = unknown, never compared). Returns ``STORED``,
        ``REPLACED`` (stored; a waiting frame was dropped) or ``OLDER`` (dropped itself)."""
        with self._cond:
            self.received[source] += 1
            newest = self._newest_ns[source]
            if 0 < order_ns < newest and newest - order_ns <= REORDER_WINDOW_NS:
                self.out_of_order[source] += 1
                return OLDER
            if order_ns > 0:
                self._newest_ns[source] = order_ns
            waiting = self._frames[source]
            replaced = waiting is not None
            self._frames[source] = (waiting[0] if replaced else time.monotonic(), frame)  # its place in the turn
            if replaced:
                self.dropped[source] += 1
            self._cond.notify()
            return REPLACED if replaced else STORED

    def put_request(self, request: Any) -> Optional[int]:
        """Queue a one-shot request; it is served before any frame (but a waiting frame goes
        between two requests). The number of requests queued before it, counted as it is queued;
        None (not queued) once closed: nobody would take it."""
        with self._cond:
            if self._closed:
                return None
            ahead = len(self._requests)
            self._requests.append(request)
            self._cond.notify()
            return ahead

    def take(self, timeout: Optional[float] = None) -> Optional[tuple[str, Any, int]]:
        """The next work item: ``("request", request, -1)`` or ``("frame", frame, source)``.

        Waits up to ``timeout`` seconds (None: until something arrives); None on timeout or close.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed:
                    return None
                waiting = [(item[0], source) for source, item in enumerate(self._frames) if item is not None]
                if self._requests and not (waiting and self._request_served_last):
                    self._request_served_last = True
                    return "request", self._requests.popleft(), -1
                if waiting:
                    self._request_served_last = False
                    _, source = min(waiting)
                    _, frame = self._frames[source]
                    self._frames[source] = None
                    return "frame", frame, source
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def pending_requests(self) -> list:
        """Remove and return the queued requests (to answer them when shutting down)."""
        with self._cond:
            out = list(self._requests)
            self._requests.clear()
            return out

    def close(self) -> None:
        """Wake every waiting ``take`` (it returns None from now on)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def drop_waiting(self) -> int:
        """Drop the frames waiting (counted per source); returns how many."""
        with self._cond:
            left = 0
            for source, item in enumerate(self._frames):
                if item is not None:
                    self.dropped[source] += 1
                    left += 1
            self._frames = [None] * len(self._frames)
            return left

    def reopen(self) -> None:
        """Take frames and requests again after :meth:`close` (a lifecycle node activated again).
        Frames left from before are the caller's to drop first (:meth:`drop_waiting`, counted):
        they are as old as the pause."""
        with self._cond:
            self._newest_ns = [0] * len(self._frames)
            self._closed = False
