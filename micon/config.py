"""Configuration as data: typed dataclass trees, loadable from YAML, overridable with `a.b=c`.

Every job defines its tree as nested dataclasses and calls `load_config`; a field's trailing comment
is its one-line meaning in the job's --help (`help_or_usage`), a numeric field's allowed range is part
of its type (`steps: Annotated[int, Range(1)]`, or the aliases below), checked for every field of every
tree before its `validate()`. Errors name the key, the value and what to change.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import io
import json
import math
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Iterable, TypeVar

import yaml

from micon import atomic

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration a person must fix; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric field accepts, declared in its type: `Annotated[int, Range(1)]` is 1 or more,
    `Range(0, open_min=True)` more than 0, `Range(0, 1)` 0 to 1. Floats must also be finite (no nan, inf).
    `why` is added to the message (what the bound protects)."""

    min: float | None = None
    max: float | None = None
    open_min: bool = False
    why: str = ""

    def describe(self) -> str:
        if self.min is not None and self.max is not None and not self.open_min:
            return f"{self.min:g} to {self.max:g}"
        lo = None if self.min is None else f"{'>' if self.open_min else '>='} {self.min:g}"
        hi = None if self.max is None else f"<= {self.max:g}"
        return " and ".join(x for x in (lo, hi) if x) or "any finite number"

    def problem(self, value: Any) -> str | None:
        """Why `value` is outside the range, or None."""
        if isinstance(value, float) and not math.isfinite(value):
            return f"a finite number {self.describe()}" if self.min is not None or self.max is not None \
                else "a finite number"
        below = self.min is not None and (value <= self.min if self.open_min else value < self.min)
        above = self.max is not None and value > self.max
        return self.describe() if below or above else None


# the common ranges, as types: `steps: PositiveInt = 100  # optimizer steps`
PositiveInt = Annotated[int, Range(1)]
NonNegativeInt = Annotated[int, Range(0)]
PositiveFloat = Annotated[float, Range(0, open_min=True)]
NonNegativeFloat = Annotated[float, Range(0)]
Fraction = Annotated[float, Range(0, 1)]
FiniteFloat = Annotated[float, Range()]


def _ranges(cls: type) -> dict[str, Range]:
    """Field name -> its declared Range (fields without one are absent; every float gets `Range()`)."""
    out = {}
    for name, tp in typing.get_type_hints(cls, include_extras=True).items():
        if name not in {f.name for f in dataclasses.fields(cls)}:
            continue
        inner, _ = _unwrap_optional(tp)
        if typing.get_origin(inner) is Annotated:
            found = [m for m in inner.__metadata__ if isinstance(m, Range)]
            if found:
                out[name] = found[0]
                continue
            inner = typing.get_args(inner)[0]
        if inner is float:
            out[name] = Range()   # nan and inf are never a setting
    return out


def check_ranges(cfg: Any, prefix: str = "") -> None:
    """Every numeric field of the tree `cfg` (nested sections included) within its declared Range, else a
    ConfigError naming the key, the value and the range."""
    ranges = _ranges(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_ranges(value, f"{prefix}{f.name}.")
            continue
        r = ranges.get(f.name)
        if r is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        problem = r.problem(value)
        if problem:
            raise ConfigError(f"{prefix}{f.name}={value}: out of range, allowed {problem}"
                              + (f" ({r.why})" if r.why else ""))


def range_of(cls: type, name: str) -> Range | None:
    """The declared Range of field `name` of `cls` (for --help and tests)."""
    return _ranges(cls).get(name)


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
    check_ranges(obj, prefix)   # defaults and presets included, before validate() relies on them
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
        loaded = read_yaml(p) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: expected a mapping at the top level")
        data = _merge(data, loaded)
    data = _merge(data, parse_overrides(overrides))
    return _build(cls, _renamed(cls, data))


def read_yaml(path: str | Path) -> Any:
    """A YAML config file's data; ConfigError in one line for what PyYAML would let through or bury in a
    traceback: a key given twice in one mapping (PyYAML keeps the last silently, so a second `optim:` block
    drops the first's keys), a syntax error (a tab, a bad indent), with its line."""
    p = Path(path)
    text = p.read_text()
    try:
        _refuse_duplicates(yaml.compose(text, Loader=yaml.SafeLoader), p)
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        line = text.splitlines()[mark.line] if mark is not None and mark.line < len(text.splitlines()) else ""
        hint = ("; YAML indents with spaces only: replace the tab with spaces" if "\\t" in problem or "\t" in line
                else "; check the indentation and the colons there")
        raise ConfigError(f"config file {p} is not valid YAML{where}: {problem}{hint}") from None


def _refuse_duplicates(node, path: Path, prefix: str = "") -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.start_mark)
            dotted = f"{prefix}{key}"
            if key in seen:
                raise ConfigError(
                    f"config file {path}: key {dotted} is given twice (line {seen[key]} and line "
                    f"{key_node.start_mark.line + 1}); YAML would keep only the last and drop the first silently. "
                    + (f"Keep one {key}: line" if isinstance(value_node, yaml.ScalarNode)
                       else f"Merge the two {key}: blocks into one"))
            seen[key] = key_node.start_mark.line + 1
            _refuse_duplicates(value_node, path, dotted + ".")
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicates(item, path, f"{prefix.rstrip('.')}[{i}].")


