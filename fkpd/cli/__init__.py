"""The ``fkpd`` command line.

Subcommands (one module per group: :mod:`~fkpd.cli.data`, :mod:`~fkpd.cli.train`,
:mod:`~fkpd.cli.worker`, :mod:`~fkpd.cli.labels`, :mod:`~fkpd.cli.projects`,
:mod:`~fkpd.cli.report`)::

    fkpd tasks                                   list task ids
    fkpd data generate --task T --episodes N --out FILE [--clean]
    fkpd data info FILE|D4RL_NAME|minari:ID
    fkpd data import minari:ID --out FILE [--task T]
    fkpd train-bc --task T --dataset FILE [config flags] [--config FILE.toml] [--wandb]
    fkpd eval CHECKPOINT --episodes N [--videos DIR]
    fkpd pipeline [--task T]                     data -> BC -> eval -> clips
    fkpd align --checkpoint REF --prefs FILE [--regularizer forward|reverse|none] [config flags] [--config FILE.toml]
    fkpd loop --task T --teacher NAME --rounds K --pairs-per-round M [config flags] [--config FILE.toml] [--wandb]
    fkpd worker [--once] [--kinds K,...] [--skip-kinds K,...]   run queued jobs (bootstrap, alignment rounds, ...)
    fkpd projects list | show NAME | create NAME --task T [--identity invite|open] [bootstrap flags]
    fkpd rounds start --project P [--beta B --lam L --steps N ...]       the Rounds page's button
    fkpd prefs export --project P --format parquet|hdf5 --out PATH [--rounds N ...] [--annotators NAME ...]
                      [--excluded include|omit]
    fkpd labels import LABELS --dataset D --project P [--create-project TASK] [--segment-length L]
    fkpd annotators invite NAME --project P      an invite link (invite mode); also revoke, list, mode
    fkpd report --project P --out report.html [--versions A B --episodes N]   one self-contained HTML report
    fkpd demo --project P --out demo.mp4 [--versions A B --episodes N]        before/after video, side by side

User errors (:class:`fkpd.errors.FKPDError`) and usage errors print one line that names
the command's flags, and exit with status 2. ``python -m fkpd.cli`` runs the same
command (the app starts its worker that way).
"""

from __future__ import annotations

import argparse
import sys

from fkpd.cli import data, labels, projects, report, train, worker
from fkpd.cli.common import Parser, UsageError, flag_names, name_flags
from fkpd.config import read_config_file
from fkpd.errors import FKPDError


def build_parser() -> argparse.ArgumentParser:
    """The ``fkpd`` parser with every subcommand."""
    p = Parser(prog="fkpd", description="FKPD Studio: align diffusion policies to preferences")
    sub = p.add_subparsers(dest="cmd", required=True)
    data.add_parsers(sub)         # tasks, data generate|info|import, eval
    train.add_parsers(sub)        # train-bc, pipeline, align, loop
    worker.add_parsers(sub)       # worker
    labels.add_parsers(sub)       # labels import, prefs export
    projects.add_parsers(sub)     # projects list|create|show, rounds start, annotators ...
    report.add_parsers(sub)       # report, demo
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; a ``--config FILE.toml`` sets the command's defaults, and the
    command line is parsed again on top of them (flags given override the file).

    Raises:
        ConfigError: a bad config file (unknown key, wrong type, not TOML).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        sub = args.cmd_parser
        sub.set_defaults(**read_config_file(sub, args.config, command=sub.prog))
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run ``fkpd`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status
    (0, 2 for bad input, 130 when interrupted)."""
    args = None
    try:
        args = _parse(argv)
        return int(args.fn(args) or 0)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except FKPDError as exc:
        names = flag_names(args) if args is not None else ()
        print("error: " + " ".join(name_flags(str(exc), names).split()), file=sys.stderr)  # one line
        return 2
    except KeyboardInterrupt:
        print("interrupted; checkpoints written so far are intact", file=sys.stderr)
        return 130


__all__ = ["build_parser", "main"]
