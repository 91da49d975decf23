"""JSON that every parser reads: Python's ``json`` writes NaN / Infinity tokens, which are not
JSON (jq, JavaScript and strict parsers refuse the file); here a value that is not a finite
number is written as ``null`` ("unknown")."""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_null(value: Any) -> Any:
    """``value`` with every non-finite float inside (dicts, lists, tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def dumps_null_for_nan(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`finite_or_null` (``value``); ``kwargs`` as ``json.dumps``'s."""
    return json.dumps(finite_or_null(value), allow_nan=False, **kwargs)


__all__ = ["dumps_null_for_nan", "finite_or_null"]
