"""Job handlers of the labelling loop: ``bootstrap`` and ``alignment_round``.

Run them with a worker (``fkpd worker`` calls
``run_worker(store, handler_modules=["fkpd.studio.rounds"])``); the labelling app only enqueues::

    store.jobs.enqueue("door", "bootstrap", {"dataset_episodes": 100, "bc_steps": 4000})
    store.jobs.enqueue("door", "alignment_round", {"regularizer": "forward", "beta": 500})

**bootstrap** (DESIGN.md §1, step 1, then the first batch of step 2):

1. the offline dataset: generated into ``projects/<id>/bootstrap-<key>/dataset.hdf5``
   (skipped when a complete file is there) for MetaWorld and maze2d tasks; or, read where
   it is, the dataset named by the ``dataset`` parameter (a file, a D4RL dataset name or
   ``minari:ID``), which D4RL locomotion tasks default to their own D4RL dataset
   (:meth:`BootstrapParams.dataset_source`, :func:`resolve_bootstrap_dataset`);
2. behaviour cloning into ``.../bc/`` with ``resume=True`` (a finished run is reused, an
   interrupted one resumes from its last saved training state);
3. a short evaluation of the BC checkpoint;
4. register policy version 0 (round 0, no parent);
5. render the first labelling batch from version 0 and register its clips, then its
   pairs, for round 1.

``<key>`` is a hash of everything that changes the data or the trained weights (task,
episodes, horizon, seed, BC and policy settings; or the named dataset instead of the
generation settings), so a re-run with the same parameters reuses the finished dataset
and checkpoint, and one with other parameters never mixes with them.

**alignment_round** (DESIGN.md §1, steps 3-4), for the latest version π_{r−1} (round r−1):

1. read every non-skip comparison of the project (:meth:`Store.training_pairs`), load
   its segments (sha256-checked) and convert the labels to winner-first pairs
   (:func:`fkpd.train.align.pairs_from_labels`);
2. :func:`fkpd.train.align.align` with reference = the round-0 BC version and init = π_{r−1},
   into a directory of its own, ``projects/<id>/rounds/round<r>-job<j>-a<k>-<token>/``;
3. a short evaluation of the new checkpoint;
4. only then register policy version r (parent π_{r−1}, metrics: implicit accuracy,
   success rate, labels used, ...);
5. render the next batch from version r and register its clips, then its pairs, for
   round r+1.

Why this order is crash-safe (a worker may be SIGKILLed at any instruction):

* Nothing is registered before the file it names is complete: datasets, checkpoints,
  segments and videos are written under a temporary name and renamed
  (:meth:`Store.write_artifact_atomic`, :meth:`DiffusionPolicy.save`,
  :func:`fkpd.data.generate_dataset`), and rows are added after the rename. A crash
  leaves at most an unregistered directory or temporary file behind.
* The served policy is the latest registered version. A new version is registered after
  its checkpoint was written *and* evaluated, in one transaction, so a crash before
  step 4 leaves the previous version served; the previous checkpoint is only ever read.
* Jobs never change or delete comparisons or pairs; they only add rows. The previous
  batch stays open and is what :meth:`Store.next_pair` hands out (the latest round with
  open pairs) until the new batch's pairs are added, in one transaction, at the very
  end. A crash between registering the clips and the pairs leaves clip rows whose files
  exist but that no pair uses: harmless.
* Re-running is safe. A retried ``alignment_round`` job that finds a version registered
  by its own earlier attempt (``metrics["job_id"]``) skips to step 5; a batch is
  rendered only when its round has no pairs yet; ``bootstrap`` reuses version 0.

Long work (data generation, BC, alignment) runs in the job's thread: the trainers call
back after every step (``on_step`` / ``on_episode``), and :class:`_Watch` turns that into
``ctx.progress(fraction, "training BC: step i/N")`` and checks whether the job was
cancelled or taken away; :class:`fkpd.store.JobCancelled` /
``JobLostError`` raised there stop the trainer between two steps, and its output is
never registered (the worker's heartbeat runs in its own thread meanwhile). A cut-off BC
resumes from its last saved state. Cancellation is honoured until the new version is
registered; the batch rendering that follows runs to the end.

Shapes follow DESIGN.md §3: L segment length, Do/Da observation/action dims.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fkpd.config import to_json_dict
from fkpd.errors import FKPDError
from fkpd.store import JobContext, PolicyVersionInfo, ProjectInfo, Store, register_handler

log = logging.getLogger(__name__)

BOOTSTRAP = "bootstrap"
ALIGNMENT_ROUND = "alignment_round"
#: Job kinds that train or register policy versions; at most one runs per project.
TRAINING_KINDS = (BOOTSTRAP, ALIGNMENT_ROUND)


class RoundError(FKPDError, ValueError):
    """A bootstrap or alignment-round job cannot run: bad parameters, no comparisons to
    train on, or a project in a state the job does not apply to."""


# ------------------------------------------------------------------ parameters


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def _check_int(owner: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RoundError(f"{owner} parameter {name!r} must be an integer >= {minimum}, got {value!r}")
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

    def __post_init__(self) -> None:
        for name, minimum in (("pairs_per_batch", 1), ("segment_length", 0), ("n_envs", 1),
                              ("max_episode_steps", 0), ("eval_episodes", 1), ("seed", 0), ("threads", 0)):
            _check_int("batch", name, getattr(self, name), minimum)
        _check_int("batch", "segment_start", self.segment_start, -1)
        size = self.render_size
        size = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
        if (not isinstance(size, (list, tuple)) or len(size) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 16 for v in size)):
            raise RoundError(f"parameter 'render_size' must be an int or [height, width] of ints >= 16, "
                             f"got {self.render_size!r}")
        self.render_size = (int(size[0]), int(size[1]))

    def horizon(self, task_id: str) -> int:
        """The horizon in steps: ``max_episode_steps``, or the task's when 0."""
        from fkpd.envs import get_task

        return self.max_episode_steps or get_task(task_id).max_episode_steps

    def length(self, task_id: str) -> int:
        """L in steps: ``segment_length`` (or the task's when 0), capped at the horizon."""
        from fkpd.envs import get_task

        return min(self.segment_length or get_task(task_id).segment_length, self.horizon(task_id))


