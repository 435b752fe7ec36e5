"""Typed parameters of the studio's jobs: where they enter, how they are checked.

Parameters cross the process boundary once, as flat JSON in a job row
(:meth:`fkpd.store.JobQueue.enqueue`), and are typed dataclasses everywhere else:

* :class:`BatchSettings`: how batches are rolled out and rendered and versions
  evaluated (recorded with version 0);
* :class:`BootstrapParams`: the ``bootstrap`` job (``FKPD_BOOTSTRAP``): data, BC and
  policy settings (overrides of :class:`fkpd.train.bc.BCConfig` and
  :class:`fkpd.policy.PolicyConfig`) plus the batch settings;
* :class:`RoundParams`: the ``alignment_round`` job (the Rounds page): overrides of
  :class:`fkpd.train.align.AlignConfig` and of the batch settings.

Each is parsed by its ``from_params``: the one validation, run where the parameters
enter (``fkpd.studio.open_project``, ``fkpd.studio.enqueue_round``) and again by the
job; every bad key or value (NaN and infinities included, which PostgreSQL's JSON
cannot hold) raises :class:`~fkpd.studio.errors.ParamError`, a ValueError naming the
parameter. The job row stores the parameters as given (only those), as strict JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fkpd.config import to_json_dict
from fkpd.errors import ConfigError
from fkpd.envs import get_task
from fkpd.policy import PolicyConfig
from fkpd.studio.errors import ParamError
from fkpd.prefs.pairs import MAX_CANDIDATE_FACTOR
from fkpd.train.acquisition import DEFAULT_CANDIDATE_FACTOR, QUERY_SELECTIONS
from fkpd.train.align import AlignConfig
from fkpd.train.bc import BCConfig

BOOTSTRAP = "bootstrap"
ALIGNMENT_ROUND = "alignment_round"
#: Job kinds that train or register policy versions; at most one runs per project.
TRAINING_KINDS = (BOOTSTRAP, ALIGNMENT_ROUND)
#: Round parameters the Rounds page offers (the others keep their defaults).
ROUND_FIELDS = ("objective", "regularizer", "beta", "lam", "c_bc", "steps", "lr", "pairs_per_batch", "eval_episodes",
                "dataset_share", "query_selection", "candidate_factor")


def round_defaults() -> dict[str, Any]:
    """Default values of :data:`ROUND_FIELDS` (AlignConfig's and BatchSettings'), for the
    Rounds page's form."""
    return {name: getattr(AlignConfig, name, getattr(BatchSettings, name, None)) for name in ROUND_FIELDS}


