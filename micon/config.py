"""Configuration as data: typed dataclass trees, loadable from YAML, overridable with `a.b=c`.

Every job defines its tree as nested dataclasses and calls `load_config`. Errors name the key
and say what to change; nothing here reads anything but the YAML file it is given.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration a person must fix; the message says what to change."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Turn a YAML value or command-line string into the declared type of `key`."""
    tp, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"{key}: a value is required (type {getattr(tp, '__name__', tp)})")
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, str):
                value = value.replace("_", "")
            f = float(value)
            if f != int(f):
                raise ValueError(value)
            return int(f)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
        if tp is Path:
            return Path(value)
        if typing.get_origin(tp) is typing.Literal:
            allowed = typing.get_args(tp)
            if value not in allowed:
                raise ConfigError(f"{key}={value!r}: choose one of {', '.join(map(str, allowed))}")
            return value
        if origin in (list, tuple):
            (inner, *_rest) = typing.get_args(tp) or (str,)
            if isinstance(value, str):
                value = yaml.safe_load(value) if value.strip().startswith("[") else [
                    v for v in value.split(",") if v != ""]
            items = [_coerce(v, inner, key) for v in value]
            return tuple(items) if origin is tuple else items
        if origin is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
            return _build(tp, value, prefix=key + ".")
    except ConfigError:
        raise
    except (TypeError, ValueError):
        name = getattr(tp, "__name__", str(tp))
        raise ConfigError(f"{key}={value!r}: expected {name}") from None
    return value


def _unknown_key(cls: type, key: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    return ConfigError(f"unknown key {prefix}{key}{hint}; known keys: {', '.join(prefix + n for n in names)}")


def _build(cls: type[T], data: dict, prefix: str = "") -> T:
    types_ = _field_types(cls)
    kwargs = {}
    for k, v in data.items():
        if k not in types_:
            raise _unknown_key(cls, k, prefix)
        kwargs[k] = _coerce(v, types_[k], prefix + k)
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{prefix or 'config'}: {e}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def parse_overrides(overrides: Iterable[str]) -> dict:
    """`["a.b=1", "c=x"]` -> `{"a": {"b": "1"}, "c": "x"}` (values stay strings until typed)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"argument {item!r} is not key=value (for example preset=tiny)")
        key, value = item.split("=", 1)
        key = key.strip().lstrip("-")
        parts = key.split(".")
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {p} is a value, not a section")
        node[parts[-1]] = value
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def to_dict(cfg: Any) -> Any:
    """The config as plain YAML/JSON-able data."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = (),
                defaults: dict | None = None) -> T:
    """Build `cls` from `defaults`, then a YAML file, then `key=value` overrides (later wins)."""
    data: dict = dict(defaults or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: expected a mapping at the top level")
        data = _merge(data, loaded)
    data = _merge(data, parse_overrides(overrides))
    return _build(cls, data)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (YAML) next to a run's outputs."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(p)


def describe(cfg: Any) -> str:
    """One-line JSON rendering for start-up logs."""
    return json.dumps(to_dict(cfg), sort_keys=False)
