"""BC vs FKPD (two forms of the objective) vs filtered BC vs Diffusion-DPO vs DPO + reverse KL.

For every task and seed: generate the default (perturbed) dataset and clone a BC policy
(reused when already there), then for every teacher and method run the headless loop
(:func:`fkpd.train.loop.run_loop`: rounds of rollouts of the current policy, scripted labels,
alignment on all labels so far, evaluation). BC is round 0 of each run. At most 500
labels per run (``rounds × pairs_per_round``).

Methods (``--methods``; every one on the same data, BC, label budget and evaluation
seeds, so the comparison is paired per seed):

* ``forward``: FKPD, the paper's additive form L_DPO + λ·L_BC(D);
* ``in_sigmoid``: FKPD, the released code's form (BC term inside the sigmoid, c_bc = 1,
  reference terms on, accuracy-based learning-rate decay k = 20);
* ``cpod``: the released code's MetaWorld settings (in-sigmoid, no reference terms,
  lr 2e-5, decay k = 20);
* ``filtered_bc``: behaviour cloning on the preferred segments only (the simplest use
  of the labels);
* ``none``: Diffusion-DPO alone; ``reverse``: DPO + the DPOK-style reverse-KL term.

Prints one markdown table per (task, teacher): success rate, mean return, the teacher's
intent score, the OOD action distance and the final implicit accuracy, as mean ± std
over seeds, then the paired differences against BC (per seed, and their mean with a 95%
bootstrap interval over seeds), and the same averaged over tasks; plus alignment steps/s.
Writes everything to ``bench/results/bench_alignment.json`` (or ``--json``).

The return teacher runs on every task; intent teachers (any other ``--teachers``) run
on ``--intent-tasks`` (default: the first task). The default configuration (4 MetaWorld
tasks × 3 seeds × 5 methods, 2 rounds of 200 pairs = 400 labels per run, 50 evaluation
episodes per version) is 60 runs. It is resumable: finished runs
(``OUT/<task>/seed<s>/<teacher>/<method>/loop.json`` with every round) are kept, runs
are claimed through lock files so several processes share the work, and
``--report-only`` rebuilds the tables from what is on disk::

    python bench/bench_alignment.py --jobs 2                 # the full benchmark
    python bench/bench_alignment.py --report-only            # table from finished runs
    python bench/bench_alignment.py --tasks metaworld/door-open-v3 --seeds 0 \\
        --teachers return --rounds 1 --pairs-per-round 32 --steps 60 --bc-steps 500 \\
        --bc-episodes 30 --eval-episodes 10                  # a smoke run

On D4RL tasks the table adds the D4RL normalised score (0-100 scale, mean ± std over
seeds). The maze2d-umaze benchmark labels whole episodes, maze2d's default segment length
(its reward is sparse: 1 per step within 0.5 m of the goal, so the return of a 300-step
segment is the time spent at the goal, the quantity the D4RL score normalises)::

    python bench/bench_alignment.py --tasks d4rl/maze2d-umaze --teachers return \\
        --methods forward reverse --segment-length 300 --eval-episodes 50 --jobs 2 \\
        --out runs/bench_maze2d --json bench/results/bench_maze2d.json

The "decided labels" column is the share of labels that were left/right rather than
equal; pairs whose two clips tie (e.g. neither reaches the goal) carry no preference.

Active query selection (:mod:`fkpd.train.acquisition`): ``--query-selection uniform
disagreement diversity`` runs every method with each rule (pairs chosen from
``--candidate-factor`` times as many candidates; ``uniform`` is the plain loop), and
``--label-budgets 100 200 400`` runs each at every budget B (``--rounds`` rounds of B /
``--rounds`` pairs) and prints a labels curve (success against labels) per rule. Runs
are keyed by rule and budget (``OUT/<task>/seed<s>/<teacher>/<method>[+<rule>x<factor>][/labels<B>]``,
the plain ``<method>`` folder for uniform without budgets; a budget of ``--rounds ×
--pairs-per-round`` labels is the plain run itself), so they share one --out directory,
data, BC policy and the default budget's runs with the plain benchmark::

    python bench/bench_alignment.py --tasks metaworld/door-open-v3 --seeds 0 1 2 --methods forward \
        --query-selection uniform disagreement diversity --label-budgets 100 200 400 \
        --out runs/bench_acquisition --json bench/results/bench_acquisition.json

Label efficiency (issue #13: does a rule reach with B labels what ``uniform`` reaches
with more?): ``--versus-uniform 400`` also reads each method's ``uniform`` runs at 400
labels (they must be finished in the same --out) and prints, per rule and budget, the
paired per-seed difference in final success rate against them (averaged over the tasks,
with a 95 % bootstrap interval over seeds)::

    python bench/bench_alignment.py --jobs 2 --tasks metaworld/door-open-v3 metaworld/button-press-v3 \
        --methods in_sigmoid --query-selection uniform disagreement diversity --label-budgets 200 \
        --versus-uniform 400 --json bench/results/bench_acquisition.json

Segments, label source and version choice are run settings too (``--segment-start``,
``--label-source``, ``--dataset-share``, ``--validation-episodes``, ``--continue-from``; one
value per --out directory). With ``--validation-episodes V`` every version is also rolled
out on V held-out validation episodes and a run delivers its best version by them (with
``--continue-from best``, each round also starts from it); the tables then report that
version's evaluation, so choosing and reporting use different episodes.

Two loop configurations (``--versus-out DIR``): runs in another --out directory made with
other rounds, pairs per round, steps or β, but the same data, BC and evaluation settings,
pair per task and seed with these; the table gives each method's success here minus
there, averaged over the tasks, with a 95 % bootstrap interval over seeds::

    python bench/bench_alignment.py --jobs 2 --methods in_sigmoid --rounds 4 --pairs-per-round 100 \\
        --out runs/bench_alignment_r4 --json bench/results/bench_alignment_r4.json --versus-out runs/bench_alignment
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from fkpd.train.align import AlignConfig
from fkpd.data import generate_dataset
from fkpd.config import json_safe, read_config_file, save_config_toml
from fkpd.errors import ConfigError
from fkpd.prefs.pairs import MAX_CANDIDATE_FACTOR
from fkpd.train.acquisition import DEFAULT_CANDIDATE_FACTOR, QUERY_SELECTIONS
from fkpd.train.loop import LABEL_SOURCES, LoopConfig, run_loop
from fkpd.train.bc import BCConfig, train_bc

#: method -> (table label, AlignConfig overrides). Each method names its objective,
#: regulariser and learning-rate decay, so a change of AlignConfig's defaults does not
#: change what a method means (runs of one --out directory stay comparable).
_ADDITIVE = {"objective": "additive", "acc_lr_decay": 0.0}
METHODS: dict[str, tuple[str, dict]] = {
    "forward": ("FKPD (forward KL, additive)", {**_ADDITIVE, "regularizer": "forward"}),
    "in_sigmoid": ("FKPD (in-sigmoid form)", {"objective": "in_sigmoid", "acc_lr_decay": 20.0}),
    "cpod": ("FKPD (released code's config)", {"objective": "in_sigmoid", "with_reference": False, "lr": 2e-5,
                                               "acc_lr_decay": 20.0}),
    "filtered_bc": ("filtered BC", {"objective": "filtered_bc", "acc_lr_decay": 0.0}),
    "none": ("Diffusion-DPO (no reg.)", {**_ADDITIVE, "regularizer": "none"}),
    "reverse": ("DPO + reverse KL", {**_ADDITIVE, "regularizer": "reverse"}),
}
DEFAULT_METHODS = ["forward", "in_sigmoid", "filtered_bc", "none", "reverse"]
MAX_LABELS = 800
BOOTSTRAP_RESAMPLES = 10_000


def bootstrap_ci(values, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with
    replacement, :data:`BOOTSTRAP_RESAMPLES` times). With 3 seeds it is coarse: it can
    only be as wide as the spread of the values."""
    v = np.asarray([x for x in values if x is not None], float)
    if len(v) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(BOOTSTRAP_RESAMPLES, len(v)))].mean(1)
    return (float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2)))


