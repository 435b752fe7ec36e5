"""Offline datasets: generation, the D4RL HDF5 layout, validation, and training windows.

Layout on disk (DESIGN.md §3; the layout ``d4rl``'s ``get_dataset`` returns), N steps in
total over all episodes, concatenated:

=========================  =================  ==========================================
key                        shape / dtype      meaning
=========================  =================  ==========================================
``observations``           (N, Do) float32    observation before the action
``actions``                (N, Da) float32    action taken, in ``[-1, 1]``
``rewards``                (N,) float32       reward for that step
``terminals``              (N,) bool          environment termination (MetaWorld: never)
``timeouts``               (N,) bool          True on the last step of each episode
``next_observations``      (N, Do) float32    observation after the action
``infos/success``          (N,) bool          MetaWorld ``info["success"]`` after the step
``infos/reset_seed``       (N,) int64         the episode's reset seed
``infos/behaviour``        (N,) int8          index into attr ``behaviours`` (generated data)
=========================  =================  ==========================================

Root attributes of generated files: ``task_id``, ``recipe`` (JSON of :class:`DataRecipe`),
``behaviours`` (JSON list of behaviour names). An episode ends where ``terminals`` or
``timeouts`` is set.

Real D4RL files load with the same code (:func:`load_dataset`): ``rewards`` and
``terminals`` of shape (N, 1) are flattened as ``d4rl``'s ``get_dataset`` does, extra
``infos/*`` arrays (``qpos``, ``qvel``, ``goal``, ...) are kept, and other groups
(``metadata/*``) are ignored. ``--dataset`` also takes a D4RL dataset name, looked up in
D4RL's cache directory (:func:`fkpd.envs.d4rl.resolve_dataset`), or ``minari:DATASET_ID`` for a
locally present Minari dataset (:func:`fkpd.data.minari.load_minari`).

Generated data follows the noisy-oracle recipe of the MetaWorld preference benchmarks FKPD
was evaluated on: MetaWorld's own scripted policy, run under a per-episode mix of
perturbations so that the data spans good and poor behaviour (see :class:`DataRecipe`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from fkpd.config import to_json_dict
from fkpd.envs import get_task, make_env, scripted_policy
from fkpd.errors import DatasetError
from fkpd.io import atomic_path

REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")
BEHAVIOURS = ("expert", "noisy", "miscalibrated")


@dataclass
class DataRecipe:
    """Per-episode mix of perturbations applied to the scripted policy.

    Each episode draws one behaviour:

    * ``expert``: the scripted action plus Gaussian noise of std ``expert_noise``;
    * ``noisy``: Gaussian noise of std ``noisy_noise`` plus *random-action stretches*:
      at each step a stretch starts with probability ``stretch_prob`` and replaces the
      action by uniform random actions for 5 to ``stretch_max_len`` steps;
    * ``miscalibrated``: the scripted policy sees the object displaced by a fixed
      horizontal offset of ``miscal_radius`` (min, max) metres in a random direction,
      so it acts confidently at the wrong place (and usually fails), plus
      ``expert_noise`` noise. On ``d4rl/maze2d-*`` tasks the planner instead believes
      the goal is in another, random cell (``miscal_radius`` is unused there).

    Fractions are normalised to sum to one. ``clean()`` is the unperturbed recipe.
    Why this mix: MetaWorld's scripted policies are closed-loop and shrug off even
    large i.i.d. action noise (100% success at std 1.0 on door-open), so Gaussian noise
    alone makes no poor behaviour; a wrong belief about the object does, and it gives
    clips where the difference is easy to see.
    """

    expert_frac: float = field(default=0.60, metadata={"help": "fraction of expert episodes"})
    noisy_frac: float = field(default=0.15, metadata={"help": "fraction of noisy episodes"})
    miscal_frac: float = field(default=0.25, metadata={"help": "fraction of miscalibrated episodes"})
    expert_noise: float = 0.1
    noisy_noise: float = 0.4
    stretch_prob: float = 0.03
    stretch_max_len: int = 20
    miscal_radius: tuple[float, float] = (0.04, 0.10)

    def __post_init__(self) -> None:
        fr = np.array([self.expert_frac, self.noisy_frac, self.miscal_frac], dtype=float)
        if (fr < 0).any() or fr.sum() <= 0:
            raise DatasetError(f"behaviour fractions must be >= 0 and not all zero, got {fr.tolist()}")

    @classmethod
    def for_task(cls, task_id: str) -> "DataRecipe":
        """The default recipe of a task: :class:`DataRecipe()` with the task's entry of
        :data:`TASK_RECIPES` applied."""
        return cls(**TASK_RECIPES.get(task_id, {}))

    @classmethod
    def clean(cls) -> "DataRecipe":
        """The unperturbed scripted policy (no noise, expert only)."""
        return cls(expert_frac=1.0, noisy_frac=0.0, miscal_frac=0.0, expert_noise=0.0)

    @property
    def probs(self) -> np.ndarray:
        fr = np.array([self.expert_frac, self.noisy_frac, self.miscal_frac], dtype=float)
        return fr / fr.sum()


#: Per-task calibration of the default recipe, so that BC on the default dataset leaves
#: room for alignment on every tested task (measured with ``bench/bench_bc_recipe.py``).
#: button-press forgives a misplaced approach (its button is a large target pushed along
#: one axis): with the shared recipe BC reached 84% success there, against 34% on
#: door-open, so it gets more and stronger miscalibration (BC: 56%).
#: maze2d-umaze is the opposite: a wrong-goal episode parks the ball in another cell for
#: most of its 300 steps, so resting states are mostly "stay" actions and BC stalls on
#: the way. BC success against the miscalibrated fraction (``bench_bc_recipe.py``, data
#: seed 0, 50 episodes): 0.25 (shared) 32%, 0.20 42%, 0.15 64%, 0.12 88%, 0.05 98%; two
#: other BC runs on the shared recipe reached only 10% (20 episodes each). 0.20 is kept
#: (BC 42/52/70% on data seeds 0/1/2 in the maze2d benchmark). medium and large are not
#: calibrated and use the shared recipe.
TASK_RECIPES: dict[str, dict] = {
    "metaworld/button-press-v3": dict(expert_frac=0.45, noisy_frac=0.15, miscal_frac=0.40,
                                      miscal_radius=(0.08, 0.15)),
    "d4rl/maze2d-umaze": dict(expert_frac=0.65, noisy_frac=0.15, miscal_frac=0.20),
}


def _displace_object(oracle, env, recipe: DataRecipe, rng: np.random.Generator):
    """MetaWorld's miscalibration: the oracle sees the object displaced by a fixed
    horizontal offset of ``recipe.miscal_radius`` metres in a random direction."""
    offset = np.zeros(3)
    ang = rng.uniform(0, 2 * np.pi)
    offset[:2] = rng.uniform(*recipe.miscal_radius) * np.array([np.cos(ang), np.sin(ang)])

    def act(obs: np.ndarray) -> np.ndarray:
        seen = obs.copy()
        seen[4:7] += offset  # object position, current and previous frame
        seen[22:25] += offset
        return oracle(seen)

    return act


def _miscalibration(task_id: str):
    """``(oracle, env, recipe, rng) -> act`` that makes the task's miscalibrated policy."""
    if task_id.startswith("d4rl/maze2d-"):
        from fkpd.envs.maze import wrong_goal

        return wrong_goal
    return _displace_object


