"""Running statistics of the node and their ``/diagnostics`` message.

``RateMeter`` (events per second over a sliding window) and ``Percentiles`` (p50/p95 of the
last N samples) are thread-safe and cheap to update from callbacks and the inference thread.
``diagnostic_array`` turns a flat report into ``diagnostic_msgs/DiagnosticArray``.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Optional

import numpy as np

OK, WARN, ERROR = 0, 1, 2  # diagnostic_msgs/DiagnosticStatus levels (bytes on the wire)


class RateMeter:
    """Events per second over the last ``window_s`` seconds; over the time since the first event
    when the events in the window span less of it (a stream that started or resumed moments ago
    is not averaged with the silence before it)."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self._times: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self.count = 0

    def tick(self, now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._times.append(now)
            self.count += 1
            self._trim(now)

    def rate(self, now: Optional[float] = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            count = len(self._times)
            span = now - self._times[0] if count else 0.0
            if count < 2 or span >= 0.9 * self.window_s or span <= 0:
                return count / self.window_s
            return (count - 1) / span  # intervals between the events seen, over their span

    def _trim(self, now: float) -> None:
        while self._times and self._times[0] < now - self.window_s:
            self._times.popleft()


class Percentiles:
    """p50 / p95 (or any quantile) over the last ``size`` samples."""

    def __init__(self, size: int = 300) -> None:
        self._values: collections.deque = collections.deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, value: float) -> None:
        with self._lock:
            self._values.append(float(value))

    def quantiles(self, *qs: float) -> tuple[float, ...]:
        """Quantiles in [0, 1]; NaN for each when there is no sample yet."""
        with self._lock:
            values = np.asarray(self._values, dtype=np.float64)
        if values.size == 0:
            return tuple(float("nan") for _ in qs)
        return tuple(float(v) for v in np.quantile(values, qs))

    def __len__(self) -> int:
        return len(self._values)


class Counters:
    """Named counters (drops, rejects by reason, errors), safe to bump from any thread."""

    def __init__(self) -> None:
        self._counts: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def add(self, name: str, amount: int = 1) -> int:
        with self._lock:
            self._counts[name] += amount
            return self._counts[name]

    def get(self, name: str) -> int:
        with self._lock:
            return self._counts[name]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def process_memory_mb() -> float:
    """Resident set size of this process in MiB (Linux /proc; NaN elsewhere)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def return_free_memory() -> bool:
    """Give the C allocator's free pages back to the system (glibc's ``malloc_trim``). Each
    activation's inference thread allocates in a malloc arena of its own, and what it freed stayed
    with the process: 40 lifecycle activate / deactivate cycles grew the RSS by ~200 MiB. False
    where there is no glibc (nothing to do there)."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def device_memory(device: Any) -> dict[str, str]:
    """Memory figures for the model's device: CUDA allocated/reserved/peak, and the process RSS."""
    out = {"process rss MiB": f"{process_memory_mb():.1f}"}
    if str(device).startswith("cuda"):
        import torch

        mib = 1024.0 * 1024.0
        out["cuda allocated MiB"] = f"{torch.cuda.memory_allocated(device) / mib:.1f}"
        out["cuda reserved MiB"] = f"{torch.cuda.memory_reserved(device) / mib:.1f}"
        out["cuda peak allocated MiB"] = f"{torch.cuda.max_memory_allocated(device) / mib:.1f}"
    return out


def fmt_ms(value: float) -> str:
    return "n/a" if value != value else f"{value:.1f}"


def diagnostic_array(stamp: Any, name: str, hardware_id: str, level: int, message: str, values: dict[str, Any]):
    """A ``diagnostic_msgs/DiagnosticArray`` with one status whose key/values are ``values``."""
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

    status = DiagnosticStatus()
    status.level = bytes([level])
    status.name = name
    status.message = message
    status.hardware_id = hardware_id
    status.values = [KeyValue(key=str(k), value=str(v)) for k, v in values.items()]
    array = DiagnosticArray()
    array.header.stamp = stamp
    array.status = [status]
    return array
