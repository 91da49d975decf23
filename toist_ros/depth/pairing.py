"""Pairing a colour frame with the depth frame taken at the same time (no ROS, thread-safe).

Depth callbacks ``put`` each checked depth image into a ring per camera and return; nothing waits
on them. The ring keeps the depth images that arrived in the last ``HORIZON_S`` seconds (at least
the ``BUFFER_FRAMES`` newest, at most ``MAX_FRAMES`` or ``MAX_BYTES``): a colour frame is paired
after it waited in its slot for the frame before it and then went through the model, so up to
two inference periods after it arrived (a ring of the 8 newest, a quarter second at 30 Hz and
less at 60-90 Hz, had lost the matching image of any model slower than ~0.15 s). What is kept is
decided by arrival, not by stamp: one image stamped far off (an hour ahead, 0, a bag that loops)
then takes only its own slot (and, while it is the latest to arrive, a frame's wait for depth),
where judged by the newest stamp it had made every other image look too old. The horizon is wall
time: a bag played at half speed keeps 0.75 s of its stamps. The inference thread asks for the depth of a colour frame *after* the model
has run on it (so a depth image that arrives a few milliseconds after its colour image is there
by then) and gets the buffered one whose ``header.stamp`` is closest, if within ``max_dt_s``.
When none is that close yet but one still could come (depth arrives, but the latest image is
not newer than the colour stamp yet), it waits at most ``wait_s`` for it.
The latest-frame policy is kept: a colour frame never waits for more than ``wait_s``, and depth
never queues. CameraInfo messages are kept the same way and the one stamped closest to the colour
frame is used (a camera's intrinsics rarely change, but a zoom or a resolution switch does).
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from toist_ros.depth.geometry import Intrinsics

BUFFER_FRAMES = 8               # always kept (and CameraInfos: the newest this many)
HORIZON_S = 1.5                 # depth images that arrived longer ago are dropped
MAX_FRAMES = 64                 # at most, whatever their stamps (unstamped cameras: all stamps 0)
MAX_BYTES = 256 * 1024 * 1024   # ... and at most this much depth (depth.buffer_mb; 1080p 32FC1: 8 MiB an image)

PAIRED, MISSING, UNSYNCED = "paired", "missing", "unsynced"


def stamp_ns(stamp: Any) -> int:
    """A ``builtin_interfaces/Time`` (``header.stamp``) in nanoseconds, the buffer's key."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


@dataclass(frozen=True)
class CameraModel:
    """The colour camera's latest CameraInfo, checked."""

    intrinsics: Intrinsics
    frame_id: str
    distorted: bool


@dataclass(frozen=True)
class Pairing:
    """The outcome for one colour frame: ``status`` PAIRED (``depth`` and ``camera`` set, ``offset_s``
    = depth stamp - colour stamp), MISSING (no depth image or no CameraInfo yet) or UNSYNCED (depth
    images, none within ``max_dt_s``; ``offset_s`` of the closest)."""

    status: str
    depth: Any = None
    camera: Optional[CameraModel] = None
    offset_s: float = float("nan")
    evicted: bool = False   # not PAIRED because the ring's image or byte cap dropped this frame's depth