def paired_differences(per_seed_bc: dict[int, float], per_seed: dict[int, float]) -> dict:
    """Method − BC per seed (same data, BC and evaluation seeds), their mean and its 95%
    bootstrap interval."""
    seeds = sorted(set(per_seed_bc) & set(per_seed))
    diffs = [per_seed[s] - per_seed_bc[s] for s in seeds]
    return {"seeds": seeds, "diffs": diffs, "mean": float(np.mean(diffs)) if diffs else None,
            "ci95": list(bootstrap_ci(diffs))}


def _fmt(values: list[float], pct: bool = False, digits: int = 1) -> str:
    v = np.asarray([x for x in values if x is not None], float)
    if not len(v):
        return "n/a"
    scale = 100.0 if pct else 1.0
    unit = "%" if pct else ""
    if len(v) == 1:
        return f"{scale * v[0]:.{digits}f}{unit}"
    return f"{scale * v.mean():.{digits}f} ± {scale * v.std(ddof=1):.{digits}f}{unit}"


# The settings that must match for runs in one --out directory to be comparable.
_RUN_KEYS = ("rounds", "pairs_per_round", "segment_length", "steps", "beta", "lam", "bc_steps", "bc_episodes",
             "eval_episodes", "max_episode_steps", "segment_start", "label_source", "dataset_share",
             "validation_episodes", "continue_from")
#: Values of run settings added after the first --out directories were written (their
#: bench_args.json lacks the key: they were made with these).
_RUN_DEFAULTS = {"segment_start": 0, "label_source": "policy", "dataset_share": 0.5, "validation_episodes": 0,
                 "continue_from": "latest"}


def _pts(x) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{100 * x:+.1f}"


