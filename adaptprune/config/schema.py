"""The machinery behind the typed config: field options, validation from YAML mappings, overrides.

``from_dict`` builds any nested dataclass from a mapping and checks every value against its type
hint and the checks given to ``option`` (ranges, a size pattern, registry-backed choices); unknown
keys, wrong types and out-of-range values raise one ``ConfigError`` line naming the field, the
value and what is allowed (with the nearest valid key for typos). YAML is read with
``yaml.safe_load`` only. The dataclasses themselves live in ``adaptprune.config``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message is one line meant for the user."""


def option(default: Any, help: str, **checks: Any) -> Any:
    """A config field with its help text and checks (``min``/``ge``/``gt``/``le``/``lt``, ``pattern``,
    ``choices``: a callable returning the allowed names, e.g. a registry's keys; ``listable``: a
    comma-separated string that may also be written as a YAML list)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **checks})
    return field(default=default, metadata={"help": help, **checks})


def _apply_override(data: dict, item: str) -> None:
    """``a.b.c=value`` sets data["a"]["b"]["c"] (the value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    path = key.split(".")
    if not sep or not all(path):
        raise ConfigError(f"override '{item}' must look like section.key=value (e.g. prune.metric=wanda)")
    node = data
    for depth, name in enumerate(path[:-1]):
        if node.get(name) is None:
            node[name] = {}
        if not isinstance(node[name], dict):
            raise ConfigError(f"'{'.'.join(path[: depth + 1])}' must be a mapping to set '{key}'")
        node = node[name]
    try:
        node[path[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"override '{item}': the value is not valid YAML (quote it)") from None


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from ``path`` (``safe_load`` only); one-line ``ConfigError`` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def load_into(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Defaults of ``cls``, then a YAML file, then ``key.path=value`` overrides; validated."""
    data = read_yaml(path) if path is not None else {}
    for item in overrides or []:
        _apply_override(data, item)
    return from_dict(cls, data)


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, validating every field."""
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; allowed: {', '.join(fields)}"
            hint = _colon_hint(key) or hint
            raise ConfigError(f"unknown config key {prefix + str(key)!r}{hint}")  # repr: one line, whatever the key
    values = {}
    for name, f in fields.items():
        if name not in data:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = from_dict(hint, {} if data[name] is None else data[name], f"{prefix}{name}.")
        else:
            values[name] = _check_value(f"{prefix}{name}", data[name], hint, f.metadata)
    return cls(**values)


def _check_value(name: str, value: Any, hint: Any, meta: typing.Mapping) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint):
        if value is None:
            return None
        if meta.get("pattern") == "shape":
            return _check_shape(name, value)
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if isinstance(value, bool) and {"yes", "no"} & set(allowed):  # YAML 1.1 reads `no` as false
            value = "yes" if value else "no"
        if value not in allowed:
            raise ConfigError(f"{name}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")
        return value
    if origin in (list, types.GenericAlias) or hint is list or origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name}={value!r} must be a list of strings")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}={value!r} must be an integer")
    elif hint is float:
        value = _number_from_text(value)  # YAML 1.1 reads 1e-4 as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}={value!r} must be a number")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{name}={value!r} must be a finite number")
    elif hint is str:
        if meta.get("listable") and isinstance(value, list) and all(_scalar(v) for v in value):
            value = ", ".join(str(v) for v in value)  # [30x576x2, 26x576x3] means "30x576x2, 26x576x3"
        if not _scalar(value):
            raise ConfigError(f"{name}={value!r} must be a string")
        value = str(value)
        if meta.get("pattern") == "target":
            _check_target_text(name, value)
        if "choices" in meta:
            _check_choice(name, value, meta["choices"]())
    _check_range(name, value, meta)
    return value


def _scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def _colon_hint(key: Any) -> str:
    """For a YAML flow-mapping key like 'layers:40' (no space after the colon: one key, no value)."""
    if isinstance(key, str) and ":" in key:
        name, _, value = key.partition(":")
        return f" (YAML needs a space after the colon: write {{{name.strip()}: {value.strip()}}})"
    return ""


def _check_shape(name: str, value: Any) -> str | dict:
    """A model name / config.json path, or a mapping of dimension -> positive int (checked against the model later)."""
    if isinstance(value, dict):
        bad = [
            k for k, v in value.items() if not (isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool))
        ]
        if bad:
            raise ConfigError(f"{name}={value!r} must map dimension names to integers{_colon_hint(bad[0])}")
        return value
    if isinstance(value, str) and value.strip():
        return value
    raise ConfigError(f"{name}={value!r} must be a model name, a config.json path or a mapping of sizes")


def _check_choice(name: str, value: str, allowed: list[str]) -> None:
    if value not in allowed:
        near = difflib.get_close_matches(value, allowed, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ConfigError(f"{name}={value!r} is not known{hint}; choose one of: {', '.join(allowed)}")


def _number_from_text(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


_TARGET = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*([kmbx]?)$", re.IGNORECASE)  # as allocation.parse_target


def _check_target_text(name: str, value: str) -> None:
    """The model-independent part of a size: its form, and a ratio strictly inside (0, 1).

    Whether a count fits the model (and its floors) is checked when the model is loaded.
    """
    match = _TARGET.match(value.strip().replace("_", ""))
    if not match:
        raise ConfigError(
            f"{name}={value!r} is not a size; use a count like '90M', '1.2B', '134515008' or a ratio like '0.7x'"
        )
    number, suffix = float(match.group(1)), match.group(2).lower()
    if suffix == "x" and not 0.0 < number < 1.0:
        raise ConfigError(f"{name}={value!r} is out of range; a ratio must lie strictly between 0x and 1x")
    if suffix != "x" and number <= 0:
        raise ConfigError(f"{name}={value!r} is out of range; a count must be at least 1")


def _check_range(name: str, value: Any, meta: typing.Mapping) -> None:
    checks = {
        "min": (lambda v, b: v >= b, ">="),
        "ge": (lambda v, b: v >= b, ">="),
        "gt": (lambda v, b: v > b, ">"),
        "le": (lambda v, b: v <= b, "<="),
        "lt": (lambda v, b: v < b, "<"),
    }
    for key, (ok, sign) in checks.items():
        if key in meta and not ok(value, meta[key]):
            raise ConfigError(f"{name}={value!r} is out of range; it must be {sign} {meta[key]}")


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def dump_yaml(config: Any, path: str | Path) -> None:
    """Write the resolved config (the run's own record of what it did)."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
