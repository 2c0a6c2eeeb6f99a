"""Typed configs: YAML files map onto dataclasses; any field can be overridden as ``key.sub=value``.

A config is a tree of dataclasses. ``load_config`` reads YAML, applies command-line overrides, and
builds the typed tree, rejecting unknown keys (with a suggestion) and values of the wrong type, so a
typo fails at start-up instead of an hour into training. ``to_dict`` gives the resolved config that is
saved next to every checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists (tuples become lists, as YAML/JSON have no tuples)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (tuple, list):
        if isinstance(value, str):
            # "1,2,4" on the command line means a sequence; "[]" or "" is the empty one.
            text = value.strip().strip("[]()")
            value = [yaml.safe_load(v) for v in text.split(",")] if text else []
        if not isinstance(value, (list, tuple)):
            value = [value]
        args = typing.get_args(tp)
        elem = args[0] if args else Any
        items = [_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)  # also parses "1e-4", which YAML 1.1 leaves as a string
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, recursively, checking keys and types.

    A class with a ``from_config_dict(data, where)`` classmethod reads itself instead: a list of differently typed
    entries (tagged by a ``kind``), or an older form of the same config."""
    reader = getattr(cls, "from_config_dict", None)
    if reader is not None:
        return reader(data or {}, where)
    return dataclass_from_dict(cls, data, where)


def dataclass_from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """``from_dict`` for a plain dataclass: its fields from ``data``, checking keys and types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in (data or {}).items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {path!r}{hint}; valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from e


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML scalars)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return tree


def _entry_name(entry: Any) -> str | None:
    """How an override addresses an entry of a list of mappings: its ``name``, else its ``kind``."""
    return (entry.get("name") or entry.get("kind")) if isinstance(entry, dict) else None


def _merge_by_name(entries: list[Any], update: dict[str, Any], key: str) -> list[Any]:
    """A list of named mappings (the conditioner's embedders) updated entry by entry: ``{name: {field: value}}``,
    so that ``model.conditioner.embedders.caption.dropout=0.2`` reaches the embedder named caption."""
    names = [_entry_name(e) for e in entries]
    unknown = sorted(set(update) - set(names))
    if unknown:
        raise ConfigError(f"{key} has no entry named {', '.join(map(repr, unknown))}; its entries are named "
                          f"{', '.join(str(n) for n in names)}")
    return [merge(e, update[n]) if n in update and isinstance(update[n], dict) else e
            for e, n in zip(entries, names, strict=True)]


def merge(base: dict[str, Any], update: dict[str, Any], key: str = "") -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins. A mapping merged into a list of named mappings updates its entries
    by name (see ``_merge_by_name``)."""
    out = dict(base)
    for k, v in update.items():
        where = f"{key}.{k}" if key else k
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v, where)
        elif (isinstance(v, dict) and isinstance(out.get(k), list) and out[k]
              and all(_entry_name(e) for e in out[k])):
            out[k] = _merge_by_name(out[k], v, where)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return data


def load_config(cls: type[T], data: dict[str, Any], overrides: list[str] | None = None) -> T:
    """Apply ``overrides`` to ``data`` and build the typed config ``cls``."""
    return from_dict(cls, merge(data, parse_overrides(overrides or [])))


def save_yaml(obj: Any, path: str | Path) -> None:
    """Write ``obj`` as YAML to ``path`` atomically: to a temporary file beside it, renamed over it when complete
    (the name io.atomic's clean-up knows; config sits below io, so it cannot call it)."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temp.write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