def _perturbed_episode(env, oracle, recipe: DataRecipe, seed: int, rng: np.random.Generator,
                       behaviour: int, miscalibrate=_displace_object) -> dict[str, np.ndarray]:
    obs, _ = env.reset(seed=seed)
    da = env.action_space.shape[0]
    policy = oracle
    if BEHAVIOURS[behaviour] == "miscalibrated":
        policy = miscalibrate(oracle, env, recipe, rng)
    noise = recipe.noisy_noise if BEHAVIOURS[behaviour] == "noisy" else recipe.expert_noise
    stretch_left = 0
    rows: dict[str, list] = {k: [] for k in ("obs", "act", "rew", "next", "succ")}
    done = False
    while not done:
        action = policy(obs.copy())
        if BEHAVIOURS[behaviour] == "noisy":
            if stretch_left == 0 and rng.random() < recipe.stretch_prob:
                stretch_left = int(rng.integers(5, recipe.stretch_max_len + 1))
            if stretch_left > 0:
                action = rng.uniform(-1, 1, size=da)
                stretch_left -= 1
        action = np.clip(action + noise * rng.standard_normal(da), -1.0, 1.0).astype(np.float32)
        nxt, reward, terminated, truncated, info = env.step(action)
        rows["obs"].append(obs)
        rows["act"].append(action)
        rows["rew"].append(reward)
        rows["next"].append(nxt)
        rows["succ"].append(info["success"])
        obs = nxt
        done = terminated or truncated
    n = len(rows["act"])
    terminals = np.zeros(n, bool)
    terminals[-1] = bool(terminated)
    timeouts = np.zeros(n, bool)
    timeouts[-1] = not bool(terminated)
    return dict(
        observations=np.asarray(rows["obs"], np.float32),
        actions=np.asarray(rows["act"], np.float32),
        rewards=np.asarray(rows["rew"], np.float32),
        next_observations=np.asarray(rows["next"], np.float32),
        terminals=terminals,
        timeouts=timeouts,
        success=np.asarray(rows["succ"], bool),
    )


