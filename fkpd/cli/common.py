"""What the ``fkpd`` command groups share: the parser class, store options, and error
messages that name the command's flags rather than Python parameters."""

from __future__ import annotations

import argparse
import re
from typing import Any, Iterable

from fkpd.config import config_options

#: How a missing project is reported by the store, and what a command says instead.
_CREATE_HINT = ("create it with Store.create_project", "create it with `fkpd projects create NAME --task TASK`")


class UsageError(Exception):
    """A command line argparse refused; ``str()`` is the one line to print."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line, exit status 2, like the
    commands' own errors (``fkpd loop: error: argument --steps: invalid int value: 'x'
    (see fkpd loop --help)``): :meth:`error` raises :class:`UsageError`, which
    :func:`fkpd.cli.main` prints."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)")


def command(sub: Any, name: str, fn: Any, help: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand parser running ``fn(args)``; it records itself as ``args.cmd_parser``
    (for ``--config`` files and for naming its flags in error messages)."""
    parser = sub.add_parser(name, help=help, description=help, **kwargs)
    parser.set_defaults(fn=fn, cmd_parser=parser)
    return parser


def add_store_args(parser: argparse.ArgumentParser) -> None:
    """``--database-url`` and ``--artifact-dir`` (the preference store)."""
    parser.add_argument("--database-url", default=None, help="default: $FKPD_DATABASE_URL or labels/fkpd.sqlite")
    parser.add_argument("--artifact-dir", default=None,
                        help="a folder, or an object-store URL (s3://bucket/prefix); default: $FKPD_ARTIFACT_URL, "
                             "else $FKPD_ARTIFACT_DIR, else labels/artifacts")


def open_store(args: argparse.Namespace):
    """The preference store named by ``--database-url`` / ``--artifact-dir``.

    Raises:
        StoreUnavailableError: the database cannot be reached or is not a store.
    """
    from fkpd.store import Store

    return Store(args.database_url, args.artifact_dir)


def flag(name: str) -> str:
    """``pairs_per_batch`` -> ``--pairs-per-batch``."""
    return "--" + name.replace("_", "-")


def name_flags(message: str, names: Iterable[str]) -> str:
    """``message`` with Python parameter names written as the command's flags.

    ``'beta'``, ``beta=3``, ``AlignConfig.beta`` and bare names with an underscore
    (``pairs_per_batch``, never inside a path) become ``--beta`` / ``--pairs-per-batch``;
    the store's "create it with Store.create_project" becomes the command that does.
    """
    message = message.replace(*_CREATE_HINT)
    message = re.sub(r"\b[A-Z]\w*Config\.(\w+)\b", lambda m: flag(m.group(1)), message)
    for name in sorted(set(names), key=len, reverse=True):
        option = flag(name)
        message = message.replace(f"'{name}'", option)
        message = re.sub(rf"(?<![\w/.-]){re.escape(name)}=", option + " ", message)
        if "_" in name:
            message = re.sub(rf"(?<![\w/.-]){re.escape(name)}(?![\w/-]|\.\w)", option, message)
    return message


def flag_names(args: argparse.Namespace) -> tuple[str, ...]:
    """The option names (``dest``) of the command that parsed ``args``."""
    parser = getattr(args, "cmd_parser", None)
    return tuple(config_options(parser)) if parser is not None else ()


__all__ = ["Parser", "UsageError", "add_store_args", "command", "flag", "flag_names", "name_flags", "open_store"]
