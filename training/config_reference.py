"""The table of every training configuration key, for docs/training.md.

    python -m training.config_reference          # prints the Markdown table

Each key's default comes from the dataclasses; its meaning from the comment on the field's
line in the source (every field has one: tests/test_train_config.py checks that the table in
docs/training.md is this one). ``model.*`` is the network's own config
(``toist_core.config.ModelConfig``, presets in ``toist_core/config.py``), not repeated here.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize
from typing import Any, Iterator

from training.config import TrainConfig

# The sections not listed key by key.
SKIPPED_SECTIONS = ("model",)


def field_comments(cls: type) -> dict[str, str]:
    """``{field name: its comment}`` of dataclass ``cls``: the comment on the field's line, else
    the comment lines right above it (its own source only)."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    names = {f.name for f in dataclasses.fields(cls)}
    line_field = {}
    for number, line in enumerate(lines, 1):
        head = line.strip().split(":", 1)[0]
        if head in names and line.startswith("    ") and not line.startswith("     "):
            line_field[number] = head
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and token.start[0] in line_field and lines[token.start[0] - 1].strip()[0] != "#":
            comments[line_field[token.start[0]]] = token.string.lstrip("#").strip()
    for number, name in line_field.items():
        above = []
        while number - 2 - len(above) >= 0 and lines[number - 2 - len(above)].strip().startswith("#"):
            above.insert(0, lines[number - 2 - len(above)].strip().lstrip("#").strip())
        if name not in comments and above:
            comments[name] = " ".join(above)
    return comments


def rows(cls: type = TrainConfig, prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """``(dotted key, default, meaning)`` of every leaf field, sections in declaration order."""
    comments = field_comments(cls)
    for item in dataclasses.fields(cls):
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        if dataclasses.is_dataclass(default):
            if item.name not in SKIPPED_SECTIONS:
                yield from rows(type(default), f"{prefix}{item.name}.")
            continue
        yield f"{prefix}{item.name}", default, comments.get(item.name, "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _shown(value: Any) -> str:
    return _cell("null" if value is None else "true" if value is True else "false" if value is False else repr(value))


def markdown() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{key}` | `{_shown(default)}` | {_cell(meaning)} |" for key, default, meaning in rows()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
