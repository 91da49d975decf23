"""Strict conversion between YAML/dict data and typed dataclasses.

Every configuration object in toist is a dataclass; this module turns a plain mapping into
one (and back) and refuses unknown keys and wrongly typed values with an error that names
the file and the dotted field path, e.g. ``train.yaml: optim.lr: expected float, got 'fast'``.
A float field takes finite numbers only: no field of toist's configs means anything by NaN or
±inf (YAML's ``.nan`` / ``.inf``, or the strings ``nan`` / ``inf``), and a NaN slips through
every ``value < 0``-style range check.

Files are written whole (:mod:`toist_core.atomic_file`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Optional, TypeVar, Union

import yaml

from .atomic_file import write_text_atomic
from .yaml_text import parse_yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is unknown, missing or of the wrong type."""


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; missing keys keep the dataclass defaults."""
    return _convert(cls, data, where or cls.__name__)


def to_dict(obj: Any) -> Any:
    """A plain, YAML-safe structure (dicts, lists, scalars) for a dataclass tree."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def load_yaml(cls: type[T], path: Union[str, Path]) -> T:
    """Read a YAML file into dataclass ``cls``; errors name the file and the field."""
    return from_dict(cls, read_yaml(path) or {}, where=str(path))


def read_yaml(path: Union[str, Path], what: str = "configuration file") -> Any:
    """The plain data of a YAML file; a missing file or invalid YAML is a :class:`ConfigError`
    naming the file (``what`` it should have been)."""
    path = Path(path)
    try:
        return parse_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start}); is it the {what}?") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a folder, not a {what}") from None


def flatten(data: Mapping, prefix: str = "") -> dict[str, Any]:
    """A nested plain config (:func:`to_dict`) as ``{"text.num_heads": 12, ...}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def save_yaml(obj: Any, path: Union[str, Path]) -> None:
    write_text_atomic(path, yaml.safe_dump(to_dict(obj), sort_keys=False))


def merge(obj: T, overrides: dict[str, Any], where: str = "overrides") -> T:
    """A copy of dataclass ``obj`` with ``overrides`` (nested dicts) applied strictly."""
    data = to_dict(obj)
    _deep_update(data, overrides)
    return from_dict(type(obj), data, where)


def _deep_update(base: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp) if f.init}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
        kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in value.items()}
        try:
            return tp(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_t, val_t = typing.get_args(tp) or (Any, Any)
        return {_convert(key_t, k, where): _convert(val_t, v, f"{where}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            # YAML reads "1e-4" (no dot) as a string: accept numeric strings for floats.
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        return Path(value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: cannot convert {value!r} to {tp}")


def optional_path(value: Optional[str]) -> Optional[Path]:
    return None if value in (None, "") else Path(value)
