"""YAML as toist reads it: ``yaml.safe_load``, with three failures turned into YAML errors.

* A key given twice in one mapping. ``safe_load`` keeps the last copy without a word: a second
  ``optim:`` block appended to a training config replaced the whole first one, every field it
  did not repeat back at its default, and ``--check`` said OK. Refused with the line of each copy.
  (A key merged in with ``<<:`` and set again beside it is an override, not a repeat.)

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


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated in one mapping.

    Checked where PyYAML first touches a mapping, ``flatten_mapping``, once per node: that call
    also splices merged (``<<:``) pairs into the node in place, so a mapping merged elsewhere
    before it is built would afterwards hold its merged keys beside its own overrides."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._checked: set[int] = set()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        if id(node) not in self._checked:
            self._checked.add(id(node))
            self._refuse_repeats(node)
        super().flatten_mapping(node)

    def _refuse_repeats(self, node: yaml.MappingNode) -> None:
        first_seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            # "=" (YAML's value key) has no constructor of its own: PyYAML reads it as the string.
            key = "=" if key_node.tag == "tag:yaml.org,2002:value" else self.construct_object(key_node, deep=True)
            try:
                earlier = first_seen.get(key)
            except TypeError:   # an unhashable key: the constructor says so when it builds the mapping
                continue
            if earlier is not None:   # (an alias repeats the very node: its mark is the same)
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice, on line {earlier.line + 1} and on line "
                    f"{key_node.start_mark.line + 1}: the second copy would silently replace the first; "
                    "give each key once", key_node.start_mark)
            first_seen[key] = key_node.start_mark


def parse_yaml(text: str) -> Any:
    """The plain data of YAML ``text`` (as ``yaml.safe_load``); raises ``yaml.YAMLError`` for
    invalid YAML, a key repeated in one mapping, aliases expanding to more than ``MAX_VALUES``
    values, or nesting deeper than the parser's recursion allows."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
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
