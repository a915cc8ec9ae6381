"""Typed configs: a dataclass from a YAML file plus ``key=value`` overrides, checked field by field.

YAML is data. Every key must name a field of the dataclass (sections are nested
dataclasses), every value must have the field's type, and anything else is a
``ValueError`` that names the key, the expected type and the allowed keys or
values. Nothing in a config names code to import.

    cfg = load_config(ClipTrainConfig, "configs/clip/emoji.yaml", ["optim.lr=3e-4", "run.max_steps=100"])
    save_config(cfg, "runs/x/config.yaml")       # what was run, beside the weights

Supported field types: ``bool``, ``int``, ``float`` (an int is accepted, and so
is a numeric string such as ``1e-3``, which PyYAML reads as a string),
``str``, ``Optional[T]`` / ``T | None``, ``Literal[...]``, ``list[T]``,
``tuple[T, ...]`` and fixed ``tuple[A, B]``, ``dict[str, T]``, ``Any`` (taken
as is) and nested dataclasses. A dataclass's own ``__post_init__`` runs as
usual, so range checks live beside the fields they check.

Overrides are ``dotted.key=value``; the value is parsed as YAML (``true``,
``[1, 2]``, ``null``), then checked like a value from the file.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, TypeVar, Union

import yaml

from ldm_io import write_text

T = TypeVar("T")

_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def _convert(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against (and, for containers and dataclasses, built as) type ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _convert(value, arm, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(f"{where}: {value!r} is not a {_type_name(tp)}" + (f" ({errors[0]})" if len(errors) == 1 else ""))
    if origin is Literal:
        if not any(value == a and type(value) is type(a) for a in args):
            raise ValueError(f"{where}={value!r} is not allowed; allowed values: {', '.join(repr(a) for a in args)}")
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a section (mapping) for {tp.__name__}, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, Sequence) or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        item = args[0] if args else Any
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ValueError(f"{where}: expected {len(args)} items ({_type_name(tp)}), got {len(value)}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args or [Any] * len(value))))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        key_tp, val_tp = args if args else (Any, Any)
        return {_convert(k, key_tp, f"{where} key"): _convert(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)  # PyYAML reads 1e-3 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            hint = " (YAML reads yes/no/on/off as booleans; quote the value)" if isinstance(value, bool) else ""
            raise ValueError(f"{where}: expected a string, got {type(value).__name__} {value!r}{hint}")
        return value
    raise TypeError(f"{where}: field type {_type_name(tp)} is not supported by train.run.config")


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types raise ``ValueError``."""
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(data, Mapping):
        raise ValueError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ValueError(_unknown_key(_join(where, unknown[0]), where, fields, value=data[unknown[0]]))
    kwargs = {name: _convert(value, hints[name], _join(where, name)) for name, value in data.items()}
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"{_join(where, missing[0])}: required key is missing")
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}" if where else str(exc)) from None


def _unknown_key(key: str, where: str, allowed, what: str = ": unknown key", value: Any = None) -> str:
    """The error for an unknown ``key``: its new name when an older dialect used it (for a whole
    section, ``value``, the first of its keys that moved), else the allowed keys."""
    from train.run.sections import RENAMED

    inner = [f"{key}.{k}" for k in value if f"{key}.{k}" in RENAMED] if isinstance(value, Mapping) else []
    for old in inner[:1] + [key]:
        if old in RENAMED:
            return f"{old} was renamed; use {RENAMED[old]}"
    return f"{key}{what}; allowed keys{' in ' + where if where else ''}: {', '.join(allowed)}"


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass as plain data (tuples as lists), ready for YAML or JSON."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> (["a", "b"], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {text!r} must look like key=value or section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ValueError(f"override {text!r}: the value is not valid YAML ({exc.problem})") from None
    return key.split("."), value


def apply_overrides(cls: type, data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set each ``dotted.key=value`` in a copy of the raw mapping ``data`` for dataclass ``cls``.

    The key path is checked against the dataclass fields here (so a typo names the
    allowed keys even when the YAML omitted that section); the value is checked when
    the dataclass is built.
    """
    data = _deep_copy(data)
    for text in overrides:
        path, value = parse_override(text)
        node, node_cls, where = data, cls, ""
        for i, part in enumerate(path):
            hints = typing.get_type_hints(node_cls)
            names = [f.name for f in dataclasses.fields(node_cls) if f.init]
            if part not in names:
                rest = {".".join(path[i + 1:]): None} if i + 1 < len(path) else None  # the key inside a moved section
                raise ValueError(f"override {text!r}: " + _unknown_key(_join(where, part), where, names, " is not a key", rest))
            where = _join(where, part)
            if i == len(path) - 1:
                node[part] = value
                break
            sub = _dataclass_of(hints[part])
            if sub is None:
                raise ValueError(f"override {text!r}: {where} is a {_type_name(hints[part])}, not a section")
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node, node_cls = node[part], sub
    return data


def _dataclass_of(tp: Any) -> Optional[type]:
    if _is_optional(tp):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp if dataclasses.is_dataclass(tp) and isinstance(tp, type) else None


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def load_config(cls: type[T], path: Optional[str | os.PathLike] = None, overrides: Sequence[str] = ()) -> T:
    """``cls`` from a YAML file (or its defaults when ``path`` is None) with ``key=value`` overrides applied."""
    data: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f)
            except yaml.YAMLError as exc:
                raise ValueError(f"{path}: not valid YAML: {exc}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping of keys to values, got {type(data).__name__}")
    try:
        return from_dict(cls, apply_overrides(cls, data, overrides))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}" if path is not None else str(exc)) from None


def save_config(config: Any, path: str | os.PathLike) -> None:
    """Write a dataclass config as YAML, atomically (temporary file, then rename)."""
    write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))