def _across_tasks(tables: list[dict], args) -> list[dict]:
    """Per method and teacher: per seed, the success − BC averaged over the tasks that
    have every seed; the mean over seeds and its 95% bootstrap interval."""
    out = []
    for teacher in args.teachers:
        sel = [t for t in tables if t["teacher"] == teacher]
        if len(sel) < 2:
            continue
        print()
        print(f"### Averaged over {len(sel)} tasks, teacher `{teacher}`: success − BC (points)")
        print()
        print("| method | per seed (mean over tasks) | mean [95% bootstrap CI over seeds] | tasks |")
        print("|---|---|---|---|")
        for method, label in _variants(args):
            per_seed: dict[int, list[float]] = {}
            tasks = 0
            for t in sel:
                row = next((r for r in t["rows"] if r.get("key") == method), None)
                if row is None:
                    continue
                tasks += 1
                for s, d in zip(row["paired_success_vs_bc"]["seeds"], row["paired_success_vs_bc"]["diffs"]):
                    per_seed.setdefault(s, []).append(d)
            diffs = {s: float(np.mean(v)) for s, v in per_seed.items() if len(v) == tasks}
            vals = [diffs[s] for s in sorted(diffs)]
            ci = bootstrap_ci(vals)
            mean = float(np.mean(vals)) if vals else None
            out.append({"teacher": teacher, "method": method, "tasks": tasks, "per_seed": diffs, "mean": mean,
                        "ci95": list(ci)})
            print(f"| {label} | {', '.join(f'{100 * v:+.1f}' for v in vals)} | {_pts(mean)} "
                  f"[{_pts(ci[0])}, {_pts(ci[1])}] | {tasks} |")
    return out


def _budgets(args) -> list[int | None]:
    """The label budgets of a run (None: ``--rounds × --pairs-per-round``, the plain layout)."""
    return list(args.label_budgets) if args.label_budgets else [None]


def _variant(method: str, rule: str = "uniform", budget: int | None = None) -> str:
    """A run's key within (task, seed, teacher): the method, then ``+rule`` unless
    uniform, then ``@B`` with a label budget (the plain method name by default)."""
    return method + ("" if rule == "uniform" else f"+{rule}") + ("" if budget is None else f"@{budget}")


def _variants(args) -> list[tuple[str, str]]:
    """``(key, table label)`` of every method × query selection × label budget."""
    out = []
    for method in args.methods:
        for rule in args.query_selection:
            for budget in _budgets(args):
                label = METHODS[method][0]
                if rule != "uniform":
                    label += f", {rule} ×{args.candidate_factor}"
                if budget is not None:
                    label += f", {budget} labels"
                out.append((_variant(method, rule, budget), label))
    return out


def _label_curves(runs: list[dict], args) -> list[dict]:
    """With ``--label-budgets``: per task, teacher, method and query selection, the final
    success rate (mean ± std over seeds) at each label budget; printed as one table per
    (task, teacher), a row per method × rule, a column per budget."""
    if not args.label_budgets:
        return []
    out = []
    for task in args.tasks:
        for teacher in args.teachers:
            sel = [r for r in runs if r["task"] == task and r["teacher"] == teacher]
            if not sel:
                continue
            print()
            print(f"### Labels curve: {task}, teacher `{teacher}`: success rate (mean ± std over seeds) by labels")
            print()
            print("| method | query selection | " + " | ".join(f"{b} labels" for b in args.label_budgets) + " |")
            print("|---|---|" + "---|" * len(args.label_budgets))
            for method in args.methods:
                for rule in args.query_selection:
                    per_budget = {b: [r["final"]["success_rate"] for r in sel
                                      if r["method"] == method and r.get("query_selection", "uniform") == rule
                                      and r.get("label_budget") == b] for b in args.label_budgets}
                    out.append({"task": task, "teacher": teacher, "method": method, "query_selection": rule,
                                "candidate_factor": None if rule == "uniform" else args.candidate_factor,
                                "success_rate": {str(b): v for b, v in per_budget.items()}})
                    rule_txt = rule if rule == "uniform" else f"{rule} ×{args.candidate_factor}"
                    print(f"| {METHODS[method][0]} | {rule_txt} | "
                          + " | ".join(_fmt(v, pct=True, digits=0) for v in per_budget.values()) + " |")
    return out


def _paired_over_tasks(per_seed: dict[int, list[tuple[float, float]]]) -> dict:
    """``per_seed``: seed -> [(success here, success there) per task]. Keeps the seeds
    that have the most tasks, averages ``here − there`` over their tasks, and returns
    ``tasks``, ``seeds``, ``diffs`` (per seed), ``mean``, ``ci95`` (bootstrap over seeds)
    and the successes on both sides (``here``, ``there``, flat lists)."""
    n_tasks = max((len(v) for v in per_seed.values()), default=0)
    kept = {sd: v for sd, v in per_seed.items() if len(v) == n_tasks}
    diffs = [float(np.mean([a - b for a, b in kept[sd]])) for sd in sorted(kept)]
    return {"tasks": n_tasks, "seeds": sorted(kept), "diffs": diffs,
            "mean": float(np.mean(diffs)) if diffs else None, "ci95": list(bootstrap_ci(diffs)),
            "here": [a for v in kept.values() for a, _ in v], "there": [b for v in kept.values() for _, b in v]}