def write_dataset(out: Path | str, arrays: dict[str, np.ndarray], infos: dict[str, np.ndarray] | None = None,
                  attrs: dict[str, object] | None = None) -> Path:
    """Write a D4RL-layout HDF5 file atomically (temporary name, then rename).

    Args:
        out: the ``.hdf5`` path.
        arrays: top-level keys (``observations``, ``actions``, ``rewards``,
            ``terminals``, ``timeouts``, optionally ``next_observations``), each with N
            rows; they are gzip-compressed.
        infos: per-step extras, written as ``infos/<key>`` (N rows each).
        attrs: root attributes (strings or numbers).

    Returns:
        ``out``.
    """
    out = Path(out)
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        for k in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts"):
            if k in arrays:
                f.create_dataset(k, data=arrays[k], compression="gzip", compression_opts=4)
        for k, v in (infos or {}).items():
            f.create_dataset(f"infos/{k}", data=v)
        for k, v in (attrs or {}).items():
            f.attrs[k] = v
    return out


def generate_dataset(task_id: str, episodes: int, out: Path | str, recipe: DataRecipe | None = None,
                     seed: int = 0, max_episode_steps: int | None = None,
                     progress: bool = True, on_episode: Callable[[int, int], None] | None = None) -> Path:
    """Roll out the perturbed scripted policy and write a D4RL-layout HDF5 file.

    Episode ``i`` uses reset seed ``seed * 1_000_003 + i`` and one behaviour drawn from
    ``recipe``. The file is written to a temporary name and renamed, so a crash never
    leaves a half-written dataset under ``out``. MetaWorld tasks use MetaWorld's scripted
    policies; ``d4rl/maze2d-*`` tasks use the waypoint planner and PD controller of
    :mod:`fkpd.envs.maze` (a miscalibrated episode believes the goal is in another cell).

    Args:
        task_id: registry id, e.g. ``metaworld/door-open-v3`` or ``d4rl/maze2d-umaze``.
        episodes: number of episodes (>= 1).
        out: output ``.hdf5`` path.
        recipe: perturbation mix; default ``DataRecipe.for_task(task_id)``.
        seed: seeds reset seeds, behaviour draws and noise.
        max_episode_steps: horizon; default the task's.
        progress: show a tqdm bar.
        on_episode: called after every episode with ``(episodes done, episodes)``; an
            exception it raises stops generation and propagates, and nothing is written.

    Returns:
        The path written.

    Raises:
        UnknownTaskError: for an unknown task id.
        DatasetError: if ``episodes < 1``, or the task has no data generator (D4RL
            locomotion: its data is a D4RL or Minari dataset).
    """
    if episodes < 1:
        raise DatasetError(f"--episodes must be at least 1, got {episodes}")
    get_task(task_id)
    if task_id.startswith("d4rl/") and not task_id.startswith("d4rl/maze2d-"):
        name = task_id.split("/", 1)[1]
        raise DatasetError(
            f"task {task_id} has no data generator: its data is the D4RL dataset {name!r}. Put the file in "
            f"D4RL's cache directory and pass --dataset {name}, pass --dataset FILE, or convert a Minari "
            "dataset with `fkpd data import minari:DATASET_ID --out FILE`.")
    recipe = recipe or DataRecipe.for_task(task_id)
    env = make_env(task_id, max_episode_steps=max_episode_steps)
    oracle = scripted_policy(task_id)
    miscalibrate = _miscalibration(task_id)
    rng = np.random.default_rng(seed)
    behaviours = rng.choice(len(BEHAVIOURS), size=episodes, p=recipe.probs)
    chunks = []
    bar = tqdm(range(episodes), desc=f"generate {task_id}", unit="ep", disable=not progress)
    n_success = 0
    try:
        for i in bar:
            reset_seed = seed * 1_000_003 + i
            ep = _perturbed_episode(env, oracle, recipe, reset_seed, rng, int(behaviours[i]), miscalibrate)
            ep["reset_seed"] = np.full(len(ep["actions"]), reset_seed, np.int64)
            ep["behaviour"] = np.full(len(ep["actions"]), behaviours[i], np.int8)
            chunks.append(ep)
            n_success += bool(ep["success"].any())
            bar.set_postfix(success=f"{n_success / (i + 1):.0%}")
            if on_episode is not None:
                on_episode(i + 1, episodes)
    finally:
        env.close()
    data = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    return write_dataset(
        out, data, infos={k: data[k] for k in ("success", "reset_seed", "behaviour")},
        attrs={"task_id": task_id, "recipe": json.dumps(to_json_dict(recipe)),
               "behaviours": json.dumps(list(BEHAVIOURS)), "seed": seed})