class DepthBuffer:
    """Recent depth images of one camera (by ``header.stamp`` in nanoseconds) and its CameraInfo.

    ``clock``: monotonic seconds, what arrivals and ``wait_s`` are measured with (tests)."""

    def __init__(self, horizon_s: float = HORIZON_S, max_frames: int = MAX_FRAMES, max_bytes: int = MAX_BYTES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._frames: collections.deque = collections.deque()  # (stamp_ns, depth, arrival), arrival order
        self._cameras: collections.deque = collections.deque(maxlen=BUFFER_FRAMES)  # (stamp_ns, CameraModel)
        self._cond = threading.Condition()
        self._horizon_s = float(horizon_s)
        self._max_frames = max_frames
        self._max_bytes = max_bytes
        self._bytes = 0
        self._clock = clock
        self.received = 0
        # (stamp_ns, arrival) of images the image or byte cap (not their age) dropped, the newest
        # few hundred: a frame whose depth is among them, and would still be kept but for the cap
        # (arrived within the horizon), is told it was evicted (raise depth.buffer_mb).
        self._capped: collections.deque = collections.deque(maxlen=4 * max_frames)

    def put(self, stamp_ns: int, depth: Any) -> None:
        with self._cond:
            now = self._clock()
            self._frames.append((int(stamp_ns), depth, now))
            self._bytes += _nbytes(depth)
            self.received += 1
            since = now - self._horizon_s
            while len(self._frames) > BUFFER_FRAMES and (
                    len(self._frames) > self._max_frames or self._bytes > self._max_bytes
                    or self._frames[0][2] < since):
                stamp, dropped, arrived = self._frames.popleft()
                self._bytes -= _nbytes(dropped)
                if arrived >= since:   # not its age: the cap dropped it
                    self._capped.append((stamp, arrived))
            self._cond.notify_all()

    def clear(self) -> None:
        """Forget every depth image and camera model (the node stopped taking them)."""
        with self._cond:
            self._frames.clear()
            self._cameras.clear()
            self._capped.clear()
            self._bytes = 0

    def __len__(self) -> int:
        with self._cond:
            return len(self._frames)

    def set_camera(self, camera: CameraModel, stamp_ns: int = 0) -> None:
        with self._cond:
            self._cameras.append((int(stamp_ns), camera))

    def _camera_at(self, stamp_ns: int) -> Optional[CameraModel]:
        best = min(reversed(self._cameras), key=lambda item: abs(item[0] - stamp_ns), default=None)
        return None if best is None else best[1]

    def pair(self, stamp_ns: int, max_dt_s: float, wait_s: float = 0.0) -> Pairing:
        """The depth image for a colour frame stamped ``stamp_ns`` (see the module docstring)."""
        tolerance = int(max_dt_s * 1e9)
        deadline = self._clock() + max(0.0, wait_s)
        with self._cond:
            while True:
                candidates = self._candidates(stamp_ns)
                # Newest first: of equally close images (unstamped frames: every stamp 0) the newest wins.
                best = min(reversed(candidates), key=lambda item: abs(item[0] - stamp_ns), default=None)
                if best is not None and abs(best[0] - stamp_ns) <= tolerance:
                    camera = self._camera_at(stamp_ns)
                    if camera is None:
                        return Pairing(MISSING)
                    return Pairing(PAIRED, best[1], camera, (best[0] - stamp_ns) * 1e-9)
                # Wait only for a camera that sends depth now: with none received, or none for the
                # horizon (a stopped stream), no frame waits; nor once the latest image to arrive
                # is stamped after the frame (its own came before).
                now = self._clock()
                since = now - self._horizon_s
                could_come = (bool(candidates) and candidates[-1][2] >= since
                              and candidates[-1][0] < stamp_ns + tolerance)
                remaining = deadline - now
                if not could_come or remaining <= 0:
                    # Its own image was there, and the cap dropped it while its age would have kept it.
                    evicted = stamp_ns > 0 and any(abs(stamp - stamp_ns) <= tolerance and arrived >= since
                                                   for stamp, arrived in self._capped)
                    if best is None:
                        return Pairing(MISSING, evicted=evicted)
                    return Pairing(UNSYNCED, offset_s=(best[0] - stamp_ns) * 1e-9, evicted=evicted)
                self._cond.wait(remaining)

    def _candidates(self, stamp_ns: int) -> list:
        """The buffered images a frame stamped ``stamp_ns`` may be paired with: all of them, or for
        an unstamped frame those that arrived within the horizon. Stamps cannot tell an unstamped
        camera's old depth from new (every stamp is 0), so after its depth stream stopped the last
        image would be paired for ever."""
        if stamp_ns != 0:
            return list(self._frames)
        since = self._clock() - self._horizon_s
        return [item for item in self._frames if item[2] >= since]


def _nbytes(depth: Any) -> int:
    return int(getattr(depth, "nbytes", 0))


__all__ = ["stamp_ns", "BUFFER_FRAMES", "HORIZON_S", "MAX_BYTES", "MAX_FRAMES", "CameraModel", "DepthBuffer", "MISSING", "PAIRED", "Pairing", "UNSYNCED"]
