"""Typed configs that double as CLI flags (the CORL pattern).

A config is a dataclass whose fields carry their help text in
``field(metadata={"help": ...})``. :func:`add_dataclass_args` turns the fields into
``--flag`` options and :func:`dataclass_from_args` builds the instance back, so the
resolved config saved beside a checkpoint is exactly what the user asked for.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(cls)
    tp = hints[f.name]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0]
    return tp


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--field-name`` option per dataclass field (defaults shown in help)."""
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp = _field_type(cls, f)
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "")
        if tp is bool:
            parser.add_argument(flag, type=_parse_bool, default=None, metavar="BOOL",
                                help=f"{help_text} (default: {default})")
        elif typing.get_origin(tp) is tuple:
            parser.add_argument(flag, type=int, nargs="+", default=None,
                                help=f"{help_text} (default: {default})")
        else:
            conv = tp if tp in (int, float, str) else str
            parser.add_argument(flag, type=conv, default=None,
                                help=f"{help_text} (default: {default})")


def dataclass_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """Build ``cls`` from parsed args; flags left unset keep the dataclass default."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        value = getattr(args, f.name, None)
        if value is not None:
            if typing.get_origin(_field_type(cls, f)) is tuple:
                value = tuple(value)
            kwargs[f.name] = value
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**kwargs)


def to_json_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a JSON-safe dict (paths become strings, tuples lists)."""
    def conv(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return {k: conv(v) for k, v in dataclasses.asdict(obj).items()}


def from_json_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Inverse of :func:`to_json_dict`; unknown keys are ignored, tuples restored."""
    names = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for k, v in data.items():
        if k in names:
            if typing.get_origin(_field_type(cls, names[k])) is tuple and isinstance(v, list):
                v = tuple(v)
            kwargs[k] = v
    return cls(**kwargs)


def save_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically (:func:`fkpd.io.atomic_path`)."""
    from fkpd.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))


def json_safe(obj: Any) -> Any:
    """``obj`` as strict JSON values: NaN/inf floats become None, numpy scalars Python
    numbers, tuples lists and mapping keys strings (PostgreSQL refuses NaN in JSON)."""
    import math

    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and type(obj).__module__ == "numpy":  # numpy scalars, without importing numpy
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