_BATCH_FIELDS = _field_names(BatchSettings)


def _bc_fields() -> set[str]:
    from fkpd.train.bc import BCConfig

    return _field_names(BCConfig) - {"task", "dataset", "out_dir", "resume", "steps"}


def _policy_fields() -> set[str]:
    from fkpd.policy import PolicyConfig

    return _field_names(PolicyConfig) - {"obs_dim", "action_dim"}


#: AlignConfig fields the alignment_round job sets itself (``seed`` and ``threads``
#: come from :class:`BatchSettings`).
_ALIGN_SET_BY_JOB = {"checkpoint", "prefs", "init", "out_dir", "dataset", "round", "seed", "threads"}


def _align_fields() -> set[str]:
    from fkpd.train.align import AlignConfig

    return _field_names(AlignConfig) - _ALIGN_SET_BY_JOB


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
            raise RoundError(f"bootstrap parameter 'task' must be a task id string, got {self.task!r}")
        if not isinstance(self.dataset, str) or (self.dataset and not self.dataset.strip()):
            raise RoundError(f"bootstrap parameter 'dataset' must be a file path, a D4RL dataset name or "
                             f"minari:DATASET_ID, got {self.dataset!r}")
        for name, allowed in (("bc", _bc_fields()), ("policy", _policy_fields())):
            value = getattr(self, name)
            if not isinstance(value, dict):
                raise RoundError(f"bootstrap parameter {name!r} must be an object, got {value!r}")
            unknown = sorted(set(value) - allowed)
            if unknown:
                hint = " (set the number of BC steps with 'bc_steps')" if "steps" in unknown and name == "bc" else ""
                raise RoundError(f"bootstrap parameter {name!r} has unknown key(s) {unknown}{hint}; "
                                 f"allowed: {sorted(allowed)}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "BootstrapParams":
        """Parse a job's flat parameters.

        Raises:
            RoundError: an unknown key (the message lists the known ones) or a bad value.
        """
        own = _field_names(cls) - {"batch"}
        unknown = sorted(set(params) - own - _BATCH_FIELDS)
        if unknown:
            raise RoundError(f"unknown bootstrap parameter(s) {unknown}; known: {sorted(own | _BATCH_FIELDS)}")
        batch = BatchSettings(**{k: v for k, v in params.items() if k in _BATCH_FIELDS})
        return cls(batch=batch, **{k: v for k, v in params.items() if k in own})

    def bc_config(self, task: str, dataset: Path, out_dir: Path):
        """The :class:`fkpd.train.bc.BCConfig` of this bootstrap (``resume=True``).

        Raises:
            ConfigError: an out-of-range BC setting.
        """
        from fkpd.train.bc import BCConfig

        values: dict[str, Any] = {"eval_every": 0, "seed": self.batch.seed, "threads": self.batch.threads,
                                  "log_every": max(1, min(100, self.bc_steps // 20))}
        values.update(self.bc)
        return BCConfig(task=task, dataset=str(dataset), out_dir=str(out_dir), steps=self.bc_steps, resume=True,
                        **values)

    def policy_config(self):
        """The :class:`fkpd.policy.PolicyConfig` (Do/Da are set from the task by BC).

        Raises:
            ConfigError: an out-of-range architecture setting.
        """
        from fkpd.policy import PolicyConfig

        return PolicyConfig(**self.policy)

    def dataset_source(self, task: str) -> str:
        """The dataset this bootstrap reads, as named (not resolved): the ``dataset``
        parameter; else, for a D4RL locomotion task, its D4RL dataset name; else ``""``
        (the data is generated)."""
        from fkpd.envs.d4rl import own_dataset

        return self.dataset or own_dataset(task)

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
            RoundError: an unknown key (the message lists the known ones).
            ConfigError: an out-of-range alignment setting (from AlignConfig).
        """
        from fkpd.train.align import AlignConfig

        align_fields = _align_fields()
        unknown = sorted(set(params) - align_fields - _BATCH_FIELDS)
        if unknown:
            raise RoundError(f"unknown alignment_round parameter(s) {unknown}; known: "
                             f"{sorted(align_fields | _BATCH_FIELDS)}")
        out = cls(align={k: v for k, v in params.items() if k in align_fields},
                  batch={k: v for k, v in params.items() if k in _BATCH_FIELDS})
        AlignConfig(**out.align)  # validate now, before anything is loaded
        return out

    def settings(self, recorded: Mapping[str, Any] | None) -> BatchSettings:
        """Version 0's recorded settings with this round's overrides."""
        known = {k: v for k, v in (recorded or {}).items() if k in _BATCH_FIELDS}
        return BatchSettings(**{**known, **self.batch})

    def align_config(self, round_: int, settings: BatchSettings, **paths: str):
        """The round's :class:`fkpd.train.align.AlignConfig`, with the job-set fields ``paths``
        (``checkpoint``, ``init``, ``out_dir``, ``dataset``).

        Raises:
            ConfigError: an out-of-range alignment setting.
        """
        from fkpd.train.align import AlignConfig

        values: dict[str, Any] = {"seed": 1000 * settings.seed + round_, "threads": settings.threads}
        values.update(self.align)
        if "log_every" not in self.align:
            values["log_every"] = max(1, min(25, int(values.get("steps", AlignConfig.steps)) // 20))
        return AlignConfig(round=round_, **values, **paths)


# ------------------------------------------------------------------ progress


class _Stage:
    """Maps one stage's own progress (0..1) into ``[lo, hi]`` of the job's progress."""

    def __init__(self, ctx: JobContext, lo: float, hi: float) -> None:
        self.ctx, self.lo, self.hi = ctx, lo, hi

    def __call__(self, fraction: float, message: str) -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        self.ctx.progress(self.lo + (self.hi - self.lo) * fraction, message)


class _Watch:
    """The ``on_step`` / ``on_episode`` callback of a trainer running inside a job: every
    call reports ``"<what>: <unit> i/N"`` through ``stage`` (``JobContext.progress``
    writes to the store at most every few seconds) and checks for cancellation.

    Raises (from the call):
        JobCancelled / JobLostError: the job was cancelled or taken away (from
            :meth:`JobContext.check_cancelled`); the trainer stops there.
    """

    def __init__(self, ctx: JobContext, stage: _Stage, what: str, unit: str = "step") -> None:
        self.ctx, self.stage, self.what, self.unit = ctx, stage, what, unit

    def __call__(self, done: int, total: int) -> None:
        self.stage(done / total, f"{self.what}: {self.unit} {done}/{total}")
        self.ctx.check_cancelled()


# ------------------------------------------------------------------ store helpers


def _json_safe(obj: Any) -> Any:
    """NaN/inf → None and numpy scalars → Python, so metrics are strict JSON (PostgreSQL
    refuses NaN in JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _ensure_sole_training_job(ctx: JobContext) -> None:
    others = [j for j in ctx.store.jobs.list(ctx.job.project_id, status="running")
              if j.kind in TRAINING_KINDS and j.id != ctx.job_id]
    if others:
        other = others[0]
        raise RoundError(
            f"job {other.id} ({other.kind}) is still running for this project (last heartbeat "
            f"{other.heartbeat_at}); only one bootstrap/alignment_round job runs per project at a time. "
            "Wait for it to finish, or cancel it (a job whose worker died is failed by stale recovery).")


def served_versions(store: Store, project: ProjectInfo) -> list[PolicyVersionInfo]:
    """The project's policy versions that have a checkpoint (can be rolled out), oldest
    first; versions that only hold imported labels are left out."""
    return [v for v in store.list_policy_versions(project.id) if v.checkpoint_path is not None]


def _checkpoint_dir(store: Store, version: PolicyVersionInfo) -> Path:
    """The checkpoint directory of a version, after checking the file's sha256.

    Raises:
        RoundError: the version has no checkpoint.
        ArtifactIntegrityError: the checkpoint file is missing or was changed.
    """
    if version.checkpoint_path is None:
        raise RoundError(f"policy version {version.id} has no checkpoint (imported data?); it cannot be rolled "
                         "out or trained from")
    if version.checkpoint_sha256:
        path = store.artifacts.verify(version.checkpoint_path, version.checkpoint_sha256)
    else:
        path = store.resolve(version.checkpoint_path)
    return path.parent


def _make_envs(task: str, settings: BatchSettings, count: int) -> list:
    from fkpd.envs import make_env

    horizon = settings.horizon(task)
    return [make_env(task, max_episode_steps=horizon, render_size=settings.render_size)
            for _ in range(max(1, min(settings.n_envs, count)))]


def _close(envs: Sequence) -> None:
    for env in envs:
        try:
            env.close()
        except Exception:  # noqa: BLE001 - closing must not hide the job's outcome
            log.debug("closing an environment failed", exc_info=True)


def _apply_threads(threads: int) -> None:
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


# ------------------------------------------------------------------ evaluation and batches


def evaluate_version(policy, envs: Sequence, episodes: int, seed: int = 0,
                     progress: Callable[[float, str], None] | None = None) -> dict[str, Any]:
    """Evaluate a policy on ``episodes`` full episodes, batched in lock step.

    Through :func:`fkpd.policy.rollout.evaluate_in_process`: the reset seeds of
    :func:`fkpd.policy.rollout.evaluate`, sampled in this process (no worker processes to spawn).

    Args:
        policy: a :class:`fkpd.policy.DiffusionPolicy`.
        envs: environments of the policy's task (their horizon is the episode length).
        episodes: number of episodes (>= 1).
        seed: seeds the sampling noise.
        progress: optional ``(fraction, message)`` callback.

    Returns:
        ``success_rate`` (0..1), ``success_ci95`` ([lo, hi], Wilson), ``mean_return``
        (sum of rewards per episode, averaged), ``std_return``, ``episodes``; on
        ``d4rl/`` tasks also ``d4rl_normalized_score`` and ``d4rl_normalized_score_std``
        (0-100 scale, :func:`fkpd.envs.d4rl.score_summary`); and the intent teachers' scores
        over the episodes (``intent_smooth``, ``intent_high_gripper`` on MetaWorld;
        :func:`fkpd.prefs.teachers.intent_scores`).
    """
    from fkpd.policy.rollout import evaluate_in_process
    from fkpd.prefs.segments import cut_segment
    from fkpd.prefs.teachers import intent_scores

    def tick(done: int) -> None:
        if progress is not None:
            progress(done / episodes, f"evaluating: episode {done}/{episodes}")

    res, eps = evaluate_in_process(policy, envs, episodes, seed=seed, progress=tick)
    summary = res.summary()
    keys = ("success_rate", "success_ci95", "mean_return", "std_return", "episodes", "d4rl_normalized_score",
            "d4rl_normalized_score_std")
    segments = [cut_segment(e, 0, len(e)) for e in eps]
    return {**{k: summary[k] for k in keys if k in summary}, **intent_scores(segments, res.task_id)}


def render_batch(store: Store, project: ProjectInfo, version: PolicyVersionInfo, settings: BatchSettings,
                 round_: int, *, progress: Callable[[float, str], None] | None = None,
                 job_id: int | None = None) -> list[int]:
    """Roll out, save and register one labelling batch of ``version`` for ``round_``.

    Pair ``i`` is two clips of ``version`` from the reset seed
    :func:`fkpd.train.loop.pair_seed` ``(seed, round_, i)`` with different sampling noise, cut
    at the same L steps (DESIGN.md §3). Each clip's segment ``.npz`` (observations
    (L, Do), actions (L, Da), rewards (L,), success (L,)) and its H.264 MP4 (L + 1
    frames of ``render_size``) are written atomically to a new folder
    ``projects/<id>/batches/round<r>-v<version>-<token>/``, ``n_envs`` clips at a time
    (so only their frames are held in memory); then all clips are registered (with
    ground-truth return and success, never shown to annotators) in one transaction, then
    all pairs in another.

    Args:
        store: the store.
        project: the version's project.
        version: the policy version to roll out (needs a checkpoint).
        settings: batch size, L, render size, horizon, seed, ``n_envs``.
        round_: the round the pairs are labelled for (the version's round + 1).
        progress: optional ``(fraction, message)`` callback.
        job_id: recorded in the clips' ``meta``.

    Returns:
        The new pair ids, in order.

    Raises:
        ArtifactIntegrityError: the version's checkpoint is missing or changed.
        CheckpointError: the checkpoint is corrupt or for another task.
    """
    from fkpd.envs import get_task
    from fkpd.train.loop import pair_seed
    from fkpd.policy import DiffusionPolicy
    from fkpd.policy.rollout import write_video
    from fkpd.policy.rollout import ClipRequest, rollout_clips
    from fkpd.prefs.segments import cut_segment

    task = project.task_id
    policy = DiffusionPolicy.load(_checkpoint_dir(store, version), task_id=task)
    fps = get_task(task).fps
    n = settings.pairs_per_batch
    horizon = settings.horizon(task)
    length = settings.length(task)
    rng = np.random.default_rng(pair_seed(settings.seed, round_, 0))
    if settings.segment_start < 0:
        starts = rng.integers(0, horizon - length + 1, size=n)
    else:
        starts = np.full(n, min(settings.segment_start, horizon - length), dtype=np.int64)
    noise = rng.integers(0, 2**62, size=(n, 2))
    seeds = [pair_seed(settings.seed, round_, i) for i in range(n)]
    requests = [ClipRequest(seeds[k], int(noise[k, j]), max_steps=int(starts[k]) + length,
                            render_from=int(starts[k])) for k in range(n) for j in range(2)]
    folder = f"projects/{project.id}/batches/round{round_:03d}-v{version.id}-{uuid.uuid4().hex[:8]}"
    clips: list[dict[str, Any]] = []
    envs = _make_envs(task, settings, len(requests))
    try:
        for b0 in range(0, len(requests), len(envs)):
            for i, ep in enumerate(rollout_clips(policy, envs, requests[b0:b0 + len(envs)]), start=b0):
                k, j = divmod(i, 2)
                seg = cut_segment(ep, int(starts[k]), length, task_id=task)
                stem = f"{folder}/p{k:03d}_{'ab'[j]}"
                video, video_sha = store.write_artifact_atomic(
                    f"{stem}.mp4", lambda path, frames=ep.frames: write_video(frames, path, fps=fps), to_path=True)
                seg.video = video
                segment, segment_sha = store.write_artifact_atomic(f"{stem}.npz", seg.save, to_path=True)
                clips.append(dict(
                    policy_version_id=version.id, segment_path=segment, segment_sha256=segment_sha,
                    video_path=video, video_sha256=video_sha, length=len(seg), fps=float(fps),
                    reset_seed=seeds[k], gt_return=seg.ret, gt_success=seg.succeeded,
                    meta={"round": round_, "pair": k, "side": "ab"[j], "start": int(starts[k]),
                          "noise_seed": int(noise[k, j]), "job_id": job_id}))
                if progress is not None:
                    progress(len(clips) / len(requests), f"rendering batch: clip {len(clips)}/{len(requests)}")
    finally:
        _close(envs)
    ids = [c.id for c in store.add_clips(clips)]
    return store.add_pairs(project.id, [(ids[2 * k], ids[2 * k + 1]) for k in range(n)], round=round_)


def load_comparisons(store: Store, project: ProjectInfo) -> tuple[list, int]:
    """Every non-skip comparison of ``project`` as winner-first segment pairs.

    Segments are loaded once per clip, after their sha256 is checked; segments without
    per-step success flags (imported data) get ``success = False``.

    Returns:
        ``(pairs, n_labels)``: :data:`fkpd.train.align.WinnerFirstPair` items ``(σ_w, σ_l, p)``
        with p in {1.0, 0.5}, and the number of comparisons they came from.

    Raises:
        ArtifactIntegrityError: a segment file is missing or was changed.
        PreferenceError: a segment file holds malformed arrays.
    """
    from fkpd.train.align import pairs_from_labels
    from fkpd.prefs.segments import Segment

    cache: dict[int, Segment] = {}

    def segment(clip) -> Segment:
        if clip.id not in cache:
            arrays = store.artifacts.load_segment(clip.segment_path, clip.segment_sha256)
            length = len(arrays["actions"])
            cache[clip.id] = Segment(
                arrays["observations"], arrays["actions"], arrays["rewards"],
                arrays.get("success", np.zeros(length, bool)),
                reset_seed=-1 if clip.reset_seed is None else int(clip.reset_seed),
                start=int(arrays.get("start", 0)), task_id=str(arrays.get("task_id", "")),
                path=store.resolve(clip.segment_path))
        return cache[clip.id]

    labels = store.training_pairs(project.id)
    items = [(segment(tp.left), segment(tp.right), tp.p_left) for tp in labels]
    return pairs_from_labels(items), len(labels)


# ------------------------------------------------------------------ bootstrap


def _saved_bc_step(out: Path) -> int | None:
    """The step of BC's saved training state in ``out`` (None when there is none)."""
    try:
        return int(json.loads((out / "train_state" / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve_bootstrap_dataset(source: str, task: str, named: bool = True) -> str:
    """What :func:`fkpd.data.load_dataset`, BC and alignment read for a bootstrap's
    named dataset (:meth:`BootstrapParams.dataset_source`), checked to be there.

    Looked up in this order, as :func:`fkpd.data.load_dataset` does: ``minari:ID``; an
    existing file (a relative path from the worker's working directory); a D4RL dataset
    name, in D4RL's cache directory (:func:`fkpd.envs.d4rl.dataset_file`).

    Args:
        source: the dataset as named (not empty).
        task: the project's task, for messages.
        named: True when ``source`` is the ``dataset`` parameter, False when it is a
            locomotion task's own D4RL dataset (for messages).

    Returns:
        An existing file's absolute path; a D4RL dataset name whose file is in D4RL's
        cache directory (kept as a name, so that later rounds look it up the same way);
        or ``minari:DATASET_ID`` unchanged (:func:`fkpd.data.minari.open_minari` says
        where it looked when it is missing).

    Raises:
        RoundError: no such file and not a D4RL dataset name or ``minari:`` id, or a
            D4RL dataset that is not in D4RL's cache directory; the message gives the
            path looked for and what to do (nothing is downloaded).
    """
    import os

    if source.startswith("minari:"):
        return source
    path = Path(source).expanduser()
    if path.exists():
        return str(path.resolve())
    from fkpd.envs.d4rl import dataset_file, dataset_urls, is_d4rl_name

    if named:
        what, fix = "named by bootstrap parameter 'dataset'", "or change 'dataset' in FKPD_BOOTSTRAP"
    else:
        what = f"task {task}'s own D4RL dataset; D4RL locomotion data is not generated"
        fix = "or name another dataset in FKPD_BOOTSTRAP, e.g. '{\"dataset\": \"/data/hopper_medium-v2.hdf5\"}'"
    if is_d4rl_name(source):
        file = dataset_file(source)
        if file.is_file():
            return source
        folder = ("$D4RL_DATASET_DIR" if os.environ.get("D4RL_DATASET_DIR")
                  else "~/.d4rl/datasets, since $D4RL_DATASET_DIR is not set")
        raise RoundError(
            f"bootstrap dataset {source!r} ({what}) is not in D4RL's cache directory on the worker's machine: "
            f"looked for {str(file)!r} (the directory is {folder}). FKPD Studio never downloads: fetch "
            f"{dataset_urls()[source]} into that directory or set $D4RL_DATASET_DIR for the worker, {fix}.")
    raise RoundError(
        f"bootstrap dataset {source!r} ({what}) was not found: there is no file {str(path.absolute())!r} (a "
        f"relative path is read from the worker's working directory, {os.getcwd()}), and it is neither a D4RL "
        f"dataset name (e.g. hopper-medium-v2, maze2d-umaze-v1) nor minari:DATASET_ID. Put the file there, {fix}.")


@register_handler(BOOTSTRAP)
def bootstrap(ctx: JobContext) -> dict[str, Any]:
    """Job handler: offline data → BC → version 0 → first labelling batch (round 1).

    See the module docstring for the order of operations and why it is crash-safe.
    Parameters: :class:`BootstrapParams` (flat). Idempotent: a finished dataset or BC
    run is reused, an interrupted BC run resumes from its last saved state, a version 0
    made with the same parameters is reused, and the batch is rendered only if round 1
    has no pairs.

    Policy versions without a checkpoint (labels imported with
    :func:`fkpd.store.export.import_pt_labels`) are not policies and are ignored here.

    Returns:
        JSON result: ``policy_version_id``, ``round`` (0), ``success_rate`` (0..1),
        ``mean_return`` (and ``d4rl_normalized_score`` on ``d4rl/`` tasks), ``dataset``
        (``generated``/``reused``, or ``named`` for a dataset read where it is), ``bc``
        (``trained``/``resumed``/``reused``), ``next_round`` (1) and ``pair_ids`` (the
        pairs this run added; empty when the batch existed).

    Raises:
        RoundError: bad parameters, a named dataset that is missing (the message says
            where it was looked for) or does not fit the task, a task other than the
            project's, another training job running for the project, or a project
            already bootstrapped with other parameters or already aligned.
        FKPDError: from data generation, BC (TrainingError on a NaN loss) or
            checkpoint loading.
    """
    from fkpd.data import generate_dataset, load_dataset
    from fkpd.errors import DatasetError
    from fkpd.policy import DiffusionPolicy, read_checkpoint_meta
    from fkpd.train.bc import train_bc

    store = ctx.store
    params = BootstrapParams.from_params(ctx.params)
    project = store.get_project(ctx.job.project_id)
    task = params.task or project.task_id
    if task != project.task_id:
        raise RoundError(f"bootstrap task {task!r} differs from project {project.name!r}'s task "
                         f"{project.task_id!r}; leave 'task' out or create a project for {task}")
    settings = params.batch
    _apply_threads(settings.threads)
    _ensure_sole_training_job(ctx)
    key = params.key(task)
    versions = served_versions(store, project)
    outcome = {"dataset": "reused", "bc": "reused"}
    if versions:
        version = versions[0]
        recorded = (version.metrics.get("bootstrap") or {}).get("key")
        if recorded != key:
            raise RoundError(
                f"project {project.name!r} already has policy version {version.id} (round {version.round}) "
                f"from other bootstrap parameters (key {recorded!r}; these give {key!r}); a project is "
                "bootstrapped once. Create a new project to start from other settings.")
        if len(versions) > 1:
            raise RoundError(f"project {project.name!r} is already bootstrapped and has {len(versions) - 1} "
                             "later version(s); enqueue alignment_round jobs instead")
        ctx.progress(0.8, f"version 0 (id {version.id}) exists; reusing it")
        evaluation = {k: version.metrics[k] for k in ("success_rate", "mean_return", "d4rl_normalized_score")
                      if k in version.metrics}
    else:
        root = f"projects/{project.id}/bootstrap-{key}"
        source = params.dataset_source(task)
        recorded_data: dict[str, Any]
        if source:  # a named dataset (or a locomotion task's own), read where it is
            dataset: Path | str = resolve_bootstrap_dataset(source, task, named=bool(params.dataset))
            outcome["dataset"] = "named"
            ctx.progress(0.0, f"reading dataset {source}")
            try:
                ds = load_dataset(dataset, task_id=task)
            except DatasetError as exc:
                raise RoundError(f"bootstrap dataset {source!r} cannot be used for {task}: {exc}") from exc
            recorded_data = {"dataset_source": str(dataset), "dataset_episodes": ds.num_episodes,
                             "dataset_steps": int(len(ds.actions))}
            del ds
        else:
            dataset = store.resolve(f"{root}/dataset.hdf5")
            try:
                load_dataset(dataset, task_id=task)
            except DatasetError:  # missing (a crash leaves only a .part file) or unreadable
                outcome["dataset"] = "generated"
                ctx.progress(0.0, f"generating dataset: {params.dataset_episodes} episodes")
                generate_dataset(task, params.dataset_episodes, dataset, seed=settings.seed,
                                 max_episode_steps=settings.horizon(task), progress=False,
                                 on_episode=_Watch(ctx, _Stage(ctx, 0.0, 0.1), "generating dataset", "episode"))
            recorded_data = {"dataset": f"{root}/dataset.hdf5", "dataset_episodes": params.dataset_episodes}
        bc_cfg = params.bc_config(task, dataset, store.resolve(f"{root}/bc"))
        out = Path(bc_cfg.out_dir)
        saved = _saved_bc_step(out)
        if saved is None:
            outcome["bc"] = "trained"
        elif saved < bc_cfg.steps or not (out / "checkpoint").is_dir():
            outcome["bc"] = "resumed"
        stage = _Stage(ctx, 0.1, 0.7)
        stage((saved or 0) / bc_cfg.steps, f"training BC: step {saved or 0}/{bc_cfg.steps}")
        ckpt = train_bc(bc_cfg, params.policy_config(), progress=False, on_step=_Watch(ctx, stage, "training BC"))
        meta = read_checkpoint_meta(ckpt)
        policy = DiffusionPolicy.load(ckpt, task_id=task)
        envs = _make_envs(task, settings, settings.eval_episodes)
        try:
            evaluation = evaluate_version(policy, envs, settings.eval_episodes, settings.seed,
                                          progress=_Stage(ctx, 0.7, 0.8))
        finally:
            _close(envs)
        ctx.check_cancelled()
        version = store.add_policy_version(
            project.id, f"{root}/bc/checkpoint/model.safetensors", parent_id=None, round=0,
            metrics=_json_safe({
                "kind": BOOTSTRAP, "job_id": ctx.job_id, **evaluation, "train": meta.get("metrics", {}),
                "bc_steps": meta.get("step"),
                "bootstrap": {"key": key, **recorded_data, "settings": to_json_dict(settings)}}))
        log.info("job %s registered policy version %s (round 0) of project %s", ctx.job_id, version.id, project.name)
    pair_ids = _render_if_missing(ctx, project, version, settings, 0.8)
    return _json_safe({"policy_version_id": version.id, "round": version.round, **evaluation, **outcome,
                       "next_round": version.round + 1, "pair_ids": pair_ids})


def _render_if_missing(ctx: JobContext, project: ProjectInfo, version: PolicyVersionInfo,
                       settings: BatchSettings, progress_from: float) -> list[int]:
    """Render the batch of round ``version.round + 1`` unless that round has pairs;
    returns the pair ids added."""
    if ctx.store.batch_progress(project.id, version.round + 1)[1] > 0:
        return []
    return render_batch(ctx.store, project, version, settings, version.round + 1,
                        progress=_Stage(ctx, progress_from, 1.0), job_id=ctx.job_id)


# ------------------------------------------------------------------ alignment round


@register_handler(ALIGNMENT_ROUND)
def alignment_round(ctx: JobContext) -> dict[str, Any]:
    """Job handler: align on all comparisons → evaluate → register version r → next batch.

    See the module docstring for the order of operations and why it is crash-safe.
    Parameters: :class:`RoundParams` (flat): AlignConfig fields (``regularizer``,
    ``beta``, ``lam``, ``steps``, ...) and BatchSettings overrides (``pairs_per_batch``,
    ``eval_episodes``, ...).

    Returns:
        JSON result: ``policy_version_id``, ``round``, ``parent_id``, ``reference_id``,
        ``labels_used``, ``implicit_acc`` (0..1, None with only ties),
        ``success_rate`` (0..1), ``mean_return``, ``next_round`` and ``pair_ids`` (the
        pairs this run added).

    Raises:
        RoundError: bad parameters, no policy version yet (run bootstrap first), no
            comparisons to train on, another training job running, or another version
            registered while this round trained.
        TrainingError: a NaN/inf loss; nothing is registered and the previous
            checkpoint is untouched.
        FKPDError: other alignment, checkpoint or artifact errors.
    """
    store = ctx.store
    params = RoundParams.from_params(ctx.params)
    project = store.get_project(ctx.job.project_id)
    _ensure_sole_training_job(ctx)
    versions = served_versions(store, project)
    reference = next((v for v in versions if v.round == 0), None)
    if reference is None:
        raise RoundError(f"project {project.name!r} has no round-0 policy version with a checkpoint; run a "
                         "bootstrap job first")
    settings = params.settings((reference.metrics.get("bootstrap") or {}).get("settings"))
    _apply_threads(settings.threads)
    mine = [v for v in versions if v.metrics.get("job_id") == ctx.job_id and v.metrics.get("kind") == ALIGNMENT_ROUND]
    if mine:  # an earlier attempt of this job registered the version, then died before its batch
        version = mine[-1]
        ctx.progress(0.85, f"version {version.id} was registered by an earlier attempt; rendering its batch")
    else:
        version = _train_and_register(ctx, project, params, settings, reference, previous=versions[-1])
    pair_ids = _render_if_missing(ctx, project, version, settings, 0.85)
    m = version.metrics
    return _json_safe({
        "policy_version_id": version.id, "round": version.round, "parent_id": version.parent_id,
        "reference_id": m.get("reference_id"), "labels_used": m.get("labels_used"),
        "implicit_acc": m.get("implicit_acc"), "success_rate": m.get("success_rate"),
        "mean_return": m.get("mean_return"), "next_round": version.round + 1, "pair_ids": pair_ids})


def _train_and_register(ctx: JobContext, project: ProjectInfo, params: RoundParams, settings: BatchSettings,
                        reference: PolicyVersionInfo, previous: PolicyVersionInfo) -> PolicyVersionInfo:
    """Steps 1-4 of a round (see the module docstring); returns the registered version."""
    from fkpd.train.align import align
    from fkpd.policy import DiffusionPolicy

    store = ctx.store
    round_ = previous.round + 1
    ctx.progress(0.0, "loading comparisons")
    pairs, n_labels = load_comparisons(store, project)
    if not pairs:
        answered, total = store.batch_progress(project.id)
        raise RoundError(
            f"no comparisons to train on in project {project.name!r}: no pair was answered left, right or equal "
            f"yet (skips are never trained on; latest batch: {answered}/{total} answers). Label some pairs, "
            f"then enqueue the round again. Version {previous.id} stays the served policy.")
    ref_dir, init_dir = _checkpoint_dir(store, reference), _checkpoint_dir(store, previous)
    boot = reference.metrics.get("bootstrap") or {}
    # generated data lives in the artifact directory; a named dataset is read where it is
    dataset = str(store.resolve(boot["dataset"])) if boot.get("dataset") else str(boot.get("dataset_source") or "")
    out = store.resolve(f"projects/{project.id}/rounds/round{round_:03d}-job{ctx.job_id}-a{ctx.job.attempts}-"
                        f"{uuid.uuid4().hex[:8]}")
    cfg = params.align_config(round_, settings, checkpoint=str(ref_dir), init=str(init_dir), out_dir=str(out),
                              dataset=dataset)
    stage = _Stage(ctx, 0.05, 0.75)
    stage(0.0, f"aligning: step 0/{cfg.steps} ({len(pairs)} pairs from {n_labels} comparisons)")
    t0 = time.time()
    result = align(cfg, pairs, progress=False, task_id=project.task_id, on_step=_Watch(ctx, stage, "aligning"))
    align_s = time.time() - t0
    policy = DiffusionPolicy.load(result.checkpoint, task_id=project.task_id)
    envs = _make_envs(project.task_id, settings, settings.eval_episodes)
    try:
        t0 = time.time()
        evaluation = evaluate_version(policy, envs, settings.eval_episodes, settings.seed,
                                      progress=_Stage(ctx, 0.75, 0.85))
        eval_s = time.time() - t0
    finally:
        _close(envs)
    ctx.check_cancelled()
    latest = served_versions(store, project)[-1]
    if latest.id != previous.id:
        raise RoundError(f"policy version {latest.id} was registered while this round trained from version "
                         f"{previous.id}; this round's checkpoint {out} is left unregistered. Enqueue a new round.")
    checkpoint = (result.checkpoint / "model.safetensors").relative_to(store.artifact_dir).as_posix()
    version = store.add_policy_version(project.id, checkpoint, parent_id=previous.id, round=round_, metrics=_json_safe({
        "kind": ALIGNMENT_ROUND, "job_id": ctx.job_id, "reference_id": reference.id,
        "regularizer": cfg.regularizer, "beta": cfg.beta, "lam": cfg.lam, "steps": cfg.steps,
        "labels_used": n_labels, "trained_pairs": len(pairs),
        "implicit_acc": result.after.get("implicit_acc"), "implicit_acc_before": result.before.get("implicit_acc"),
        "reward_margin": result.after.get("reward_margin"), "dpo_loss": result.after.get("dpo"),
        "train": result.metrics, **evaluation, "align_s": align_s, "eval_s": eval_s,
        "steps_per_s": result.steps_per_s}))
    log.info("job %s registered policy version %s (round %s) of project %s", ctx.job_id, version.id, round_,
             project.name)
    return version
