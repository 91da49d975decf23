"""Where a start-up parameter's value came from: the command line's ``--params-file`` files and
``-p`` rules, in their order, against what rcl resolved.

ROS applies them in order, the last setting of a name winning, except where rcl keeps an
earlier value without a word: under the same node key (``-p`` rules are ``/**`` entries), a value
is not replaced by a later one of a lower-ranked type (bool, then whole number, then number,
then text: ``score_threshold: 1`` in a ``/**`` file outlives a later ``-p score_threshold:=0.3``),
and the node's keys apply in the order each first appears on the command line (a later ``/**``
file loses to an earlier ``/**/toist_perception`` one when ``/**`` came first, in another file).
:func:`resolve` says which settings were lost so: a ``-p`` rule of a valid value is applied after
all (it is what the command line says last), anything else is refused naming both settings. A
``-p`` rule a later file overrides, as ROS means it to, is only noted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from toist_core.listing import listing
from toist_core.typed_config import flatten

_TRUE_WORDS = frozenset("y Y yes Yes YES true True TRUE on On ON".split())
_FALSE_WORDS = frozenset("n N no No NO false False FALSE off Off OFF".split())
RULE_KEY = "/**"   # the node key of -p rules
_COMMENT = re.compile(r"\s+#")


def rule_value(raw: str) -> Optional[tuple[Any]]:
    """``(value,)`` as rcl reads a ``-p name:=raw`` value (YAML 1.1, measured on Kilted: ``yes``,
    ``On``, ``y`` true, case as listed; ``010`` octal 8, ``0x10`` 16, ``+5`` 5; ``1e-3``, ``.5``,
    ``.inf``, ``0x1p-1`` doubles; ``1_000``, ``null`` and quoted values text, YAML's escapes
    undone), or None where this reading is not sure (lists other than ``[]``): nothing is then
    said about that rule."""
    text = raw.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return (_unquoted(text),)
    text = _COMMENT.split(text, 1)[0]   # YAML: whitespace then "#" starts a comment (rcl: "x #c" is "x")
    if text in _TRUE_WORDS or text in _FALSE_WORDS:
        return (text in _TRUE_WORDS,)
    if text == "[]":
        return ([],)
    if text.startswith("["):
        return None
    if "_" in text:
        return (text,)
    if re.fullmatch(r"[+-]?0[0-7]+", text):
        return (int(text, 8),)
    # rcl tries strtol (base 0), then strtod: Python's int(t, 0) also takes "0b1" / "0o7", and
    # float.fromhex hex digits without "0x" ("fp16" as 983040.0, "bed"), which rcl keeps as text.
    if re.fullmatch(r"[+-]?(0[xX][0-9a-fA-F]+|[1-9][0-9]*|0)", text):
        return (int(text, 0),)
    try:
        return (float(text),)   # as strtod: "08", "1e-3", ".5", "inf", "nan", "infinity"
    except ValueError:
        pass
    if re.fullmatch(r"[+-]?0[xX][0-9a-fA-F.]+([pP][+-]?[0-9]+)?", text):
        try:
            return (float.fromhex(text),)   # strtod's hex doubles: "0x1p-1"
        except ValueError:
            pass
    special = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}.get(text.lower())
    return (special,) if special is not None else (text,)


def _unquoted(text: str) -> str:
    """A quoted YAML scalar's text: ``'it''s'`` -> ``it's``, ``"say \\"hi\\""`` -> ``say "hi"``."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text[1:-1]
    return value if isinstance(value, str) else text[1:-1]


def same_value(given: Any, got: Any) -> bool:
    """Whether rcl's value is ``given``: a bool only as that bool, numbers by value (an integer
    for a double parameter is that double), NaN as NaN, lists item by item."""
    if isinstance(given, bool) or isinstance(got, bool):
        return type(given) is type(got) and given == got
    if isinstance(given, (int, float)) and isinstance(got, (int, float)):
        return given == got or (math.isnan(given) and math.isnan(got))
    if isinstance(given, (list, tuple)) and isinstance(got, (list, tuple)):
        return len(given) == len(got) and all(same_value(a, b) for a, b in zip(given, got))
    return given == got


