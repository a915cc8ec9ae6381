"""Typed dataclass configs from YAML with dotted ``key=value`` overrides.

INTEGRATION: a small stand-in for the generic ``train/config.py`` being written in parallel; replace the
import of ``load_config`` with that module's equivalent and delete this file when merging.

Unknown keys, missing sections and wrong types are errors naming the key; override values are parsed as
YAML scalars (``train.lr=1e-4``, ``model.channel_mult=[1,2,2]``, ``loss.lpips_weights=null``).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")


def load_config(cls: type[T], path: Union[str, Path, None], overrides: Sequence[str] = ()) -> T:
    """Build dataclass ``cls`` from the YAML file ``path`` (None: defaults) with ``overrides`` applied."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config file must be a mapping of sections; got {type(data).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.key=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return _build(cls, data, "")


def config_to_dict(config: Any) -> dict:
    """The plain-data form of a config dataclass (what ``load_config`` reads back)."""
    return dataclasses.asdict(config)


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'} must be a mapping; got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(where + k for k in unknown)}; "
                         f"allowed in {where.rstrip('.') or 'the top level'}: {', '.join(fields)}")
    kwargs = {name: _convert(hints[name], value, f"{where}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"{where.rstrip('.') or 'config'}: {exc}") from None


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin is Union:
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list; got {value!r}")
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, str, bool) and type(value) is tp:
        return value
    if tp is Any:
        return value
    hint = " (YAML reads yes/no/on/off as booleans: quote the value)" if tp is str and isinstance(value, bool) else ""
    raise ValueError(f"{key} must be of type {getattr(tp, '__name__', tp)}; got {value!r}{hint}")
