"""How a message names some of many things: ``"a, b, c and 4 more"``.

Errors list what was wrong (tensors, files, keys) but stay readable when thousands are; one
wording for the whole package. Imports nothing, so the ROS launch path and the data tools use it
without loading torch.
"""

from __future__ import annotations

from typing import Iterable


def listing(items: Iterable[object], limit: int = 5) -> str:
    """The first ``limit`` items (as text, comma-separated) and how many more there are."""
    items = list(items)
    shown = ", ".join(str(item) for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


__all__ = ["listing"]
