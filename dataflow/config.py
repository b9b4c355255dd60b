"""Typed configuration: one ``kw_only`` dataclass per component, loaded strictly from TOML.

Every section a user can write in ``configs/*.toml`` is a dataclass here (or in
``trainer.config`` for the trainer's own sections). Loading is strict: an unknown key is an
error that names the key and the closest valid one, a value of the wrong type is an error
that names the field, its type and the value, and each dataclass validates its numbers in
``__post_init__``. ``--section.key=value`` arguments override any field from the command
line; the value is parsed as a TOML value when it is one (``--data.batch_size=64``,
``--storage.endpoint_url=http://…``), else taken as a string.

Byte sizes are written ``"256MB"``, ``"8MiB"`` or as plain integers; a field annotated
``ByteSize`` accepts either and always holds an int.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the typed config tree."""


class _ByteSizeMarker:
    """Marks an ``int`` field that also accepts strings like ``"256MB"``."""


ByteSize = Annotated[int, _ByteSizeMarker]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | float | str) -> int:
    """``"256MB"`` → 256_000_000, ``"8MiB"`` → 8_388_608, ``4096`` → 4096."""
    if isinstance(value, bool):
        raise ConfigError(f"expected a byte size, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(f"a byte size must be whole, got {value!r}")
        return int(value)
    match = _SIZE_RE.match(value)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ConfigError(
            f"cannot read {value!r} as a byte size; write e.g. 4096, '64KiB', '8MiB' or '256MB'"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_bytes(count: float) -> str:
    """Human-readable size with binary units: 8388608 → '8.0 MiB'."""
    if count < 1024:
        return f"{int(count)} B"
    exponent = min(int(math.log(count, 1024)), 4)
    return f"{count / 1024**exponent:.1f} {['B', 'KiB', 'MiB', 'GiB', 'TiB'][exponent]}"


# ---------------------------------------------------------------------------------------------
# Strict building of a dataclass tree from plain TOML data


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Annotated:
        base = get_args(tp)[0]
        return "byte size" if _ByteSizeMarker in get_args(tp)[1:] else _type_name(base)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple, Sequence):
        return f"list[{_type_name(get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert a TOML value to ``tp`` or raise a ConfigError naming ``where``."""
    origin = get_origin(tp)
    if origin is Annotated:
        base, *extras = get_args(tp)
        if _ByteSizeMarker in extras:
            try:
                return parse_bytes(value)
            except ConfigError as error:
                raise ConfigError(f"{where}: {error}") from None
        return _coerce(base, value, where)
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{where} must be one of {list(choices)}, got {value!r}{hint}")
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"{where} must be {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple, Sequence):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item_type, *_) = get_args(tp) or (Any,)
        items = [_coerce(item_type, item, f"{where}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a table [{where}], got {value!r}")
        return build(tp, value, where)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported config type {tp!r}")  # pragma: no cover


def _unknown_key_error(cls: type, key: str, where: str) -> ConfigError:
    moved: dict[str, str] = getattr(cls, "MOVED", {})
    if key in moved:
        return ConfigError(f"'{key}' in [{where}] has moved: set {moved[key]}")
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    place = f"[{where}]" if where else "the top level"
    return ConfigError(
        f"unknown key '{key}' in {place}{hint} (valid keys: {', '.join(sorted(names))})"
    )


def build(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad types raise ConfigError."""
    hints = typing.get_type_hints(cls, include_extras=True)
    field_names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in field_names:
            raise _unknown_key_error(cls, key, where)
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}" if where else key)
    for required in dataclasses.fields(cls):  # type: ignore[arg-type]
        no_default = required.default is dataclasses.MISSING
        no_factory = required.default_factory is dataclasses.MISSING
        if no_default and no_factory and required.init and required.name not in kwargs:
            raise ConfigError(f"[{where or cls.__name__}] lacks the key '{required.name}'")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(f"[{where or cls.__name__}] {error}") from None


# ---------------------------------------------------------------------------------------------
# Overrides and files


def split_overrides(argv: Iterable[str]) -> tuple[list[str], list[str]]:
    """Separate ``--section.key=value`` arguments from the rest of a command line."""
    rest, overrides = [], []
    for arg in argv:
        if arg.startswith("--") and "=" in arg and "." in arg.split("=", 1)[0]:
            overrides.append(arg[2:])
        else:
            rest.append(arg)
    return rest, overrides


def _parse_override_value(text: str) -> Any:
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings onto nested plain data (in place, returned)."""
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} must look like section.key=value")
        dotted, text = override.split("=", 1)
        *path, last = dotted.strip().lstrip("-").split(".")
        node = data
        for part in path:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: '{part}' is not a section")
            node = child
        node[last] = _parse_override_value(text.strip())
    return data


def _coerce_override_strings(cls: type, data: dict[str, Any]) -> None:
    """A CLI value like ``--a.b=64`` for a string field stays the string '64'."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for key, value in data.items():
        if key not in hints:
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            _coerce_override_strings(typing.cast(type, tp), value)
        elif tp is str and isinstance(value, int | float) and not isinstance(value, bool):
            data[key] = str(value)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Load ``cls`` from an optional TOML file plus ``section.key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as handle:
                data = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path} is not valid TOML: {error}") from None
    apply_overrides(data, overrides)
    _coerce_override_strings(cls, data)
    try:
        return build(cls, data)
    except ConfigError as error:
        source = f"{path}: " if path is not None else ""
        raise ConfigError(f"{source}{error}") from None


def dumps_toml(data: Mapping[str, Any]) -> str:
    """Write nested plain data as TOML (tables for dicts, inline scalars and lists)."""
    lines: list[str] = []

    def scalar(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return repr(value)
        if isinstance(value, str):
            return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(value, list | tuple):
            return "[" + ", ".join(scalar(v) for v in value) + "]"
        if isinstance(value, Mapping):  # a table inside a list (data.mix): inline
            return "{" + ", ".join(f"{k} = {scalar(v)}" for k, v in value.items()) + "}"
        if value is None:
            raise ConfigError("TOML has no null; leave the key out instead")
        raise ConfigError(f"cannot write {value!r} as TOML")

    def table(prefix: str, node: Mapping[str, Any]) -> None:
        plain = {k: v for k, v in node.items() if not isinstance(v, Mapping) and v is not None}
        nested = {k: v for k, v in node.items() if isinstance(v, Mapping)}
        if prefix:
            lines.append(f"[{prefix}]")
        lines.extend(f"{key} = {scalar(value)}" for key, value in plain.items())
        if prefix:
            lines.append("")
        for key, value in nested.items():
            table(f"{prefix}.{key}" if prefix else key, value)

    table("", data)
    return "\n".join(lines).rstrip() + "\n"
