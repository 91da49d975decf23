"""Pairing a colour frame with the depth frame taken at the same time (no ROS, thread-safe).

Depth callbacks ``put`` each checked depth image into a ring per camera and return; nothing waits
on them. The ring keeps the depth images of the last ``HORIZON_S`` seconds (by stamp; at least the
``BUFFER_FRAMES`` newest, at most ``MAX_FRAMES`` or ``MAX_BYTES``): a colour frame is paired after
it waited in its slot for the frame before it and then went through the model, so up to two
inference periods after its stamp (a ring of the 8 newest, a quarter second at 30 Hz and less at
60-90 Hz, had lost the matching image of any model slower than ~0.15 s). The inference thread asks
for the depth of a colour frame *after* the model has run on it (so a depth image that arrives a
few milliseconds after its colour image is there by then) and gets the buffered one whose
``header.stamp`` is closest, if within ``max_dt_s``. When none is that close yet but one still
could come (depth arrives, but nothing newer than the colour stamp yet), it waits at most ``wait_s``
for it.
The latest-frame policy is kept: a colour frame never waits for more than ``wait_s``, and depth
never queues. CameraInfo messages are kept the same way and the one stamped closest to the colour
frame is used (a camera's intrinsics rarely change, but a zoom or a resolution switch does).
A depth image stamped out of line with its stream is set aside until the next one says whether it
was a stray (dropped) or the first of a jump of the camera's clock (the ring starts again):
:class:`Arrival`.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

from toist_ros.depth.geometry import Intrinsics

BUFFER_FRAMES = 8               # always kept (and CameraInfos: the newest this many)
HORIZON_S = 1.5                 # depth images older than the newest by more are dropped
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


class Arrival(NamedTuple):
    """What :meth:`DepthBuffer.put` made of an image. One stamped out of line with the stream
    (more than the horizon from the newest stamp kept, and its stamp moved more than the horizon
    further or less than the stream clock since the last image kept: one image stamped 0 or an
    hour ahead, one delivered seconds after the others) is set aside; if the next one is in line
    with the stream, it was a stray and is dropped (``stray_s``: how far off it was); if the
    next one is in line with it instead, the camera's clock jumped (a bag that loops, a driver
    restarted; ``jump_s``): the ring starts again from the two. ``kept``: images that went into
    the ring (0: set aside)."""

    jump_s: Optional[float] = None
    stray_s: Optional[float] = None
    kept: int = 0


def _pending_off(pending: tuple, last: Optional[tuple]) -> float:
    """Seconds the image set aside, ``pending`` ((stamp_ns, arrival, depth)), was off the line
    of ``last`` ((stamp_ns, arrival))."""
    if last is None:
        return float("nan")
    return ((pending[0] - last[0]) - (pending[1] - last[1]) * 1e9) * 1e-9


class DepthBuffer:
    """Recent depth images of one camera (by ``header.stamp`` in nanoseconds) and its CameraInfo.

    ``clock``: monotonic seconds, what ``pair`` measures ``wait_s`` with (tests);
    ``stream_clock``: seconds on the clock the camera stamps by (the node's ROS clock: sim time
    under use_sim_time; default ``clock``), what says whether a stamp is in line (:class:`Arrival`)."""

    def __init__(self, horizon_s: float = HORIZON_S, max_frames: int = MAX_FRAMES, max_bytes: int = MAX_BYTES,
                 clock: Callable[[], float] = time.monotonic,
                 stream_clock: Optional[Callable[[], float]] = None) -> None:
        self._frames: collections.deque = collections.deque()  # (stamp_ns, depth, arrival), arrival order
        self._cameras: collections.deque = collections.deque(maxlen=BUFFER_FRAMES)  # (stamp_ns, CameraModel)
        self._cond = threading.Condition()
        self._horizon_ns = int(horizon_s * 1e9)
        self._max_frames = max_frames
        self._max_bytes = max_bytes
        self._bytes = 0
        self._clock = clock
        self._stream_clock = clock if stream_clock is None else stream_clock
        self.received = 0
        self._forget_frames()

    def put(self, stamp_ns: int, depth: Any) -> "Arrival":
        """Keep ``depth``, unless its stamp is out of line with the stream's (see :class:`Arrival`)."""
        stamp_ns = int(stamp_ns)
        arrival, now = self._clock(), self._stream_clock()
        with self._cond:
            self.received += 1
            newest = max((item[0] for item in self._frames), default=None)
            off_ns = self._off_line_ns(stamp_ns, now, newest, self._last)
            outcome = Arrival(kept=1)
            if off_ns is not None:
                pending, self._pending = self._pending, None
                if pending is None or self._off_line_ns(stamp_ns, now, pending[0], pending[:2]) is not None:
                    # Alone out of line (so far): set aside; a second image in line with it is a jump.
                    self._pending = (stamp_ns, now, depth, arrival)
                    return Arrival(stray_s=None if pending is None else _pending_off(pending, self._last))
                # Two images agree on a new time line: the camera's clock jumped (a bag that
                # loops, a driver restarted). Kept, the old stamps would drop every new image as
                # too old (or the new ones the old), and the cap's mark from the old time line
                # would call frames of the new one evicted.
                self._forget_frames()
                self._keep(pending[0], pending[2], pending[3], pending[1])
                outcome = Arrival(jump_s=off_ns * 1e-9, kept=2)
            elif self._pending is not None:   # the image set aside was a stray: this one is in line
                outcome = Arrival(stray_s=_pending_off(self._pending, self._last), kept=1)
                self._pending = None
            self._keep(stamp_ns, depth, arrival, now)
            self._cond.notify_all()
        return outcome

    def _off_line_ns(self, stamp_ns: int, now: float, newest_ns: Optional[int],
                     last: Optional[tuple]) -> Optional[int]:
        """How far ``stamp_ns`` is off the stream's line, when it is: more than the horizon from
        the newest stamp kept (``newest_ns``) *and* its step from the image kept last (``last``:
        (stamp_ns, stream clock)) more than the horizon longer or shorter than the time between
        them on the stream clock (the node's: sim time under use_sim_time); else None. A stream
        that pauses, or sends every few seconds, moves both alike; late images flushed together
        after a stall are stamped near the newest. An unstamped camera (stamps 0) is never off
        line; one image stamped 0 in a stamped stream is."""
        if last is None or newest_ns is None or (stamp_ns == 0 and last[0] == 0):
            return None
        if abs(stamp_ns - newest_ns) <= self._horizon_ns:
            return None
        off = (stamp_ns - last[0]) - int((now - last[1]) * 1e9)
        return off if abs(off) > self._horizon_ns else None

    def _keep(self, stamp_ns: int, depth: Any, arrival: float, now: float) -> None:
        self._frames.append((stamp_ns, depth, arrival))
        self._bytes += _nbytes(depth)
        self._last = (stamp_ns, now)
        newest = max(item[0] for item in self._frames)
        while len(self._frames) > BUFFER_FRAMES and (
                len(self._frames) > self._max_frames or self._bytes > self._max_bytes
                or self._frames[0][0] < newest - self._horizon_ns):
            stamp, dropped, _ = self._frames.popleft()
            self._bytes -= _nbytes(dropped)
            if stamp >= newest - self._horizon_ns:  # within the horizon: the cap dropped it
                self._capped_until = max(self._capped_until, stamp)

    def clear(self) -> None:
        """Forget every depth image and camera model (the node stopped taking them)."""
        with self._cond:
            self._forget_frames()
            self._cameras.clear()

    def _forget_frames(self) -> None:
        self._frames.clear()
        self._bytes = 0
        self._capped_until = -1
        self._last = None      # (stamp_ns, stream clock) of the image kept last: the stream's line
        self._pending = None   # (stamp_ns, stream clock, depth, arrival): one image out of line, set aside

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
                # Newest first: of equally close images (unstamped frames: every stamp 0) the newest wins.
                best = min(reversed(self._candidates(stamp_ns)), key=lambda item: abs(item[0] - stamp_ns),
                           default=None)
                if best is not None and abs(best[0] - stamp_ns) <= tolerance:
                    camera = self._camera_at(stamp_ns)
                    if camera is None:
                        return Pairing(MISSING)
                    return Pairing(PAIRED, best[1], camera, (best[0] - stamp_ns) * 1e-9)
                # Wait only for a camera that sends depth: with none received yet, or none recent
                # enough to pair (an unstamped camera's stopped stream), no frame waits.
                newest = max((item[0] for item in self._candidates(stamp_ns)), default=None)
                could_come = newest is not None and newest < stamp_ns + tolerance
                remaining = deadline - self._clock()
                if not could_come or remaining <= 0:
                    # Older than every image kept, and the cap dropped images as recent as it.
                    evicted = (stamp_ns > 0 and stamp_ns - tolerance <= self._capped_until
                               and all(item[0] > stamp_ns + tolerance for item in self._frames))
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
        since = self._clock() - self._horizon_ns * 1e-9
        return [item for item in self._frames if item[2] >= since]


def _nbytes(depth: Any) -> int:
    return int(getattr(depth, "nbytes", 0))


__all__ = ["stamp_ns", "Arrival", "BUFFER_FRAMES", "HORIZON_S", "MAX_BYTES", "MAX_FRAMES", "CameraModel", "DepthBuffer", "MISSING", "PAIRED", "Pairing", "UNSYNCED"]