def _renamed(cls: type, data: dict) -> dict:
    """Old key names a class still accepts (`ALIASES = {"old": "new"}`, a ClassVar): renamed, with a notice."""
    import sys

    for old, new in getattr(cls, "ALIASES", {}).items():
        if old in data:
            if new in data:
                raise ConfigError(f"{old}= and {new}= name the same setting; pass {new}= only")
            print(f"notice: {old}= is now {new}= (one key for worker counts across jobs); {old}= still works",
                  file=sys.stderr)
            data[new] = data.pop(old)
    return data


def dump(cfg: Any) -> str:
    """The resolved config as the YAML text save_config writes."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (YAML) next to a run's outputs (a local path or an object URL)."""
    from micon import storage

    p = storage.path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(p, dump(cfg))


def describe(cfg: Any) -> str:
    """One-line JSON rendering for start-up logs."""
    return json.dumps(to_dict(cfg), sort_keys=False)


# --------------------------------------------------------------------------- help from the tree

@functools.lru_cache(maxsize=None)
def field_meanings(cls: type) -> dict[str, str]:
    """Each field's one-line meaning: the comment on its line in the class source (`x: int = 0  # what
    x is`), continued by comment-only lines right below it that are indented past the field."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    comments = {tok.start[0]: (tok.start[1], tok.string.lstrip("#").strip())
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    out = {}
    body = ast.parse(source).body[0].body
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        words = [comments[n][1] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        if not words:
            continue
        n = node.end_lineno + 1
        while n in comments and lines[n - 1].strip().startswith("#") and comments[n][0] > node.col_offset + 4:
            words.append(comments[n][1])
            n += 1
        out[node.target.id] = " ".join(words)
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def format_value(value: Any) -> str:
    """A value as one would type it after `key=` (lists comma-separated, None as none)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(to_dict(value)) if value else ""
    return str(value)


def config_keys(cls: type, instance: Any = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default as typed on the command line, meaning) for every leaf of a config tree.
    Nested sections are flattened (`model.preset`); a dict field is one key whose entries are
    `key.NAME`. Defaults come from `instance` when given (e.g. a preset), else from the classes."""
    types_ = _field_types(cls)
    meanings = field_meanings(cls)
    rows = []
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name) if instance is not None else _default(f)
        tp, _ = _unwrap_optional(types_[f.name])
        key = prefix + f.name
        if dataclasses.is_dataclass(tp):
            rows += config_keys(tp, value if dataclasses.is_dataclass(value) else None, key + ".")
            continue
        shown = "(required)" if value is dataclasses.MISSING else format_value(value)
        if typing.get_origin(tp) is dict:
            key += ".NAME"
        rows.append((key, shown, meanings.get(f.name, "")))
    return rows


def declared_ranges(cls: type, prefix: str = "") -> dict[str, Range]:
    """Dotted key -> the Range its type declares (not the implicit finiteness of every float)."""
    out = {}
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(_field_types(cls)[f.name])
        if dataclasses.is_dataclass(tp):
            out |= declared_ranges(tp, f"{prefix}{f.name}.")
        elif (r := _ranges(cls).get(f.name)) is not None and r != Range():
            out[prefix + f.name] = r
    return out


def config_help(cls: type, instance: Any = None) -> str:
    """The keys of a job's configuration for its --help: `key=default  meaning [range]`, one a line."""
    ranges = declared_ranges(cls)
    rows = [(key, default, f"{meaning} [{ranges[key].describe()}]" if key in ranges else meaning)
            for key, default, meaning in config_keys(cls, instance)]
    heads = [f"{key}={default}" for key, default, _ in rows]
    col = max((len(h) for h in heads if len(h) <= 32), default=32)   # longer ones get a line of their own
    lines = ["keys (key=value on the command line; shown with their defaults, `key=` is empty):"]
    for head, (_, _, meaning) in zip(heads, rows):
        if len(head) > col:
            lines.append(f"  {head}")
            if meaning:
                lines.append(f"  {'':<{col}}  {meaning}")
        else:
            lines.append(f"  {head:<{col}}  {meaning}".rstrip())
    return "\n".join(lines)


def help_or_usage(argv: list[str], doc: str | None, cls: type, positional: int = 0, instance: Any = None,
                  extra: str = "") -> int | None:
    """The start of a job's main(): with -h/--help anywhere it prints `job_help` and returns 0; with fewer
    than `positional` positional arguments (or a key=value among them) it prints the usage, `doc`, and
    returns 2; otherwise None, and the job runs."""
    if any(a in ("-h", "--help") for a in argv):
        print(job_help(doc, cls, instance, extra))
        return 0
    if len(argv) < positional or any("=" in a for a in argv[:positional]):
        print(doc)
        return 2
    return None


def job_help(doc: str | None, cls: type, instance: Any = None, extra: str = "") -> str:
    """A job's --help: its module docstring, then every key of its configuration, then `extra`."""
    parts = [(doc or "").strip("\n"), config_help(cls, instance)]
    if extra:
        parts.append(extra.strip("\n"))
    return "\n\n".join(parts)