def check_finite(params: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``params`` as a plain dict, after checking it is strict JSON (no NaN/inf).

    Raises:
        ParamError: a NaN or infinite number anywhere, or a value JSON cannot hold.
    """
    def walk(value: Any, path: str) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            raise ParamError(f"{what} parameter {path} is {value!r}; parameters must be finite numbers")
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]")
        elif not (value is None or isinstance(value, (str, int, float, bool))):
            raise ParamError(f"{what} parameter {path} is {value!r}, which is not a JSON value")

    out = dict(params)
    walk(out, "")
    return out


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def _check_int(owner: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ParamError(f"{owner} parameter {name!r} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass
class BatchSettings:
    """How a labelling batch is rolled out and rendered, and how versions are evaluated.

    Recorded with version 0 (``metrics["bootstrap"]["settings"]``) so later rounds use
    the same settings unless a round's parameters override them.

    Attributes:
        pairs_per_batch: pairs per labelling batch (2 clips each). Rendering costs
            ~40 ms per frame on a CPU, so a batch of 20 pairs of L = 64 takes ~2 minutes.
        segment_length: L, environment steps per clip (capped at the horizon); 0: the
            task's (:attr:`fkpd.envs.TaskSpec.segment_length`: 64, whole episodes on
            maze2d).
        segment_start: first step of every clip; -1 draws a random start per pair. Step 0
            is the default, as in ``fkpd loop``: a later segment's return mostly
            reflects the state reached before it began, whose actions are not in it, and
            random starts aligned worse in the door-open sweep (issue #3 note).
        render_size: ``(height, width)`` of the videos in pixels; an int means square.
        n_envs: environments rolled out in lock step (one batched DDIM call per replan).
        max_episode_steps: horizon in steps for data, evaluation and clips (0: the
            task's).
        eval_episodes: episodes of the short evaluation of each new version.
        seed: seeds the dataset, BC, alignment, segment starts and sampling noise.
        threads: torch CPU threads for the job (0: torch's default, which oversubscribes
            a busy machine; rollouts are small and run best on 1-2 threads).
        dataset_share: fraction (0..1) of each batch's pairs that are segments of the
            project's offline dataset instead of current-policy rollouts
            (:mod:`fkpd.prefs.dataset_pairs`), spread evenly through the batch. They are
            rendered by replaying the stored actions from the stored reset seeds, which
            needs a dataset that replays exactly (generated data does; a dataset
            without reset seeds is refused when the batch is made).
        query_selection: how the current-policy pairs of a batch are chosen
            (:mod:`fkpd.train.acquisition`): ``uniform`` (every pair rolled out is
            shown), ``disagreement`` (the pairs the served version is least sure of) or
            ``diversity`` (the pairs whose two clips visit the most different states).
            Batches and top-ups both use it; a round's parameters may override it.
        candidate_factor: with ``disagreement`` or ``diversity``, candidate pairs rolled
            out per shown pair (1..10); only the shown pairs are rendered.
    """

    pairs_per_batch: int = 20
    segment_length: int = 0
    segment_start: int = 0
    render_size: tuple[int, int] = (224, 224)
    n_envs: int = 8
    max_episode_steps: int = 0
    eval_episodes: int = 10
    seed: int = 0
    threads: int = 0
    dataset_share: float = 0.0
    query_selection: str = "uniform"
    candidate_factor: int = DEFAULT_CANDIDATE_FACTOR

    def __post_init__(self) -> None:
        for name, minimum in (("pairs_per_batch", 1), ("segment_length", 0), ("n_envs", 1),
                              ("max_episode_steps", 0), ("eval_episodes", 1), ("seed", 0), ("threads", 0)):
            _check_int("batch", name, getattr(self, name), minimum)
        _check_int("batch", "segment_start", self.segment_start, -1)
        share = self.dataset_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
            raise ParamError(f"batch parameter 'dataset_share' must be a number from 0 to 1, got {share!r}")
        self.dataset_share = float(share)
        if self.query_selection not in QUERY_SELECTIONS:
            raise ParamError(f"batch parameter 'query_selection' must be one of {list(QUERY_SELECTIONS)}, got "
                             f"{self.query_selection!r}")
        _check_int("batch", "candidate_factor", self.candidate_factor, 1)
        if self.candidate_factor > MAX_CANDIDATE_FACTOR:
            raise ParamError(f"batch parameter 'candidate_factor' must be an integer from 1 to {MAX_CANDIDATE_FACTOR}, "
                             f"got {self.candidate_factor!r}")
        size = self.render_size
        size = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
        if (not isinstance(size, (list, tuple)) or len(size) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 16 for v in size)):
            raise ParamError(f"parameter 'render_size' must be an int or [height, width] of ints >= 16, "
                             f"got {self.render_size!r}")
        self.render_size = (int(size[0]), int(size[1]))

    def horizon(self, task_id: str) -> int:
        """The horizon in steps: ``max_episode_steps``, or the task's when 0."""
        return self.max_episode_steps or get_task(task_id).max_episode_steps

    def length(self, task_id: str) -> int:
        """L in steps: ``segment_length`` (or the task's when 0), capped at the horizon."""
        return min(self.segment_length or get_task(task_id).segment_length, self.horizon(task_id))


_BATCH_FIELDS = _field_names(BatchSettings)


def _bc_fields() -> set[str]:
    return _field_names(BCConfig) - {"task", "dataset", "out_dir", "resume", "steps"}


def _policy_fields() -> set[str]:
    return _field_names(PolicyConfig) - {"obs_dim", "action_dim"}


#: AlignConfig fields the alignment_round job sets itself (``seed`` and ``threads``
#: come from :class:`BatchSettings`).
_ALIGN_SET_BY_JOB = {"checkpoint", "prefs", "init", "out_dir", "dataset", "round", "seed", "threads"}


def _align_fields() -> set[str]:
    return _field_names(AlignConfig) - _ALIGN_SET_BY_JOB


def _check_types(owner: str, cls: type, values: Mapping[str, Any]) -> None:
    """Each override has the type of its field's default (an int where a float is
    expected is fine; a bool is not a number).

    Raises:
        ParamError: the first override of the wrong type.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    for name, value in values.items():
        default = defaults.get(name)
        if default is None:
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = ok and (isinstance(default, float) or float(value).is_integer())
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:
            continue
        if not ok:
            raise ParamError(f"{owner} parameter {name!r} must be a {type(default).__name__} like its default "
                             f"{default!r}, got {value!r}")


def _config(owner: str, build, *args, **kwargs):
    """``build(*args, **kwargs)`` with its ConfigError/TypeError as a ParamError."""
    try:
        return build(*args, **kwargs)
    except (ConfigError, TypeError) as exc:
        raise ParamError(f"bad {owner} parameter: {exc}") from exc


@dataclass
class BootstrapParams:
    """Parameters of a ``bootstrap`` job (``ctx.params``, flat JSON).

    Attributes:
        task: task id; default the project's (must equal it when given).
        dataset: the offline data, instead of generating it: a D4RL-layout HDF5 file
            (absolute, or relative to the worker's working directory), a D4RL dataset
            name looked up in D4RL's cache directory (``hopper-medium-v2``,
            ``maze2d-umaze-v1``; ``$D4RL_DATASET_DIR``, else ``~/.d4rl/datasets``), or
            ``minari:DATASET_ID`` (a locally present Minari dataset). Read where it is,
            never copied; an original D4RL maze2d file is mapped to PointMaze's frame on
            load. Default ``""``: generate ``dataset_episodes`` episodes (MetaWorld,
            maze2d), or, for D4RL locomotion tasks, which have no generator, the task's
            own D4RL dataset (``d4rl/hopper-medium-v2`` reads ``hopper-medium-v2``).
            It comes from ``FKPD_BOOTSTRAP``, set by whoever runs the server; no page
            takes it from the browser.
        dataset_episodes: episodes of generated offline data (unused with a named or
            D4RL locomotion dataset).
        bc_steps: behaviour-cloning gradient steps.
        bc: other :class:`fkpd.train.bc.BCConfig` fields (``batch_size``, ``lr``,
            ``warmup_steps``, ``device``, ...); ``eval_every`` defaults to 0 (the job
            evaluates the final checkpoint itself), ``seed`` and ``threads`` to the batch
            settings' values.
        policy: :class:`fkpd.policy.PolicyConfig` fields (``hidden_dim``, ``n_blocks``, ...).
        batch: every :class:`BatchSettings` field, given flat (``pairs_per_batch``,
            ``segment_length``, ``render_size``, ...).
    """

    task: str = ""
    dataset: str = ""
    dataset_episodes: int = 100
    bc_steps: int = 4000
    bc: dict[str, Any] = field(default_factory=dict)
    policy: dict[str, Any] = field(default_factory=dict)
    batch: BatchSettings = field(default_factory=BatchSettings)

    def __post_init__(self) -> None:
        _check_int("bootstrap", "dataset_episodes", self.dataset_episodes, 1)
        _check_int("bootstrap", "bc_steps", self.bc_steps, 1)
        if not isinstance(self.task, str):
            raise ParamError(f"bootstrap parameter 'task' must be a task id string, got {self.task!r}")
        if not isinstance(self.dataset, str) or (self.dataset and not self.dataset.strip()):
            raise ParamError(f"bootstrap parameter 'dataset' must be a file path, a D4RL dataset name or "
                             f"minari:DATASET_ID, got {self.dataset!r}")
        for name, allowed in (("bc", _bc_fields()), ("policy", _policy_fields())):
            value = getattr(self, name)
            if not isinstance(value, dict):
                raise ParamError(f"bootstrap parameter {name!r} must be an object, got {value!r}")
            unknown = sorted(set(value) - allowed)
            if unknown:
                hint = " (set the number of BC steps with 'bc_steps')" if "steps" in unknown and name == "bc" else ""
                raise ParamError(f"bootstrap parameter {name!r} has unknown key(s) {unknown}{hint}; "
                                 f"allowed: {sorted(allowed)}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "BootstrapParams":
        """Parse a job's flat parameters.

        Every value is checked here, the nested ``bc`` and ``policy`` overrides included
        (by building the BC and policy configurations), so a bad value fails where it
        enters, not in the job.

        Raises:
            ParamError: an unknown key (the message lists the known ones), NaN/inf, a
                value of the wrong type, or one out of range.
        """
        params = check_finite(params, "bootstrap")
        own = _field_names(cls) - {"batch"}
        unknown = sorted(set(params) - own - _BATCH_FIELDS)
        if unknown:
            raise ParamError(f"unknown bootstrap parameter(s) {unknown}; known: {sorted(own | _BATCH_FIELDS)}")
        batch = BatchSettings(**{k: v for k, v in params.items() if k in _BATCH_FIELDS})
        out = cls(batch=batch, **{k: v for k, v in params.items() if k in own})
        _check_types("bootstrap 'bc'", BCConfig, out.bc)
        _check_types("bootstrap 'policy'", PolicyConfig, out.policy)
        _config("bootstrap", out.bc_config, "metaworld/door-open-v3", Path("-"), Path("-"))
        _config("bootstrap", out.policy_config)
        return out

    def bc_config(self, task: str, dataset: Path, out_dir: Path) -> BCConfig:
        """The :class:`fkpd.train.bc.BCConfig` of this bootstrap (``resume=True``).

        Raises:
            ConfigError: an out-of-range BC setting.
        """
        values: dict[str, Any] = {"eval_every": 0, "seed": self.batch.seed, "threads": self.batch.threads,
                                  "log_every": max(1, min(100, self.bc_steps // 20))}
        values.update(self.bc)
        return BCConfig(task=task, dataset=str(dataset), out_dir=str(out_dir), steps=self.bc_steps, resume=True,
                        **values)

    def policy_config(self) -> PolicyConfig:
        """The :class:`fkpd.policy.PolicyConfig` (Do/Da are set from the task by BC).

        Raises:
            ConfigError: an out-of-range architecture setting.
        """
        return PolicyConfig(**self.policy)

    def dataset_source(self, task: str) -> str:
        """The dataset this bootstrap reads, as named (not resolved): the ``dataset``
        parameter; else, for a D4RL locomotion task, its D4RL dataset name; else ``""``
        (the data is generated)."""
        from fkpd.envs import get_task

        return self.dataset or get_task(task).own_dataset

    def key(self, task: str) -> str:
        """12 hex digits identifying the dataset and BC weights these parameters produce.

        Settings that do not change them (logging, saving, device, threads, batch size,
        segment length, rendering) are left out, so changing them reuses the finished
        dataset and checkpoint. Generated data enters through its settings (episodes,
        horizon, seed); a named dataset (:meth:`dataset_source`) through its name as
        given, not its content: replacing the file under the same name keeps the key.
        """
        cfg = to_json_dict(self.bc_config(task, Path("-"), Path("-")))
        for name in ("dataset", "out_dir", "resume", "threads", "device", "log_every", "save_every",
                     "eval_every", "eval_episodes"):
            cfg.pop(name, None)
        source = self.dataset_source(task)
        if source:
            blob = {"task": task, "dataset": source, "bc": cfg, "policy": to_json_dict(self.policy_config())}
        else:  # unchanged since before named datasets, so existing projects keep their key
            blob = {"task": task, "episodes": self.dataset_episodes, "horizon": self.batch.horizon(task),
                    "data_seed": self.batch.seed, "bc": cfg, "policy": to_json_dict(self.policy_config())}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class RoundParams:
    """Parameters of an ``alignment_round`` job (``ctx.params``, flat JSON).

    Attributes:
        align: :class:`fkpd.train.align.AlignConfig` fields (``regularizer``, ``beta``,
            ``lam``, ``steps``, ``lr``, ``batch_pairs``, ``device``, ...); defaults are
            AlignConfig's, except ``log_every`` (about 20 progress reports per round).
            The job sets ``checkpoint``, ``init``, ``out_dir``, ``dataset`` and ``round``.
        batch: :class:`BatchSettings` overrides (``pairs_per_batch``, ``eval_episodes``,
            ...); the rest come from version 0's recorded settings.

    ``seed`` and ``threads`` are BatchSettings fields that alignment uses too: the
    alignment seed of round r is ``1000·seed + r`` (as in :mod:`fkpd.train.loop`).
    """

    align: dict[str, Any] = field(default_factory=dict)
    batch: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "RoundParams":
        """Parse a job's flat parameters.

        Raises:
            ParamError: an unknown key (the message lists the known ones), NaN/inf, a
                value of the wrong type, or an out-of-range alignment or batch setting.
        """
        params = check_finite(params, "alignment_round")
        align_fields = _align_fields()
        unknown = sorted(set(params) - align_fields - _BATCH_FIELDS)
        if unknown:
            raise ParamError(f"unknown alignment_round parameter(s) {unknown}; known: "
                             f"{sorted(align_fields | _BATCH_FIELDS)}")
        out = cls(align={k: v for k, v in params.items() if k in align_fields},
                  batch={k: v for k, v in params.items() if k in _BATCH_FIELDS})
        _check_types("alignment_round", AlignConfig, out.align)
        _check_types("alignment_round", BatchSettings, out.batch)
        _config("alignment_round", AlignConfig, **out.align)  # validate now, before anything is loaded
        BatchSettings(**out.batch)
        return out

    def to_params(self) -> dict[str, Any]:
        """The flat JSON parameters of the job row, as given (:meth:`from_params` reads
        them back)."""
        return check_finite({**self.align, **self.batch}, "alignment_round")

    def settings(self, recorded: Mapping[str, Any] | None) -> BatchSettings:
        """Version 0's recorded settings with this round's overrides."""
        known = {k: v for k, v in (recorded or {}).items() if k in _BATCH_FIELDS}
        return BatchSettings(**{**known, **self.batch})

    def align_config(self, settings: BatchSettings) -> AlignConfig:
        """The rounds' base :class:`fkpd.train.align.AlignConfig`: these overrides, the
        batch settings' ``threads``, and about 20 progress reports per round; the round
        engine sets ``checkpoint``, ``init``, ``out_dir``, ``dataset``, ``round`` and
        ``seed`` (:meth:`fkpd.train.engine.RoundEngine.align_config`).

        Raises:
            ParamError: an out-of-range alignment setting.
        """
        values: dict[str, Any] = {"threads": settings.threads, **self.align}
        if "log_every" not in self.align:
            values["log_every"] = max(1, min(25, int(values.get("steps", AlignConfig.steps)) // 20))
        return _config("alignment_round", AlignConfig, **values)