@dataclass(frozen=True)
class Setting:
    """One setting of a parameter on the command line, in argv order."""

    value: Any
    where: str              # "-p task:=bed" or "file.yaml's 3"
    source: str             # "-p" or the params file
    index: int = 0          # its place on the command line
    key: str = RULE_KEY     # the node key it is under ("/**" for -p rules)

    @property
    def rule(self) -> bool:
        return self.source == "-p"

    def gives(self, got: Any) -> bool:
        """Whether rcl's value ``got`` is this setting's: a file's text also as rcl reads a plain
        scalar (PyYAML reads ``n`` and ``1e-3`` as text, rcl as false and 0.001; a quoted one
        PyYAML gives as the text it is)."""
        if same_value(self.value, got):
            return True
        plain = rule_value(self.value) if isinstance(self.value, str) and not self.rule else None
        return plain is not None and same_value(plain[0], got)


@dataclass
class Resolution:
    apply: dict[str, Any] = field(default_factory=dict)   # -p values rcl lost, to set after all
    problems: list[str] = field(default_factory=list)     # settings lost that cannot be applied
    notes: list[str] = field(default_factory=list)        # settings a later one overrides, or not read here


@dataclass
class CommandLine:
    """The settings of the command line, by parameter name, in order; where each node key first
    appeared (rcl applies a node's keys in that order); the place of the last params file that
    did not read here (-1: none), which may set anything."""

    settings: dict[str, list[Setting]] = field(default_factory=dict)
    first_seen: dict[str, int] = field(default_factory=dict)
    last_unread: int = -1
    # Params files that read but have no key for this node: (path, their node keys).
    not_for_this_node: list[tuple[str, list[str]]] = field(default_factory=list)
    comment_cut: list[str] = field(default_factory=list)   # -p values rcl cut at a YAML comment


def settings_in_order(argv: list[str], node_name: str, names: Any) -> CommandLine:
    """Every setting of ``names`` for the node ``node_name`` (its fully qualified name) in
    ``argv``'s ``--ros-args`` sections: ``-p`` rules (as :func:`rule_value` reads them; unsure
    ones left out) and the entries of each ``--params-file`` under keys that match the node as
    rcl matches them (``/**``, ``/**/toist_perception``, ``/front/toist_perception``, nested
    namespace maps)."""
    out = CommandLine()
    ros_args = False
    tokens = list(argv)
    for index, token in enumerate(tokens):
        following = tokens[index + 1] if index + 1 < len(tokens) else None
        if token == "--ros-args":
            ros_args = True
        elif token == "--":
            ros_args = False
        elif not ros_args or following is None:
            continue
        elif token in ("-p", "--param") and ":=" in following:
            out.first_seen.setdefault(RULE_KEY, index)
            name, raw = following.split(":=", 1)
            value = rule_value(raw) if name in names else None
            if value is not None and _COMMENT.search(raw.strip()) and raw.strip()[:1] not in "'\"":
                out.comment_cut.append(f"{name}: -p {name}:={raw} reached the node as {value[0]!r}: in a -p value "
                                       "whitespace then '#' starts a YAML comment; quote the value to keep it whole "
                                       f"(-p '{name}:=\"...\"')")
            if value is not None:
                out.settings.setdefault(name, []).append(Setting(value[0], f"-p {name}:={raw}", "-p", index))
        elif token == "--params-file":
            entries = _file_entries(following)
            if entries is None:
                out.last_unread = index
                continue
            keys = list(dict.fromkeys(key for key, _, _ in entries))
            if keys and not any(_matches(key, node_name) for key in keys):
                out.not_for_this_node.append((following, keys))
            for key, name, value in entries:
                out.first_seen.setdefault(key, index)
                if name in names and _matches(key, node_name):
                    out.settings.setdefault(name, []).append(
                        Setting(value, f"{following}'s {value!r}", following, index, key))
    return out


