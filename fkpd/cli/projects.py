"""``fkpd projects list|create|show``, ``fkpd rounds start`` and ``fkpd annotators
invite|revoke|list|mode``: the preference store's projects, as the app manages them.

``projects create`` goes through :func:`fkpd.studio.open_project`, the app's first start:
the project and its bootstrap job are created in one transaction. ``rounds start`` goes
through :func:`fkpd.studio.enqueue_round`, the Rounds page's button, with the same checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any, Mapping

from fkpd.cli.common import add_store_args, command, open_store
from fkpd.errors import FKPDError

def create_project(store, args: argparse.Namespace, name: str, task: str, bootstrap: Mapping[str, Any],
                   instructions: str = "", auto_rounds: int | None = None):
    """Create project ``name`` of ``task`` with its bootstrap queued, as the app's
    New-project form does (:func:`fkpd.studio.projects.create_project`; identity from
    ``args.identity``; automatic rounds after ``auto_rounds`` new comparisons, None: the
    batch size, 0: rounds by hand), with ``instructions`` when given (the task's own
    otherwise).

    Returns:
        ``(project, bootstrap job)``; the job is None when another process created the
        project a moment ago.

    Raises:
        StudioError: a taken name or an unknown task.
        ParamError: a bad bootstrap setting.
    """
    from fkpd.studio.projects import create_project as create

    return create(store, name, task, bootstrap, instructions=instructions, identity=args.identity,
                  auto_rounds=auto_rounds)


def _bootstrap_params(args: argparse.Namespace) -> dict[str, Any]:
    """``--bootstrap`` JSON with the bootstrap flags given on top."""
    from fkpd.studio.projects import BOOTSTRAP_FIELDS, bootstrap_settings

    return bootstrap_settings({name: getattr(args, name) for name in BOOTSTRAP_FIELDS}, args.bootstrap)


def _cmd_projects_create(args: argparse.Namespace) -> int:
    instructions = args.instructions or ""
    if args.instructions_file:
        try:
            instructions = Path(args.instructions_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise FKPDError(f"--instructions-file {args.instructions_file!r} cannot be read: {exc}") from None
    from fkpd.studio.projects import check_auto_rounds

    params = _bootstrap_params(args)
    check_auto_rounds(args.auto_rounds, "--auto-rounds")
    with open_store(args) as store:
        project, job = create_project(store, args, args.name, args.task, params, instructions, args.auto_rounds)
    queued = f"its bootstrap is queued (job {job.id})" if job is not None else "its bootstrap was queued by another process"
    print(f"created project {project.name!r} (task {project.task_id}, identity {project.identity}); {queued}: a worker "
          "runs it (`fkpd worker`, or the app's own)")
    if project.identity == "invite":
        print(f"annotators come through invite links: fkpd annotators invite NAME --project {project.name}")
    return 0


def _project_summary(store, project) -> dict[str, Any]:
    """What ``projects list`` / ``projects show`` print about one project
    (:func:`fkpd.studio.projects.project_summary`, also the app's Projects page)."""
    from fkpd.studio.projects import project_summary

    return project_summary(store, project)


def _cmd_projects_list(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        rows = [_project_summary(store, p) for p in store.list_projects()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no project yet: fkpd projects create NAME --task TASK (or start the app: make run)")
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        job = r["training_job"]
        print(f"{r['name']:<{width}}  {r['task']:<30} {r['identity']:<6}  {r['versions']:>3} version(s)  "
              f"{r['comparisons']:>6} comparison(s)  {r['served_version'] or 'not bootstrapped'}"
              + (f"  [{job['summary']}]" if job and job["status"] in ("queued", "running", "failed") else ""))
    return 0


def _cmd_projects_show(args: argparse.Namespace) -> int:
    from fkpd.studio import rounds_history

    with open_store(args) as store:
        project = store.get_project(args.name)
        info = _project_summary(store, project)
        history = rounds_history(store, project)
    if args.json:
        info["rounds"] = json.loads(history.to_json(orient="records", date_format="iso"))
        print(json.dumps(info, indent=2))
        return 0
    o = info["outcomes"]
    print(f"project {info['name']} (id {info['id']})")
    for label, value in (
            ("task", info["task"]), ("identity", info["identity"]), ("created", info["created"]),
            ("settings", ", ".join(f"{k}={v}" for k, v in sorted(info["settings"].items()) if k != "round_params")),
            ("served version", info["served_version"] or "none yet (bootstrap not finished)"),
            ("comparisons", f"{info['comparisons']} by {info['annotators']} annotator(s): {o['left']} left, "
                            f"{o['right']} right, {o['equal']} equal, {o['skip']} skip"),
            ("current batch", f"{info['batch']['answers']} of {info['batch']['needed']} answers"),
            ("training job", (info["training_job"] or {}).get("summary", "none")),
    ):
        print(f"  {label:<15} {value}")
    if info["training_job"] and info["training_job"]["error"]:
        print(f"  {'error':<15} {info['training_job']['error']}")
    print(f"  {'instructions':<15} " + " ".join(info["instructions"].split())[:200])
    if len(history):
        cols = [c for c in ("round", "version", "status", "labels_used", "success_rate", "success_ci95", "vs_parent",
                            "mean_return", "d4rl_score", "implicit_acc", "objective", "regularizer") if c in history]
        print()
        print(history[cols].to_string(index=False))
    return 0


def _cmd_rounds_start(args: argparse.Namespace) -> int:
    """Queue an alignment round, with the Rounds page's checks."""
    from fkpd.studio import ROUND_FIELDS, enqueue_round

    params = {name: getattr(args, name) for name in ROUND_FIELDS if getattr(args, name) is not None}
    with open_store(args) as store:
        project = store.get_project(args.project)
        job = enqueue_round(store, project, params)
    given = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in params.items()) or "the default parameters"
    print(f"queued alignment round (job {job.id}) of project {project.name!r} with {given}; a worker runs it "
          f"(`fkpd worker`, or the app's own); follow it with `fkpd projects show {project.name}`")
    return 0


def _cmd_annotators(args: argparse.Namespace) -> int:
    """``fkpd annotators invite|revoke|list|mode``: who may label a project."""
    from fkpd.studio.identity import create_invite, invite_link

    with open_store(args) as store:
        project = store.get_project(args.project)
        if args.annotators_cmd == "invite":
            invite = create_invite(store, project, args.name)
            print(invite_link(args.base_url, invite.token))
            mode = "" if project.identity == "invite" else (
                f" (project {project.name!r} is in open mode: switch with `fkpd annotators mode invite --project "
                f"{project.name}`)")
            print(f"invite link for {invite.annotator!r} in project {project.name!r}; it is shown only once{mode}",
                  file=sys.stderr)
        elif args.annotators_cmd == "revoke":
            n = store.revoke_invites(project.id, args.name)
            print(f"revoked {n} invite link(s) of {args.name!r} in project {project.name!r}")
        elif args.annotators_cmd == "list":
            print(f"project {project.name!r}: identity mode {project.identity}")
            for inv in store.list_invites(project.id):
                state = "valid" if inv.active else f"revoked {inv.revoked_at:%Y-%m-%d %H:%M}"
                print(f"  invite {inv.id:>4}  {inv.annotator:<24} created {inv.created_at:%Y-%m-%d %H:%M}  {state}")
        else:
            store.update_project(project.id, identity=args.mode)
            print(f"project {project.name!r} is now in {args.mode} mode")
    return 0


def _attribute_help(cls: type) -> dict[str, str]:
    """``{name: text}`` from the ``Attributes:`` section of ``cls``'s docstring (first sentence)."""
    doc = (cls.__doc__ or "").split("Attributes:", 1)[-1]
    out = {}
    for m in re.finditer(r"^ {8}(\w+): (.+?)(?=^ {8}\w+: |\Z)", doc, flags=re.M | re.S):
        out[m.group(1)] = " ".join(m.group(2).split()).split(". ")[0].rstrip(".")
    return out


def add_parsers(sub) -> None:
    """``fkpd projects ...``, ``fkpd rounds start``, ``fkpd annotators ...``."""
    from fkpd.studio import BatchSettings, round_defaults
    from fkpd.train.align import AlignConfig

    projects = sub.add_parser("projects", help="the preference store's projects").add_subparsers(
        dest="projects_cmd", required=True)
    s = command(projects, "list", _cmd_projects_list, "every project: task, versions, comparisons, training job")
    s.add_argument("--json", action="store_true", help="print JSON instead")
    add_store_args(s)
    s = command(projects, "show", _cmd_projects_show,
                "one project: settings, served version, comparisons, training job, rounds history")
    s.add_argument("name", help="project name")
    s.add_argument("--json", action="store_true", help="print JSON instead")
    add_store_args(s)
    s = command(projects, "create", _cmd_projects_create,
                "create a project and queue its bootstrap (data, BC, evaluation, first batch), as the app's first "
                "start does")
    s.add_argument("name", help="project name (unique)")
    s.add_argument("--task", required=True, help="task id from the registry (fkpd tasks)")
    s.add_argument("--identity", choices=("invite", "open"), default="invite",
                   help="invite: annotators come through invite links (fkpd annotators invite); open: they type "
                        "a name (demos)")
    s.add_argument("--instructions", default=None, help="text shown to annotators (default: the task's own)")
    s.add_argument("--instructions-file", default=None, help="read the instructions from this file")
    s.add_argument("--auto-rounds", type=int, default=None, metavar="N",
                   help="start an alignment round after every N new trainable comparisons (0: rounds by hand; "
                        "default: the batch size, as in the app)")
    from fkpd.studio.projects import BOOTSTRAP_FIELDS

    for name, (tp, help_text) in BOOTSTRAP_FIELDS.items():
        s.add_argument("--" + name.replace("_", "-"), type=tp, default=None, help=help_text)
    s.add_argument("--bootstrap", default=None, metavar="JSON",
                   help="other bootstrap settings as a JSON object, as FKPD_BOOTSTRAP (e.g. '{\"bc\": {\"lr\": "
                        "5e-4}, \"policy\": {\"hidden_dim\": 128}, \"render_size\": 160}'); the flags above win")
    add_store_args(s)

    rounds = sub.add_parser("rounds", help="alignment rounds of a project").add_subparsers(dest="rounds_cmd",
                                                                                         required=True)
    s = command(rounds, "start", _cmd_rounds_start,
                "queue an alignment round on the project's comparisons (the Rounds page's button)")
    s.add_argument("--project", required=True, help="project name in the preference store")
    helps = {**_attribute_help(BatchSettings),
             **{f.name: f.metadata.get("help", "") for f in dataclasses.fields(AlignConfig)}}
    for name, default in round_defaults().items():
        tp = type(default) if type(default) in (int, float, str) else str
        s.add_argument("--" + name.replace("_", "-"), type=tp, default=None,
                       help=f"{helps.get(name, '')} (default: {default})")
    add_store_args(s)

    ann = sub.add_parser("annotators", help="who may label a project: invite links and identity mode")
    cmds = ann.add_subparsers(dest="annotators_cmd", required=True)
    s = command(cmds, "invite", _cmd_annotators, "create an invite link for an annotator (registered if new)")
    s.add_argument("name")
    s.add_argument("--base-url", default="http://localhost:8501", help="the app's address as annotators reach it")
    s = command(cmds, "revoke", _cmd_annotators, "revoke every invite link of an annotator")
    s.add_argument("name")
    command(cmds, "list", _cmd_annotators, "the project's identity mode and invite links")
    s = command(cmds, "mode", _cmd_annotators, "switch the project between invite links and open names")
    s.add_argument("mode", choices=("invite", "open"))
    for s in cmds.choices.values():
        s.add_argument("--project", required=True, help="project name in the preference store")
        add_store_args(s)
