"""YAML as toist reads it: ``yaml.safe_load``, with two failures turned into YAML errors.

* Aliases that expand too far. Anchors and aliases (``&defaults`` / ``*defaults``, ``<<:``) are
  fine in a hand-written config, but they are also what makes a "billion laughs" file: a
  kilobyte of nested aliases that ``safe_load`` returns cheaply as shared references, yet that
  expands to billions of values once anything walks or prints it (a model directory's
  ``config.yaml`` took 30 s and 1.8 GB at eight levels, ten times more per level). The data is
  walked as the readers would walk it, and refused past ``MAX_VALUES``.
* Nesting deeper than the parser's recursion allows (a bare RecursionError before).

Every caller's "not valid YAML" error then names the file.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_VALUES = 1_000_000  # values a YAML file may expand to (toist's largest config has a few hundred)


def parse_yaml(text: str) -> Any:
    """The plain data of YAML ``text`` (as ``yaml.safe_load``); raises ``yaml.YAMLError`` for
    invalid YAML, aliases expanding to more than ``MAX_VALUES`` values, or nesting deeper than
    the parser's recursion allows."""
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply to read") from None
    _check_expansion(data)
    return data


def _check_expansion(data: Any) -> None:
    """Count the values ``data`` expands to (shared references counted each time they are
    reached, as a walk or a print reaches them), stopping at the first past ``MAX_VALUES``."""
    count, pending = 0, [data]
    while pending:
        value = pending.pop()
        count += 1
        if count > MAX_VALUES:
            raise yaml.YAMLError(f"expands to more than {MAX_VALUES:,} values (aliases repeating aliases?)")
        if isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)


__all__ = ["MAX_VALUES", "parse_yaml"]