def _file_entries(path: str) -> Optional[list[tuple[str, str, Any]]]:
    """``(node key, name, value)`` of every entry of a params file (dotted names for nested
    maps; namespaces written as nested maps joined into their key), or None for a file that
    does not read here (rcl reads UTF-16, for one: read as bytes, PyYAML finds it too)."""
    import yaml

    try:
        with open(path, "rb") as handle:
            data = yaml.safe_load(handle)
    except (OSError, ValueError, yaml.YAMLError):
        return None
    out: list[tuple[str, str, Any]] = []

    def walk(entries: Any, key: str) -> None:
        for part, entry in entries.items() if isinstance(entries, dict) else ():
            if not isinstance(entry, dict):
                continue
            nested = f"{key}/{str(part).strip('/')}"
            if isinstance(entry.get("ros__parameters"), dict):
                out.extend((nested, name, value) for name, value in flatten(entry["ros__parameters"]).items())
            else:
                walk(entry, nested)

    walk(data, "")
    return out


def _matches(key: str, node_name: str) -> bool:
    """Whether the node key ``key`` ("/**", "/*/toist_perception", ...) names the node of fully
    qualified name ``node_name``: ``*`` one namespace or name token, ``**`` any number of them."""
    pattern = "".join("(?:/[^/]+)*" if token == "**" else "/[^/]+" if token == "*" else "/" + re.escape(token)
                      for token in key.strip("/").split("/") if token)
    return re.fullmatch(pattern, "/" + node_name.strip("/")) is not None


def resolve(argv: list[str], node_name: str, resolved: dict[str, Any],
            valid_value: Callable[[str, Any], Optional[Any]], kind_words: Callable[[str], str]) -> Resolution:
    """Compare what ``argv`` sets last with what rcl ``resolved`` (name -> value) for this
    node's parameters. ``valid_value(name, value)``: the value as the parameter takes it, or
    None when it is not a valid one (a rule of a wrong type is refused, not applied);
    ``kind_words(name)``: what the parameter takes, in words ("a number")."""
    out = Resolution()
    line = settings_in_order(argv, node_name, set(resolved))
    out.notes += line.comment_cut
    for path, keys in line.not_for_this_node:
        out.notes.append(f"{path} sets nothing for this node ({'/' + node_name.strip('/')}): its keys are {listing(keys)}; "
                         "key it /** or by the node's name with its namespace (e.g. /front/toist_perception, or "
                         "/**/toist_perception in any namespace)")
    for name, settings in line.settings.items():
        got, last = resolved[name], settings[-1]
        if last.gives(got):
            out.notes += [f"{name}: {earlier.where} is overridden by {last.where}, which comes after it (ROS applies "
                          "-p and --params-file in order: put -p last)" for earlier in settings[:-1]
                          if earlier.rule and not last.rule and not earlier.gives(got)]
            continue
        kept = next((s for s in reversed(settings[:-1]) if s.gives(got)), None)
        if kept is None or last.index < line.last_unread:
            # From a setting not read here (a file that does not read, a node-scoped -p): ROS's
            # order, most likely; said, not refused. (A file's value of a wrong type the parameter
            # check names.)
            out.notes.append(f"{name}: {last.where} was not applied: the node got {got!r}, from a setting this "
                             "check does not read (a params file it cannot read, a node-scoped -p)")
            continue
        meant = valid_value(name, last.value)
        if last.rule and meant is not None:
            # rcl's key order or type ranking lost it: what the command line says last. (Applied
            # as rclpy's own override would be: before the parameter is declared read-only.)
            out.apply[name] = meant
            continue
        if meant is None:
            reason = f"rcl drops a later value of another type; give {kind_words(name)}"
        elif line.first_seen[kept.key] > line.first_seen[last.key]:
            reason = (f"rcl applies a node's keys in the order each first appears on the command line, and "
                      f"{kept.key} first appears after {last.key}: set it under one key, or in one file")
        else:
            reason = ("under one node key rcl does not replace a value by a later one of a lower-ranked type "
                      "(bool, then whole number, then number, then text): write it there as the later one is "
                      "written (1.0, \"3\"), or set it in one place")
        out.problems.append(f"{name}: {last.where} was not applied: ROS kept {kept.where} ({reason})")
    return out
