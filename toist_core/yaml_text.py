"""YAML as toist reads it: ``yaml.safe_load`` without aliases, and with nesting too deep for the
parser turned into a YAML error.

toist never writes aliases (``&a`` / ``*a``), and they are what makes a "billion laughs" file: a
kilobyte of nested aliases that ``safe_load`` returns cheaply as shared references but that
expands to billions of nodes once anything walks or prints it (a model directory's
``config.yaml`` took 30 s and 1.8 GB at eight levels, ten times more per level). Refused where
they appear, as invalid YAML, so every caller's "not valid YAML" error names the file.
"""

from __future__ import annotations

from typing import Any

import yaml


class _NoAliasLoader(yaml.SafeLoader):
    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "an alias (*name): toist's YAML files take none", mark)
        return super().compose_node(parent, index)


def parse_yaml(text: str) -> Any:
    """The plain data of YAML ``text`` (as ``yaml.safe_load``); raises ``yaml.YAMLError`` for
    invalid YAML, an alias, or nesting deeper than the parser's recursion allows."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply to read") from None


__all__ = ["parse_yaml"]
