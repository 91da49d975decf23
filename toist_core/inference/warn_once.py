"""Warn once per key, remembering a bounded number of keys.

Untrained-task warnings are given once per task: per id, or per caption for free text. Captions
are unbounded (a robot fed generated task phrases sends a new one every time), so the keys kept
are the most recent ``limit``: a caption seen again after that many others is warned about again,
and memory stays flat.
"""

from __future__ import annotations

import collections
import threading
from typing import Hashable

WARN_ONCE_LIMIT = 256


class WarnOnce:
    """``first(key)`` is True the first time ``key`` is seen (among the last ``limit`` keys)."""

    def __init__(self, limit: int = WARN_ONCE_LIMIT) -> None:
        self._seen: collections.OrderedDict = collections.OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def first(self, key: Hashable) -> bool:
        with self._lock:
            if key in self._seen:
                self._seen.move_to_end(key)
                return False
            self._seen[key] = None
            if len(self._seen) > self._limit:
                self._seen.popitem(last=False)
            return True

    def __len__(self) -> int:
        return len(self._seen)


__all__ = ["WARN_ONCE_LIMIT", "WarnOnce"]
