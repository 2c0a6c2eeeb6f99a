"""Typed configs: YAML files map onto dataclasses; any field can be overridden as ``key.sub=value``.

A config is a tree of dataclasses. ``load_config`` reads YAML, applies command-line overrides, and
builds the typed tree, rejecting unknown keys (with a suggestion) and values of the wrong type, so a
typo fails at start-up instead of an hour into training. ``to_dict`` gives the resolved config that is
saved next to every checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


class YamlSyntaxError(ConfigError):
    """Text that does not parse as YAML (an override's value is then taken as a plain string)."""


# YAML limits: a config is a few KB; anchors and aliases may be used, but a document that expands to more than
# MAX_YAML_NODES values (a "billion laughs" of nested aliases: 1 KB -> gigabytes) is refused before it is built.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_ALIASES = 100
MAX_YAML_NODES = 100_000
_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxdict, _SHOW.maxlist, _SHOW.maxtuple, _SHOW.maxstring, _SHOW.maxother = 2, 4, 4, 4, 60, 60


def show_value(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for an error message: bounded in work and cut to about ``limit`` characters."""
    text = _SHOW.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _LimitedLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no tags that build objects) with a cap on aliases and on the expanded document."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                raise ConfigError(f"more than {MAX_YAML_ALIASES} YAML aliases (*name); refused")
        return super().compose_node(parent, index)


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values ``node`` stands for once every alias is expanded (each shared node counted once per use)."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = MAX_YAML_NODES + 1  # a node inside itself (a recursive alias) is too large
    if isinstance(node, yaml.SequenceNode):
        total = 1 + sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    else:
        total = 1
    sizes[id(node)] = min(total, MAX_YAML_NODES + 1)
    return sizes[id(node)]


def load_yaml_text(text: str, where: str) -> Any:
    """One YAML document parsed with ``_LimitedLoader``, its size checked before and after alias expansion; a
    ConfigError (naming ``where``) for what is too large or not YAML."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{where} is {len(text)} characters; configs are limited to {MAX_YAML_BYTES}")
    loader = _LimitedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise ConfigError(f"{where} expands (through its YAML aliases) to more than {MAX_YAML_NODES} values; "
                              "refused")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise YamlSyntaxError(f"{where} is not valid YAML: {show_value(str(e), 200)}") from e
    except RecursionError:
        raise ConfigError(f"{where} nests too deeply") from None
    finally:
        loader.dispose()


def _bad(where: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{where}: expected {expected}, got {show_value(value)}")


def check_ranges(obj: Any, *, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
                 fractions: tuple[str, ...] = (), positive_items: tuple[str, ...] = ()) -> None:
    """The ranges of a config dataclass's fields, for its ``__post_init__``: ``positive`` (> 0), ``non_negative``
    (>= 0), ``fractions`` (in [0, 1]) and ``positive_items`` (non-empty sequences of positive numbers). Also
    refuses NaN and infinity in any of them. Raises a ConfigError naming the first field out of range."""
    rules = ((positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0"),
             (fractions, lambda v: 0 <= v <= 1, "in [0, 1]"))
    for names, test, text in rules:
        for name in names:
            value = getattr(obj, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not test(value):
                raise ConfigError(f"{name} must be {text}, got {show_value(value)}")
    for name in positive_items:
        value = getattr(obj, name)
        if not value or not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in value):
            raise ConfigError(f"{name} must be a non-empty list of positive numbers, got {show_value(value)}")


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
            raise _bad(where, "a mapping", value)
        return from_dict(tp, value, where)
    if origin in (tuple, list):
        if isinstance(value, str):
            # "1,2,4" on the command line means a sequence; "[]" or "" is the empty one.
            text = value.strip().strip("[]()")
            value = [load_yaml_text(v, where) for v in text.split(",")] if text else []
        if not isinstance(value, (list, tuple)):
            value = [value]
        args = typing.get_args(tp)
        elem = args[0] if args else Any
        items = [_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise _bad(where, "a mapping", value)
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise _bad(where, "true/false", value)
    if tp is int:
        return _coerce_int(value, where)
    if tp is float:
        if isinstance(value, bool) or isinstance(value, (dict, list, tuple)):
            raise _bad(where, "a number", value)
        try:
            number = float(value)  # also parses "1e-4", which YAML 1.1 leaves as a string
        except (TypeError, ValueError):
            raise _bad(where, "a number", value) from None
        if not math.isfinite(number):
            raise _bad(where, "a finite number", value)
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise _bad(where, "a string", value)
        return "" if value is None else str(value)
    return value


def _coerce_int(value: Any, where: str) -> int:
    """An int from an int, a whole finite float or a numeric string; bools, fractions, NaN and infinity refused."""
    if isinstance(value, bool) or isinstance(value, (dict, list, tuple)):
        raise _bad(where, "an integer", value)
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eEnN") else int(value)
        except ValueError:
            raise _bad(where, "an integer", value) from None
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise _bad(where, "an integer", value)
        return int(value)
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise _bad(where, "an integer", value) from None


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
    if data is not None and not isinstance(data, dict):
        raise _bad(where or cls.__name__, "a mapping", data)
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
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from e


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML scalars)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {show_value(item)} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {show_value(item)} has an empty key")
        try:
            value = load_yaml_text(raw, f"override {key}") if raw.strip() else ""
        except YamlSyntaxError:
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {show_value(item)} conflicts with another override")
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
    """A YAML config file as a mapping (``load_yaml_text``'s limits; empty: {})."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(f"{path} is {path.stat().st_size} bytes; configs are limited to {MAX_YAML_BYTES}")
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not a text file ({e.reason} at byte {e.start})") from None
    data = load_yaml_text(text, str(path))
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