@dataclass
class OfflineDataset:
    """A validated dataset in memory.

    Attributes:
        observations: (N, Do) float32.
        actions: (N, Da) float32.
        rewards: (N,) float32.
        episode_ends: (E,) int64, exclusive end index of each episode.
        infos: extra per-step arrays (``success``, ``reset_seed``, ...), each (N, ...).
        attrs: root attributes of the file.
        path: the file it was read from (None for Minari data or data built in memory).
        timeouts: (N,) bool, the ``timeouts`` flags as stored (None for data built in
            memory). They tell which rows ``d4rl.qlearning_dataset`` keeps (all but the
            ``timeouts`` rows and the last row): the rows that Preference Transformer's
            and Uni-RLHF's label indices count (:func:`fkpd.store.export.d4rl_qlearning_rows`).
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    episode_ends: np.ndarray
    infos: dict[str, np.ndarray]
    attrs: dict[str, object]
    path: Path | None = None
    timeouts: np.ndarray | None = None

    @property
    def episode_starts(self) -> np.ndarray:
        return np.concatenate([[0], self.episode_ends[:-1]]).astype(np.int64)

    def episodes(self) -> Iterator[slice]:
        for s, e in zip(self.episode_starts, self.episode_ends):
            yield slice(int(s), int(e))

    @property
    def num_episodes(self) -> int:
        return len(self.episode_ends)

    def episode_returns(self) -> np.ndarray:
        return np.array([self.rewards[s].sum() for s in self.episodes()], np.float64)

    def episode_success(self) -> np.ndarray | None:
        if "success" not in self.infos:
            return None
        return np.array([bool(self.infos["success"][s].any()) for s in self.episodes()])


def _unreadable(path: Path, exc: Exception) -> str:
    """The message for an HDF5 file h5py cannot open; names the byte counts of a
    truncated file (HDF5 reports ``eof = A ... stored_eof = B``)."""
    m = re.search(r"eof = (\d+).*stored_eof = (\d+)", str(exc))
    if m:
        return (f"dataset {str(path)!r} is truncated: the file has {int(m.group(1))} bytes but its HDF5 header "
                f"says {int(m.group(2))}. The copy or download was cut short; regenerate or re-download it.")
    return (f"cannot read {str(path)!r} as HDF5 ({exc}). The file is truncated or not an HDF5 "
            "file; regenerate or re-download it.")


def _read_key(f: h5py.File, key: str, path: Path) -> np.ndarray:
    try:
        return f[key][()]
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise DatasetError(
            f"dataset {str(path)!r}: key `{key}` could not be read ({exc}); the file is probably truncated. "
            "Regenerate or re-download it.") from exc


def names_a_dataset(source: Path | str) -> bool:
    """Whether :func:`load_dataset` has something to look up for ``source``: an existing
    file, ``minari:DATASET_ID``, or a D4RL dataset name (whose file it then looks for in
    D4RL's cache directory)."""
    from fkpd.envs.d4rl import is_d4rl_name

    text = str(source)
    return Path(source).exists() or text.startswith("minari:") or is_d4rl_name(text)


def load_dataset(path: Path | str, task_id: str | None = None) -> OfflineDataset:
    """Read and validate a D4RL-layout dataset (the layout ``d4rl``'s ``get_dataset`` returns).

    Args:
        path: the ``.hdf5`` file; or, when no such file exists, a D4RL dataset name
            (``hopper-medium-v2``) looked up in D4RL's cache directory
            (:func:`fkpd.envs.d4rl.resolve_dataset`); or ``minari:DATASET_ID``, a locally
            present Minari dataset (:func:`fkpd.data.minari.load_minari`).
        task_id: when given, observation and action sizes must match this task. For a
            ``d4rl/maze2d-*`` task, a file that FKPD Studio did not write (no maze2d
            ``task_id`` attribute, not from Minari) is an original D4RL maze2d file and
            is mapped to PointMaze's frame (:func:`fkpd.envs.maze.convert_d4rl_dataset`).

    Returns:
        The :class:`OfflineDataset`.

    Raises:
        DatasetError: missing or unreadable file (a truncated file says so, with its
            byte counts), a missing key, a key that cannot be read, mismatched lengths,
            wrong observation/action size for the task, NaN/inf values, or no steps.
            Every message names the key or dimension at fault and the fix.
    """
    source = str(path)
    if source.startswith("minari:"):
        from fkpd.data.minari import load_minari

        return load_minari(source[len("minari:"):], task_id=task_id)
    path = Path(path)
    if not path.exists():
        from fkpd.envs.d4rl import resolve_dataset

        resolved = resolve_dataset(source)
        if resolved is None:
            raise DatasetError(
                f"dataset file {str(path)!r} does not exist. Generate one with "
                f"`fkpd data generate --task TASK --episodes N --out {path}` or pass the right path."
            )
        path = resolved
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DatasetError(_unreadable(path, exc)) from exc
    with f:
        missing = [k for k in REQUIRED_KEYS if k not in f]
        if missing:
            raise DatasetError(
                f"dataset {str(path)!r} is missing key(s) {missing}; the D4RL layout needs "
                f"{list(REQUIRED_KEYS)}. Re-export the dataset with these keys."
            )
        keys = list(REQUIRED_KEYS) + (["next_observations"] if "next_observations" in f else [])
        for k in keys:
            if not isinstance(f[k], h5py.Dataset):
                raise DatasetError(
                    f"dataset {str(path)!r}: key `{k}` is a group, not an array; the D4RL layout stores one "
                    "array per key (a Minari dataset is read with --dataset minari:DATASET_ID).")
        arrays = {k: _read_key(f, k, path) for k in keys}
        infos = {}
        if "infos" in f and isinstance(f["infos"], h5py.Group):
            for k, v in f["infos"].items():
                if isinstance(v, h5py.Dataset):
                    infos[k] = _read_key(f, f"infos/{k}", path)
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    ds = validate_arrays(arrays, infos, attrs, where=f"dataset {str(path)!r}", task_id=task_id, path=path)
    written_here = str(attrs.get("task_id", "")).startswith("d4rl/maze2d-") or attrs.get("source") == "minari"
    if task_id is not None and task_id.startswith("d4rl/maze2d-") and not written_here:
        # An original D4RL maze2d file: D4RL's frame, not PointMaze's (see fkpd.envs.maze).
        from fkpd.envs.maze import convert_d4rl_dataset

        ds = convert_d4rl_dataset(ds, task_id[len("d4rl/maze2d-"):])
    return ds


def validate_arrays(arrays: dict[str, np.ndarray], infos: dict[str, np.ndarray], attrs: dict[str, object],
                    where: str, task_id: str | None = None, path: Path | None = None) -> OfflineDataset:
    """Check arrays in the D4RL layout and build the :class:`OfflineDataset`.

    Args:
        arrays: ``observations`` (N, Do), ``actions`` (N, Da), ``rewards``,
            ``terminals``, ``timeouts`` (N,) or (N, 1), optional ``next_observations``
            (N, Do).
        infos: per-step extras, N rows each.
        attrs: metadata kept on the dataset.
        where: how messages name the source, e.g. ``dataset 'x.hdf5'``.
        task_id: when given, Do and Da must be the task's.
        path: recorded on the result.

    Raises:
        DatasetError: see :func:`load_dataset`.
    """
    obs = np.asarray(arrays["observations"], np.float32)
    act = np.asarray(arrays["actions"], np.float32)
    if obs.ndim != 2 or act.ndim != 2:
        raise DatasetError(
            f"{where}: `observations` and `actions` must be 2-D (N, Do) and (N, Da), "
            f"got shapes {obs.shape} and {act.shape}."
        )
    n = len(obs)
    flat = {}
    for k in ("rewards", "terminals", "timeouts"):
        v = np.asarray(arrays[k])
        if v.ndim == 2 and v.shape[1] == 1:  # as d4rl's get_dataset
            v = v[:, 0]
        if v.ndim != 1:
            raise DatasetError(f"{where}: key `{k}` must hold one value per step, shape (N,), got shape {v.shape}.")
        flat[k] = v
    for k in ("actions", "rewards", "terminals", "timeouts"):
        rows = len(act) if k == "actions" else len(flat[k])
        if rows != n:
            raise DatasetError(
                f"{where}: key `{k}` has {rows} rows but `observations` has "
                f"{n}; every key must have one row per step."
            )
    nxt = arrays.get("next_observations")
    if nxt is not None and np.shape(nxt) != obs.shape:
        raise DatasetError(
            f"{where}: key `next_observations` has shape {np.shape(nxt)} but `observations` has {obs.shape}; "
            "they must match row for row.")
    for k, v in infos.items():
        if len(v) != n:
            raise DatasetError(
                f"{where}: key `infos/{k}` has {len(v)} rows but `observations` has {n}."
            )
    if task_id is not None:
        spec = get_task(task_id)
        if obs.shape[1] != spec.obs_dim:
            raise DatasetError(
                f"{where}: observation dimension is {obs.shape[1]} but task "
                f"{task_id} has Do={spec.obs_dim}. Use a dataset recorded on {task_id} or pass "
                "the task it was recorded on."
            )
        if act.shape[1] != spec.action_dim:
            raise DatasetError(
                f"{where}: action dimension is {act.shape[1]} but task {task_id} "
                f"has Da={spec.action_dim}. Use a dataset recorded on {task_id}."
            )
    checks = [("observations", obs), ("actions", act), ("rewards", flat["rewards"])]
    if nxt is not None:
        checks.append(("next_observations", np.asarray(nxt)))
    for k, v in checks:
        bad = ~np.isfinite(v)
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise DatasetError(
                f"{where}: key `{k}` holds {int(bad.sum())} NaN/inf value(s), the first "
                f"at row {row}. Drop or repair those steps before training."
            )
    ends_mask = np.asarray(flat["terminals"], bool) | np.asarray(flat["timeouts"], bool)
    if n == 0:
        raise DatasetError(f"{where} has no steps.")
    ends_mask[-1] = True  # a trailing partial episode still counts
    episode_ends = np.flatnonzero(ends_mask).astype(np.int64) + 1
    return OfflineDataset(
        observations=obs, actions=act, rewards=np.asarray(flat["rewards"], np.float32),
        episode_ends=episode_ends, infos=infos, attrs=attrs, path=path,
        timeouts=np.asarray(flat["timeouts"], bool),
    )


def dataset_info(ds: OfflineDataset) -> dict[str, object]:
    """Summary statistics: episodes, steps, return and success distribution."""
    rets = ds.episode_returns()
    lengths = np.diff(np.concatenate([[0], ds.episode_ends]))
    info: dict[str, object] = {
        "episodes": ds.num_episodes,
        "steps": int(len(ds.actions)),
        "obs_dim": int(ds.observations.shape[1]),
        "action_dim": int(ds.actions.shape[1]),
        "episode_length": {"min": int(lengths.min()), "mean": float(lengths.mean()), "max": int(lengths.max())},
        "return": {q: float(v) for q, v in zip(
            ("min", "p25", "median", "p75", "max"), np.percentile(rets, [0, 25, 50, 75, 100]))},
        "return_mean": float(rets.mean()),
        "task_id": ds.attrs.get("task_id"),
    }
    succ = ds.episode_success()
    if succ is not None:
        info["success_rate"] = float(succ.mean())
    if "behaviour" in ds.infos and "behaviours" in ds.attrs:
        names = json.loads(str(ds.attrs["behaviours"]))
        per = {}
        starts = ds.episode_starts
        beh = ds.infos["behaviour"][starts]
        for i, name in enumerate(names):
            m = beh == i
            if m.any():
                per[name] = {"episodes": int(m.sum()), "return_mean": float(rets[m].mean())}
                if succ is not None:
                    per[name]["success_rate"] = float(succ[m].mean())
        info["behaviours"] = per
    return info


class Normalizer:
    """Affine map of each dimension to ``[-1, 1]`` from the data's min and max.

    Dimensions with (almost) no range map to 0 and back to their constant. Statistics are
    stored in checkpoints (DESIGN.md §3), so a policy carries its own normaliser.

    Args:
        low, high: (D,) per-dimension minimum and maximum.
    """

    def __init__(self, low: np.ndarray, high: np.ndarray, eps: float = 1e-4) -> None:
        self.low = np.asarray(low, np.float32)
        self.high = np.asarray(high, np.float32)
        if self.low.shape != self.high.shape:
            raise ValueError(f"low and high shapes differ: {self.low.shape} vs {self.high.shape}")
        span = self.high - self.low
        self.scale = np.where(span > eps, 2.0 / np.maximum(span, eps), 0.0).astype(np.float32)
        self.center = ((self.high + self.low) / 2).astype(np.float32)
        # Inverse scale, 0 for constant dimensions (which map back to their constant).
        self.inv_scale = np.divide(1.0, self.scale, out=np.zeros_like(self.scale), where=self.scale > 0)

    @classmethod
    def fit(cls, x: np.ndarray) -> "Normalizer":
        """Fit on ``x`` of shape (N, D)."""
        return cls(x.min(axis=0), x.max(axis=0))

    def normalize(self, x):
        """(..., D) raw -> (..., D) in [-1, 1]; numpy arrays or torch tensors."""
        if isinstance(x, torch.Tensor):
            return (x - torch.as_tensor(self.center, device=x.device)) * torch.as_tensor(self.scale, device=x.device)
        return (x - self.center) * self.scale

    def unnormalize(self, y):
        """(..., D) in [-1, 1] -> (..., D) raw; constant dimensions return their constant."""
        if isinstance(y, torch.Tensor):
            return y * torch.as_tensor(self.inv_scale, device=y.device) + torch.as_tensor(self.center, device=y.device)
        return y * self.inv_scale + self.center

    def state_dict(self) -> dict[str, list[float]]:
        return {"low": self.low.tolist(), "high": self.high.tolist()}

    @classmethod
    def from_state_dict(cls, d: dict[str, list[float]]) -> "Normalizer":
        return cls(np.asarray(d["low"], np.float32), np.asarray(d["high"], np.float32))


class WindowSampler:
    """(observation history, action chunk) windows over an :class:`OfflineDataset`.

    For every step t of every episode the window holds observations t-To+1..t (the
    first observation repeated before the episode start) and actions t..t+Ta-1 (the last
    action repeated after the episode end), as in Chi et al.'s diffusion_policy
    ``SequenceSampler`` with edge padding. Both are normalised to ``[-1, 1]``.
    Whole normalised arrays are kept as tensors and windows are gathered by index, so a
    batch costs one indexing op.

    Args:
        ds: the dataset.
        n_obs_steps: To.
        horizon: Ta, length of the predicted action chunk.
        obs_normalizer, action_normalizer: fitted on ``ds`` when not given.
    """

    def __init__(self, ds: OfflineDataset, n_obs_steps: int, horizon: int,
                 obs_normalizer: Normalizer | None = None,
                 action_normalizer: Normalizer | None = None) -> None:
        self.obs_normalizer = obs_normalizer or Normalizer.fit(ds.observations)
        self.action_normalizer = action_normalizer or Normalizer.fit(ds.actions)
        self.obs = torch.from_numpy(self.obs_normalizer.normalize(ds.observations).astype(np.float32))
        self.act = torch.from_numpy(self.action_normalizer.normalize(ds.actions).astype(np.float32))
        obs_idx, act_idx = [], []
        for s in ds.episodes():
            t = np.arange(s.start, s.stop)
            obs_idx.append(np.clip(t[:, None] + np.arange(-n_obs_steps + 1, 1)[None], s.start, s.stop - 1))
            act_idx.append(np.clip(t[:, None] + np.arange(horizon)[None], s.start, s.stop - 1))
        self.obs_index = torch.from_numpy(np.concatenate(obs_idx))  # (W, To)
        self.act_index = torch.from_numpy(np.concatenate(act_idx))  # (W, Ta)

    def __len__(self) -> int:
        return len(self.obs_index)

    def get(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows ``idx`` (B,) -> (obs (B, To, Do), actions (B, Ta, Da)), normalised."""
        return self.obs[self.obs_index[idx]], self.act[self.act_index[idx]]

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A uniformly random batch of windows (with replacement)."""
        idx = torch.randint(0, len(self), (batch_size,), generator=generator)
        return self.get(idx)