def _label_efficiency(runs: list[dict], args) -> list[dict]:
    """With ``--versus-uniform B``: per method, rule and budget b, the final success rate
    minus that of the same method's ``uniform`` run at B labels, paired per seed (same
    data, BC and evaluation seeds), averaged over the tasks that have both; its mean over
    seeds and 95 % bootstrap interval. ≥ 0 means b labels chosen by the rule did at least
    as well as B chosen uniformly."""
    big = args.versus_uniform
    if not big:
        return []
    ref: dict[tuple, float] = {}
    for task, seed, teacher, method in {(t, s, te, m) for t, s, te, m, _, _ in _work(args)}:
        summary = _finished(args, _run_dir(args, task, seed, teacher, method, "uniform", big))
        if summary is not None:
            ref[(task, seed, teacher, method)] = _final(summary)["success_rate"]
    out = []
    for teacher in args.teachers:
        print()
        print(f"### Label efficiency, teacher `{teacher}`: success − uniform at {big} labels (points, paired per "
              f"seed, mean over {', '.join(t.split('/')[-1] for t in args.tasks)})")
        print()
        print(f"| method | query selection | labels | success | uniform at {big} | per seed | "
              "mean [95% bootstrap CI over seeds] |")
        print("|---|---|---|---|---|---|---|")
        for method in args.methods:
            for rule in args.query_selection:
                for budget in _budgets(args):
                    b = budget or args.rounds * args.pairs_per_round
                    mine = [r for r in runs if r["teacher"] == teacher and r["method"] == method
                            and r.get("query_selection", "uniform") == rule and r.get("label_budget") == budget]
                    per_seed: dict[int, list[tuple[float, float]]] = {}
                    for r in mine:
                        k = (r["task"], r["seed"], teacher, method)
                        if k in ref:
                            per_seed.setdefault(r["seed"], []).append((r["final"]["success_rate"], ref[k]))
                    p = _paired_over_tasks(per_seed)
                    n_tasks, diffs, mean, ci = p["tasks"], p["diffs"], p["mean"], p["ci95"]
                    succ, unif = p["here"], p["there"]
                    out.append({"teacher": teacher, "method": method, "query_selection": rule, "labels": b,
                                "versus_uniform_labels": big, "tasks": n_tasks, "seeds": p["seeds"],
                                "diffs": diffs, "mean": mean, "ci95": list(ci),
                                "success_mean": float(np.mean(succ)) if succ else None,
                                "uniform_success_mean": float(np.mean(unif)) if unif else None})
                    rule_txt = rule if rule == "uniform" else f"{rule} ×{args.candidate_factor}"
                    print(f"| {METHODS[method][0]} | {rule_txt} | {b} | {_fmt(succ, pct=True, digits=0)} | "
                          f"{_fmt(unif, pct=True, digits=0)} | {', '.join(f'{100 * x:+.1f}' for x in diffs)} | "
                          f"{_pts(mean)} [{_pts(ci[0])}, {_pts(ci[1])}] |")
    return out


def _work(args) -> list[tuple[str, int, str, str, str, int | None]]:
    intent_tasks = args.intent_tasks or args.tasks[:1]
    return [(task, seed, teacher, method, rule, budget)
            for task in args.tasks for seed in args.seeds for teacher in args.teachers
            if teacher == "return" or task in intent_tasks
            for method in args.methods for rule in args.query_selection for budget in _budgets(args)]


def _seed_root(args, task: str, seed: int) -> Path:
    return Path(args.out) / task.replace("/", "_") / f"seed{seed}"


def _run_dir(args, task, seed, teacher, method, rule="uniform", budget=None) -> Path:
    """A run's folder; a budget of ``--rounds × --pairs-per-round`` labels is the plain run
    (the same loop configuration), so labels curves reuse the benchmark's runs."""
    d = _seed_root(args, task, seed) / teacher / (method if rule == "uniform" else
                                                  f"{method}+{rule}x{args.candidate_factor}")
    return d if budget is None or budget == args.rounds * args.pairs_per_round else d / f"labels{budget}"


def _final(summary: dict) -> dict:
    """The version a run delivers: the last round's, or, when the loop chose its best
    version on held-out validation episodes (``--validation-episodes``), that one. Its
    figures are the evaluation episodes' either way (the same seeds for every version)."""
    best = summary.get("best") or {}
    if best.get("selected_by") == "validation":
        return summary["rounds"][best["round"]]
    return summary["rounds"][-1]


def _finished(args, run_dir: Path) -> dict | None:
    f = run_dir / "loop.json"
    if not f.exists():
        return None
    summary = json.loads(f.read_text())
    return summary if len(summary.get("rounds", [])) == args.rounds + 1 else None


