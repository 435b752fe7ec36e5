"""Typed configs that double as CLI flags (the CORL pattern).

A config is a dataclass whose fields carry their help text in
``field(metadata={"help": ...})``. :func:`add_dataclass_args` turns the fields into
``--flag`` options and :func:`dataclass_from_args` builds the instance back, so the
resolved config saved beside a checkpoint is exactly what the user asked for.

Experiment configs are TOML files (:func:`read_config_file`, :func:`save_config_toml`):
every key is the name of one of the command's options (``--pairs-per-round`` is
``pairs_per_round``), at the top level or in tables, which only group keys (``[loop]``,
``[align]``, ...); a flag given on the command line overrides the file. A key that is
no option of the command, a key given twice or a value of the wrong type is a
:class:`~fkpd.errors.ConfigError` naming the key and the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

from fkpd.errors import ConfigError

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
        if tp is bool:  # --flag alone means true; --flag false / --flag 0 set false
            parser.add_argument(flag, type=_parse_bool, nargs="?", const=True, default=None, metavar="BOOL",
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


# ---------------------------------------------------------------- experiment configs (TOML)


def config_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The options of ``parser`` a config file may set, by key (the option's ``dest``:
    ``--pairs-per-round`` is ``pairs_per_round``); ``--help`` and ``--config`` are not."""
    return {a.dest: a for a in parser._actions  # noqa: SLF001 (argparse keeps no public list)
            if a.option_strings and a.dest not in ("help", "config") and a.dest != argparse.SUPPRESS
            and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))}  # noqa: SLF001


def _config_value(action: argparse.Action, value: Any, key: str, where: str) -> Any:
    """``value`` checked (and converted) against the option ``action`` takes."""
    flag = action.option_strings[-1]

    def bad(what: str) -> ConfigError:
        return ConfigError(f"{where}: {key} = {value!r} must be {what} (the value of {flag})")

    def scalar(v: Any) -> Any:
        tp = action.type
        if action.nargs == 0 or tp is _parse_bool:
            if not isinstance(v, bool):
                raise bad("true or false")
            return v
        if tp is int:
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad("an integer")
            return v
        if tp is float:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise bad("a number")
            return float(v)
        if tp in (None, str):
            if not isinstance(v, str):
                raise bad("a string")
            return v
        if isinstance(v, str):  # another converter: it reads the text, as on the command line
            try:
                return tp(v)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
                raise bad(f"accepted by {flag} ({exc})") from None
        raise bad("a string")

    if action.nargs in ("+", "*") or isinstance(action.nargs, int) and action.nargs > 0:
        if not isinstance(value, list):
            raise bad("a list")
        out: Any = [scalar(v) for v in value]
        if action.nargs == "+" and not out:
            raise bad("a non-empty list")
        items = out
    else:
        out = scalar(value)
        items = [out]
    if action.choices is not None and any(v not in action.choices for v in items):
        raise bad("one of " + ", ".join(map(repr, action.choices)))
    return out


def read_config_file(parser: argparse.ArgumentParser, path: str | Path, command: str = "") -> dict[str, Any]:
    """Read a TOML experiment config as values of ``parser``'s options.

    Keys are option names with ``_`` (:func:`config_options`), at the top level or in
    tables (a table only groups keys: ``[align] beta = 500`` is ``beta = 500``). Values
    have the option's type: integers, numbers (an integer is fine), strings, ``true`` /
    ``false``, lists for options that take several values; choices are checked.

    Args:
        parser: the command's parser (a subparser for ``fkpd loop`` etc.).
        path: the file.
        command: the command's name for messages (``fkpd loop``).

    Returns:
        ``{dest: value}``, ready for ``parser.set_defaults`` (flags given on the command
        line then override them).

    Raises:
        ConfigError: the file is missing, unreadable or not TOML; a key is no option of
            the command (the message names the key and the file, and the closest key);
            a key is given twice; a value has the wrong type or is not an allowed choice.
    """
    import tomllib

    path = Path(path).expanduser()
    where = str(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"--config {where!r}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {where!r} is not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {where!r} cannot be read: {exc}") from None
    options = config_options(parser)
    command = command or parser.prog
    flat: dict[str, tuple[Any, str]] = {}
    for key, value in data.items():
        entries = value.items() if isinstance(value, dict) else [(key, value)]
        table = f" (in [{key}])" if isinstance(value, dict) else ""
        for k, v in entries:
            if isinstance(v, dict):
                raise ConfigError(f"{where}: [{key}.{k}] nests a table in a table; tables only group keys, one level "
                                  f"deep")
            if k in flat:
                raise ConfigError(f"{where}: {k!r}{table} is set twice; give each key once")
            flat[k] = (v, table)
    out: dict[str, Any] = {}
    for key, (value, table) in flat.items():
        action = options.get(key)
        if action is None:
            close = difflib.get_close_matches(key, list(options), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{table}{hint}; the keys of {command} are its options' "
                              f"names with _ for - (`{command} --help` lists them)")
        out[key] = _config_value(action, value, key, where)
    return out


def config_toml(parser: argparse.ArgumentParser, sections: Sequence[tuple[str, Any]], header: str = "") -> str:
    """The resolved config of a run as TOML that :func:`read_config_file` reads back.

    Args:
        parser: the command's parser; only its options are written.
        sections: ``[(table name, dataclass instance or mapping), ...]``; each option is
            written once, in the first table that holds it; None values (no TOML null)
            are left out, so they keep their defaults when read back.
        header: comment lines at the top.
    """
    import tomli_w

    options = config_options(parser)
    seen: set[str] = set()
    doc: dict[str, dict[str, Any]] = {}
    for name, obj in sections:
        values = to_json_dict(obj) if dataclasses.is_dataclass(obj) else {
            k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in obj.items()}
        table = {k: v for k, v in values.items() if k in options and k not in seen and v is not None}
        seen.update(table)
        if table:
            doc[name] = table
    lines = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return lines + ("\n" if lines else "") + tomli_w.dumps(doc)


def save_config_toml(path: Path, parser: argparse.ArgumentParser, sections: Sequence[tuple[str, Any]],
                     header: str = "") -> Path:
    """Write :func:`config_toml` atomically to ``path`` (folders created); returns ``path``."""
    from fkpd.io import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = config_toml(parser, sections, header)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return path