def _claim(path: Path) -> bool:
    """Atomically claim a piece of work (O_EXCL lock file holding our pid); a dead owner's claim is taken over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(path.read_text() or 0)
                os.kill(pid, 0)
                return pid == os.getpid()
            except (ValueError, ProcessLookupError):
                path.unlink(missing_ok=True)  # the owner died: take the work over
                continue
            except PermissionError:
                return False
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return True
    return False


def _prepare_bc(args, task: str, seed: int) -> Path | None:
    """Dataset + BC checkpoint for (task, seed): built here when claimed, else None while another process builds it."""
    root = _seed_root(args, task, seed)
    done = root / "bc" / "DONE"
    if done.exists():
        return Path(done.read_text())
    if not _claim(root / ".bc.claim"):
        return None
    data = root / "data.hdf5"
    if not data.exists():
        print(f"[{task} seed {seed}] generating {args.bc_episodes} episodes", flush=True)
        generate_dataset(task, args.bc_episodes, data, seed=seed,
                         max_episode_steps=args.max_episode_steps or None, progress=False)
    print(f"[{task} seed {seed}] behaviour cloning, {args.bc_steps} steps", flush=True)
    bc = train_bc(BCConfig(task=task, dataset=str(data), out_dir=str(root / "bc"), steps=args.bc_steps,
                           eval_every=0, seed=seed, device=args.device, threads=args.threads), progress=False)
    done.write_text(str(bc))
    (root / ".bc.claim").unlink(missing_ok=True)
    return bc


def _worker(args) -> None:
    torch.set_num_threads(args.threads)
    while True:
        pending = [w for w in _work(args) if _finished(args, _run_dir(args, *w)) is None]
        if not pending:
            return
        started = False
        for task, seed, teacher, method, rule, budget in pending:
            run_dir = _run_dir(args, task, seed, teacher, method, rule, budget)
            bc = _prepare_bc(args, task, seed)
            if bc is None or not _claim(run_dir / ".claim"):
                continue
            pairs = args.pairs_per_round if budget is None else budget // args.rounds
            cfg = LoopConfig(task=task, teacher=teacher, rounds=args.rounds, pairs_per_round=pairs,
                             query_selection=rule, candidate_factor=args.candidate_factor,
                             segment_length=args.segment_length, segment_start=args.segment_start,
                             label_source=args.label_source, dataset_share=args.dataset_share, out_dir=str(run_dir),
                             dataset=str(_seed_root(args, task, seed) / "data.hdf5"), bc_checkpoint=str(bc),
                             eval_episodes=args.eval_episodes, max_episode_steps=args.max_episode_steps,
                             n_envs=args.n_envs, seed=seed, validation_episodes=args.validation_episodes,
                             continue_from=args.continue_from)
            acfg = AlignConfig(**{"steps": args.steps, "beta": args.beta, "lam": args.lam, "threads": args.threads,
                                  "device": args.device, **METHODS[method][1]})
            tr = time.time()
            tag = f"[{task} seed {seed} {teacher} {_variant(method, rule, budget)}]"
            summary = run_loop(cfg, acfg, progress=False, log=lambda s: print(f"{tag} {s}", flush=True))
            last = _final(summary)
            print(f"{tag} done (round {last['round']}): success {last['success_rate']:.0%}, "
                  f"return {last['mean_return']:.1f}, intent {last['intent_score']:.4g}, {time.time() - tr:.0f} s",
                  flush=True)
            (run_dir / ".claim").unlink(missing_ok=True)
            started = True
            break
        if not started:
            time.sleep(10)  # everything left is claimed or waits for a BC policy another process is training


def _check_out_dir(args) -> None:
    """Refuse to mix runs made with different settings in one --out directory."""
    f = Path(args.out) / "bench_args.json"
    mine = {k: getattr(args, k) for k in _RUN_KEYS}
    if f.exists():
        written = json.loads(f.read_text())
        theirs = {k: written.get(k, _RUN_DEFAULTS.get(k)) for k in _RUN_KEYS}
        diff = {k: (theirs.get(k), mine[k]) for k in _RUN_KEYS if theirs.get(k) != mine[k]}
        if diff:
            raise SystemExit(f"{f} was written with other settings ({diff}, as (there, here)); pass another --out "
                             "or the same settings")
    else:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(mine, indent=2))


#: Settings two --out directories must share for ``--versus-out`` to pair their runs
#: (the same data, BC policy and evaluation episodes per task and seed).
_SHARED_KEYS = ("bc_steps", "bc_episodes", "eval_episodes", "max_episode_steps")


def _describe(settings: dict) -> str:
    """A loop configuration in words, from an --out directory's settings (bench_args.json
    or the command line's): rounds × pairs, steps, and the segments, version choice and
    label source where they are not the defaults."""
    s = {**_RUN_DEFAULTS, **settings}
    words = f"{s.get('rounds')} × {s.get('pairs_per_round')} pairs, {s.get('steps')} steps"
    if s.get("segment_length"):
        words += f", L = {s['segment_length']}"
    if s["segment_start"] != 0:
        words += ", random segment starts" if s["segment_start"] < 0 else f", segments from step {s['segment_start']}"
    if s["validation_episodes"]:
        words += f", best of {s['validation_episodes']} validation episodes"
    if s["continue_from"] != "latest":
        words += f", continuing from the {s['continue_from']}"
    if s["label_source"] != "policy":
        words += f", {s['label_source']} pairs" + (f" (share {s['dataset_share']:g})" if s["label_source"] == "mix"
                                                 else "")
    return words


def _versus_out(runs: list[dict], args) -> list[dict]:
    """With ``--versus-out DIR``: every method's plain runs here against the same
    method's runs in DIR, another --out directory of this benchmark made with another
    loop configuration (rounds, pairs per round, steps, β, ...) but the same data, BC and
    evaluation settings (:data:`_SHARED_KEYS`, checked), so the runs pair per task and
    seed. Per seed, the final success rate here minus there, averaged over the tasks
    both have; the mean over seeds and its 95 % bootstrap interval.

    Raises:
        SystemExit: DIR is not an --out directory of this benchmark, or its data, BC or
            evaluation settings differ from these.
    """
    other = args.versus_out
    if not other:
        return []
    f = Path(other) / "bench_args.json"
    if not f.exists():
        raise SystemExit(f"--versus-out {other}: no bench_args.json there; pass an --out directory of "
                         "bench_alignment.py")
    theirs = json.loads(f.read_text())
    diff = {k: (theirs.get(k), getattr(args, k)) for k in _SHARED_KEYS if theirs.get(k) != getattr(args, k)}
    if diff:
        raise SystemExit(f"--versus-out {other} has other data, BC or evaluation settings ({diff}, as (there, "
                         "here)): its runs do not pair with these")
    # DIR's runs are found and checked as finished with this file's own helpers, under its settings
    other_args = argparse.Namespace(**{**vars(args), "out": other, "rounds": theirs.get("rounds"),
                                       "pairs_per_round": theirs.get("pairs_per_round")})
    there, here = _describe(theirs), _describe(vars(args))
    out = []
    for teacher in args.teachers:
        print()
        print(f"### This configuration ({here}) against {other} ({there}), teacher `{teacher}`: success, "
              "paired per seed (points, mean over tasks)")
        print()
        print("| method | success here | success there | per seed | mean [95% bootstrap CI over seeds] | tasks |")
        print("|---|---|---|---|---|---|")
        for method in args.methods:
            per_seed: dict[int, list[tuple[float, float]]] = {}
            for r in runs:
                if r["teacher"] != teacher or r["method"] != method or "key" in r:
                    continue
                summary = _finished(other_args, _run_dir(other_args, r["task"], r["seed"], teacher, method))
                if summary is not None:
                    per_seed.setdefault(r["seed"], []).append((r["final"]["success_rate"],
                                                               _final(summary)["success_rate"]))
            p = _paired_over_tasks(per_seed)
            n_tasks, diffs, mean, ci = p["tasks"], p["diffs"], p["mean"], p["ci95"]
            mine, other_s = p["here"], p["there"]
            out.append({"teacher": teacher, "method": method, "versus_out": other, "here": here, "there": there,
                        "tasks": n_tasks, "seeds": p["seeds"], "diffs": diffs, "mean": mean,
                        "ci95": list(ci), "success_mean": float(np.mean(mine)) if mine else None,
                        "other_success_mean": float(np.mean(other_s)) if other_s else None})
            print(f"| {METHODS[method][0]} | {_fmt(mine, pct=True, digits=0)} | {_fmt(other_s, pct=True, digits=0)} | "
                  f"{', '.join(f'{100 * x:+.1f}' for x in diffs)} | {_pts(mean)} [{_pts(ci[0])}, {_pts(ci[1])}] | "
                  f"{n_tasks} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["metaworld/door-open-v3", "metaworld/button-press-v3",
                                                    "metaworld/plate-slide-v3", "metaworld/sweep-into-v3"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--teachers", nargs="+", default=["return"])
    ap.add_argument("--intent-tasks", nargs="*", default=None,
                    help="tasks for the intent teachers (all but `return`); default: the first of --tasks")
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pairs-per-round", type=int, default=200)
    ap.add_argument("--query-selection", nargs="+", default=["uniform"], choices=list(QUERY_SELECTIONS),
                    help="acquisition rule(s) choosing each round's pairs (fkpd.train.acquisition); several: one run "
                         "per rule")
    ap.add_argument("--candidate-factor", type=int, default=DEFAULT_CANDIDATE_FACTOR,
                    help=f"candidate pairs rolled out per labelled pair with disagreement or diversity "
                         f"(1..{MAX_CANDIDATE_FACTOR})")
    ap.add_argument("--label-budgets", nargs="+", type=int, default=None, metavar="B",
                    help="labels per run, one run per budget (--rounds rounds of B / --rounds pairs; B a multiple "
                         "of --rounds); prints a labels curve. Default: --rounds × --pairs-per-round")
    ap.add_argument("--versus-uniform", type=int, default=0, metavar="B",
                    help="label efficiency: compare every run with the same method's uniform run at B labels "
                         "(finished in the same --out; 0: no comparison)")
    ap.add_argument("--versus-out", default=None, metavar="DIR",
                    help="pair every method's runs with the same method's runs in DIR, another --out of this "
                         "benchmark (another loop configuration, the same data, BC and evaluation settings)")
    ap.add_argument("--segment-length", type=int, default=0,
                    help="L, steps per labelled segment (0: the task's, 64; whole episodes on maze2d)")
    ap.add_argument("--segment-start", type=int, default=LoopConfig.segment_start,
                    help="first step of every segment (-1: random per pair)")
    ap.add_argument("--label-source", default=LoopConfig.label_source, choices=list(LABEL_SOURCES),
                    help="pairs of current-policy rollouts, of offline dataset segments, or a mix")
    ap.add_argument("--dataset-share", type=float, default=LoopConfig.dataset_share,
                    help="with --label-source mix: share of dataset pairs per round")
    # 0 and latest (not fkpd loop's defaults, 50 and best): the benchmark's default
    # configuration and its committed runs are the ones without a version choice
    ap.add_argument("--validation-episodes", type=int, default=_RUN_DEFAULTS["validation_episodes"],
                    help="held-out validation episodes per version; > 0: a run delivers its best version by them "
                         "(reported on the evaluation episodes); fkpd loop's default is 50")
    ap.add_argument("--continue-from", default=_RUN_DEFAULTS["continue_from"], choices=["latest", "best"],
                    help="each round starts from the previous round's version or the best so far (fkpd loop's "
                         "default)")
    ap.add_argument("--steps", type=int, default=AlignConfig.steps, help="alignment steps per round")
    ap.add_argument("--beta", type=float, default=AlignConfig.beta)
    ap.add_argument("--lam", type=float, default=AlignConfig.lam, help="λ of both regularisers")
    ap.add_argument("--bc-steps", type=int, default=BCConfig.steps)
    ap.add_argument("--bc-episodes", type=int, default=100)
    ap.add_argument("--eval-episodes", type=int, default=50)
    ap.add_argument("--max-episode-steps", type=int, default=0, help="0: the task's horizon")
    ap.add_argument("--n-envs", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (1 suits a shared CPU)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes sharing the runs")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--report-only", action="store_true", help="only print the table from finished runs")
    ap.add_argument("--out", default="runs/bench_alignment")
    ap.add_argument("--json", default="bench/results/bench_alignment.json")
    ap.add_argument("--config", default=None, metavar="FILE.toml",
                    help="read these options from a TOML file (keys: the options' names with _, e.g. "
                         "pairs_per_round = 200); flags given here override it; the resolved options are saved as "
                         "OUT/config.toml")
    args = ap.parse_args()
    if args.config:
        try:
            ap.set_defaults(**read_config_file(ap, args.config, command="bench_alignment.py"))
        except ConfigError as exc:
            ap.exit(2, f"error: {' '.join(str(exc).split())}\n")
        args = ap.parse_args()
    if not args.label_budgets and args.rounds * args.pairs_per_round > MAX_LABELS:
        ap.error(f"--rounds × --pairs-per-round = {args.rounds * args.pairs_per_round} labels per run; the benchmark "
                 f"allows at most {MAX_LABELS}")
    for b in args.label_budgets or ():
        if not args.rounds <= b <= MAX_LABELS or b % args.rounds:
            ap.error(f"--label-budgets {b}: each budget must be a multiple of --rounds ({args.rounds}) from "
                     f"{args.rounds} to {MAX_LABELS}")
    if not 1 <= args.candidate_factor <= MAX_CANDIDATE_FACTOR:
        ap.error(f"--candidate-factor must be from 1 to {MAX_CANDIDATE_FACTOR}, got {args.candidate_factor}")
    args.query_selection = list(dict.fromkeys(args.query_selection))
    _check_out_dir(args)
    save_config_toml(Path(args.out) / "config.toml", ap, [("bench_alignment", vars(args))],
                     header=f"Resolved options of bench_alignment.py; rerun with --config {Path(args.out) / 'config.toml'}")
    t0 = time.time()
    if not args.report_only:
        if args.jobs > 1:
            ctx = mp.get_context("spawn")
            procs = [ctx.Process(target=_worker, args=(args,)) for _ in range(args.jobs)]
            for p in procs:
                p.start()
                time.sleep(2)  # stagger the claims
            for p in procs:
                p.join()
            if any(p.exitcode for p in procs):
                raise SystemExit(f"a worker failed (exit codes {[p.exitcode for p in procs]}); finished runs are "
                                 "kept, run the same command again to continue")
        else:
            _worker(args)

    runs = []
    for task, seed, teacher, method, rule, budget in _work(args):
        summary = _finished(args, _run_dir(args, task, seed, teacher, method, rule, budget))
        if summary is not None:
            runs.append({"task": task, "seed": seed, "teacher": teacher, "method": method,
                         "rounds": summary["rounds"], "final": _final(summary), "wall_s": summary.get("wall_s"),
                         **({} if rule == "uniform" and budget is None else
                            {"query_selection": rule, "label_budget": budget,
                             "key": _variant(method, rule, budget)})})
    missing = len(_work(args)) - len(runs)
    tables = []
    for task in args.tasks:
        for teacher in args.teachers:
            sel = [r for r in runs if r["task"] == task and r["teacher"] == teacher]
            if not sel:
                continue
            rows = []
            first = {}
            for r in sel:  # BC = round 0, identical across methods for one seed
                first.setdefault(r["seed"], r["rounds"][0])
            rows.append({"method": "BC", "per_seed": list(first.values())})
            for method, label in _variants(args):
                mine = [r for r in sel if r.get("key", r["method"]) == method]
                outcomes = [rd.get("outcomes", {}) for r in mine for rd in r["rounds"][1:]]
                n = sum(sum(o.values()) for o in outcomes)
                decided = sum(o.get("left", 0) + o.get("right", 0) for o in outcomes)
                rows.append({"method": label, "key": method, "per_seed": [r["final"] for r in mine],
                             "seeds": [r["seed"] for r in mine], "decided_labels": decided / n if n else None})
            bc_success = {s: rd["success_rate"] for s, rd in first.items()}
            for row in rows[1:]:
                row["paired_success_vs_bc"] = paired_differences(
                    bc_success, {s: p["success_rate"] for s, p in zip(row["seeds"], row["per_seed"])})
            tables.append({"task": task, "teacher": teacher, "rows": rows})
            print()
            budget = (f"label budgets {', '.join(map(str, args.label_budgets))} over {args.rounds} round(s)"
                      if args.label_budgets else f"{args.rounds} round(s) × {args.pairs_per_round} pairs")
            print(f"### {task}, teacher `{teacher}` ({len(first)} seed(s), {budget}, {args.eval_episodes} eval "
                  "episodes)")
            print()
            d4rl = any(p.get("d4rl_normalized_score") is not None for row in rows for p in row["per_seed"])
            print("| method | success | mean return |" + (" D4RL score |" if d4rl else "")
                  + " intent score | OOD action dist | implicit acc | decided labels |")
            print("|---|---|---|" + ("---|" if d4rl else "") + "---|---|---|---|")
            for row in rows:
                ps = row["per_seed"]
                col = lambda k: [p.get(k) for p in ps]  # noqa: E731
                score = f" {_fmt(col('d4rl_normalized_score'))} |" if d4rl else ""
                print(f"| {row['method']} | {_fmt(col('success_rate'), pct=True, digits=0)} | "
                      f"{_fmt(col('mean_return'))} |{score} {_fmt(col('intent_score'), digits=4)} | "
                      f"{_fmt(col('ood_action_dist'), digits=3)} | {_fmt(col('implicit_acc'), digits=2)} | "
                      f"{_fmt([row.get('decided_labels')], pct=True, digits=0)} |")
            print()
            print("| method | success − BC per seed (points) | mean [95% bootstrap CI over seeds] |")
            print("|---|---|---|")
            for row in rows[1:]:
                d = row["paired_success_vs_bc"]
                print(f"| {row['method']} | {', '.join(f'{100 * x:+.0f}' for x in d['diffs'])} | "
                      f"{_pts(d['mean'])} [{_pts(d['ci95'][0])}, {_pts(d['ci95'][1])}] |")
    overall = _across_tasks(tables, args)
    curves = _label_curves(runs, args)
    efficiency = _label_efficiency(runs, args)
    versus = _versus_out(runs, args)
    round_s = [rd["round_s"] for r in runs for rd in r["rounds"][1:]]
    sps = [rd["align_steps_per_s"] for r in runs for rd in r["rounds"][1:]]
    print()
    print(f"alignment steps/s: {_fmt(sps)} (batch {AlignConfig.batch_pairs} pairs × 2 × "
          f"L={args.segment_length or 'task default'} "
          f"windows, torch threads {args.threads}, {args.jobs} process(es)); seconds per round: {_fmt(round_s)}; "
          f"wall time of this invocation {time.time() - t0:.0f} s")
    if missing:
        print(f"{missing} of {len(_work(args))} runs are not finished; run without --report-only to continue")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_safe({
        "benchmark": "bench_alignment", "args": vars(args), "runs_missing": missing,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "cuda": torch.cuda.is_available(), "platform": platform.platform()},
        "tables": tables, "across_tasks": overall, "label_curves": curves,
        "label_efficiency": efficiency, "versus_out": versus, "runs": runs, "align_steps_per_s": sps,
        "round_s": round_s,
        "wall_s": time.time() - t0}), indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
