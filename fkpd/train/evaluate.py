"""Evaluation of a policy version: the one routine ``fkpd loop`` and the app's worker share.

:func:`evaluate_version` rolls out full episodes in lock step
(:func:`fkpd.policy.rollout.evaluate_in_process`: the reset seeds ``10_000 + i`` of
:func:`fkpd.policy.rollout.evaluate` and per-episode noise seeds) and measures them:
success rate with its 95% Wilson interval, returns, the task's score (D4RL normalised
score on ``d4rl/`` tasks), the intent teachers' scores, smoothness, and, when given, a
scripted teacher's own intent score and the out-of-distribution diagnostic
:class:`ActionOOD`. It keeps the per-episode successes and returns, so that
:func:`compare_with_parent` can compare a new version with its parent episode by episode
on the same evaluation seeds (a paired comparison, with a bootstrap interval).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np
from scipy.spatial import cKDTree

from fkpd.data import OfflineDataset
from fkpd.policy import DiffusionPolicy
from fkpd.policy.rollout import EVAL_SEED_BASE, Episode, evaluate_in_process
from fkpd.prefs.pairs import close_envs
from fkpd.prefs.segments import cut_segment
from fkpd.prefs.teachers import ScriptedTeacher, intent_scores

#: Keys of :meth:`fkpd.policy.rollout.EvalResult.summary` that a version's evaluation keeps.
SUMMARY_KEYS = ("success_rate", "success_ci95", "mean_return", "std_return", "episodes", "d4rl_normalized_score",
                "d4rl_normalized_score_std", "d4rl_dataset")


class ActionOOD:
    """Out-of-distribution diagnostic: how far policy actions are from the data's.

    For each visited state s with action a, take the k dataset states nearest to s
    (Euclidean, on observations normalised to [-1, 1] with the reference's normaliser,
    ``scipy.spatial.cKDTree``) and the distance from a to the nearest of their k
    actions (normalised action units: each action dimension spans 2). The diagnostic is
    the mean over visited states; 0 means every action was seen in a similar state.

    Args:
        ds: the offline dataset π_ref was cloned from.
        policy: supplies the normalisers.
        k: neighbours per query.
    """

    def __init__(self, ds: OfflineDataset, policy: DiffusionPolicy, k: int = 10) -> None:
        self.obs_norm, self.act_norm = policy.obs_normalizer, policy.action_normalizer
        self.tree = cKDTree(self.obs_norm.normalize(ds.observations).astype(np.float64))
        self.actions = self.act_norm.normalize(ds.actions).astype(np.float64)
        self.k = int(min(k, len(ds.observations)))

    def distances(self, observations: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """(N, Do) raw states and (N, Da) raw actions -> (N,) distances."""
        _, idx = self.tree.query(self.obs_norm.normalize(np.asarray(observations, np.float64)), k=self.k)
        idx = np.asarray(idx).reshape(len(observations), -1)
        a = self.act_norm.normalize(np.asarray(actions, np.float64))
        return np.linalg.norm(self.actions[idx] - a[:, None], axis=-1).min(axis=1)

    def __call__(self, episodes: Sequence[Episode], stride: int = 2) -> float:
        """Mean distance over every ``stride``-th step of the episodes."""
        obs = np.concatenate([e.observations[::stride] for e in episodes])
        act = np.concatenate([e.actions[::stride] for e in episodes])
        return float(self.distances(obs, act).mean())


def evaluate_version(policy: DiffusionPolicy, envs: Sequence, episodes: int, seed: int = 0, *,
                     teacher: ScriptedTeacher | None = None, ood: ActionOOD | None = None,
                     progress: Callable[[float, str], None] | None = None,
                     seed_base: int = EVAL_SEED_BASE) -> dict[str, Any]:
    """Evaluate a policy on ``episodes`` full episodes, batched in lock step.

    Args:
        policy: the version to evaluate.
        envs: environments of the policy's task (their horizon is the episode length;
            their count is the rollout batch size).
        episodes: number of episodes (>= 1).
        seed: seeds the sampling noise (the reset seeds are the evaluation seeds).
        teacher: when given, ``intent_score`` is its
            :meth:`~fkpd.prefs.teachers.ScriptedTeacher.intent_score` averaged over whole
            episodes.
        ood: when given, ``ood_action_dist`` (:class:`ActionOOD`).
        progress: optional ``(fraction, message)`` callback.
        seed_base: first reset seed: the evaluation seeds by default,
            :data:`fkpd.policy.rollout.VALIDATION_SEED_BASE` for held-out validation
            episodes.

    Returns:
        ``success_rate`` (0..1), ``success_ci95`` ([lo, hi], Wilson), ``mean_return``
        (sum of rewards per episode, averaged), ``std_return``, ``episodes``; on
        ``d4rl/`` tasks ``d4rl_normalized_score``, ``d4rl_normalized_score_std`` (0-100
        scale) and ``d4rl_dataset``; the intent teachers' scores over the episodes
        (``intent_smooth``, ``intent_high_gripper`` on MetaWorld;
        :func:`fkpd.prefs.teachers.intent_scores`); ``smoothness`` (mean squared action
        change per step); ``intent_score`` and ``ood_action_dist`` as above;
        ``episode_successes`` (0/1) and ``episode_returns`` per episode, in the order of
        the evaluation seeds; and ``eval_s`` (wall seconds).
    """
    t0 = time.time()

    def tick(done: int) -> None:
        if progress is not None:
            progress(done / episodes, f"evaluating: episode {done}/{episodes}")

    res, eps = evaluate_in_process(policy, envs, episodes, seed=seed, progress=tick, seed_base=seed_base)
    summary = res.summary()
    segments = [cut_segment(e, 0, len(e)) for e in eps]
    out: dict[str, Any] = {k: summary[k] for k in SUMMARY_KEYS if k in summary}
    out.update(intent_scores(segments, res.task_id))
    out["smoothness"] = float(np.mean([float(np.square(np.diff(e.actions, axis=0)).sum(1).mean()) for e in eps]))
    out["episode_successes"] = [int(bool(x)) for x in res.successes]
    out["episode_returns"] = [float(x) for x in res.returns]
    if teacher is not None:
        out["intent_score"] = float(np.mean([teacher.intent_score(s) for s in segments]))
    if ood is not None:
        out["ood_action_dist"] = ood(eps)
    out["eval_s"] = time.time() - t0
    return out


class Evaluator:
    """:func:`evaluate_version` with fixed settings, as the round engine calls it.

    Args:
        envs: environments of the task (their horizon is the episode length); or a
            factory ``make_envs(episodes) -> envs`` called per evaluation, whose
            environments are closed afterwards.
        episodes: episodes per evaluation.
        seed: seeds the sampling noise.
        teacher, ood, seed_base: as in :func:`evaluate_version`.
    """

    def __init__(self, envs: Sequence | Callable[[int], list], episodes: int, seed: int = 0, *,
                 teacher: ScriptedTeacher | None = None, ood: ActionOOD | None = None,
                 seed_base: int = EVAL_SEED_BASE) -> None:
        self.envs, self.episodes, self.seed, self.teacher, self.ood = envs, int(episodes), int(seed), teacher, ood
        self.seed_base = int(seed_base)

    def __call__(self, policy: DiffusionPolicy,
                 progress: Callable[[float, str], None] | None = None) -> dict[str, Any]:
        envs = self.envs(self.episodes) if callable(self.envs) else self.envs
        try:
            return evaluate_version(policy, envs, self.episodes, self.seed, teacher=self.teacher, ood=self.ood,
                                    progress=progress, seed_base=self.seed_base)
        finally:
            if callable(self.envs):
                close_envs(envs)


#: Bootstrap resamples of :func:`compare_with_parent` (fixed seed: the interval of one
#: comparison is reproducible).
BOOTSTRAP_RESAMPLES = 5000


def _paired(child: Sequence[float], parent: Sequence[float], seed: int = 0) -> tuple[float, tuple[float, float]]:
    """Mean of child − parent over paired episodes and its 95% percentile-bootstrap
    interval (episodes resampled with replacement)."""
    d = np.asarray(child, np.float64) - np.asarray(parent, np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(BOOTSTRAP_RESAMPLES, len(d)))].mean(1)
    return float(d.mean()), (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))


def compare_with_parent(child: dict[str, Any], parent: dict[str, Any] | None) -> dict[str, Any] | None:
    """Compare a version's evaluation with its parent's, episode by episode.

    Both evaluations roll out the same evaluation reset seeds (``10_000 + i``), so the
    first ``n = min(n_child, n_parent)`` episodes are paired: each difference is the
    same initial state under the two policies. The change in success rate and in mean
    return come with 95% percentile-bootstrap intervals over the paired episodes.

    A version is flagged ``worse`` when its success rate is lower beyond the interval
    (the interval's upper end is below 0); when neither version succeeded in any of the
    paired episodes (no information in success, e.g. locomotion), when the return's
    interval is entirely below 0.

    Args:
        child, parent: :func:`evaluate_version` outputs (with ``episode_successes`` and
            ``episode_returns``); ``parent`` None for version 0.

    Returns:
        None without a parent or per-episode results (evaluations made before they were
        kept); else ``episodes`` (n), ``delta_success`` (fraction, child − parent),
        ``delta_success_ci95``, ``delta_return``, ``delta_return_ci95``, ``worse``
        (bool) and ``metric`` (``success`` or ``return``, what ``worse`` was decided on).
    """
    if not parent:
        return None
    cs, ps = child.get("episode_successes"), parent.get("episode_successes")
    cr, pr = child.get("episode_returns"), parent.get("episode_returns")
    if not (cs and ps and cr and pr):
        return None
    n = min(len(cs), len(ps), len(cr), len(pr))
    ds, ds_ci = _paired(cs[:n], ps[:n])
    dr, dr_ci = _paired(cr[:n], pr[:n])
    informative = any(cs[:n]) or any(ps[:n])
    worse = ds_ci[1] < 0 if informative else dr_ci[1] < 0
    return {"episodes": n, "delta_success": ds, "delta_success_ci95": list(ds_ci), "delta_return": dr,
            "delta_return_ci95": list(dr_ci), "worse": bool(worse), "metric": "success" if informative else "return"}


def describe_comparison(cmp: dict[str, Any] | None, parent: str = "its parent") -> str:
    """One line for logs and pages, e.g. ``success −20 pts vs its parent (95% CI −35 to
    −5, 50 paired episodes), return −80.2: WORSE beyond the interval``; when the flag was
    decided on the return (neither version succeeded), the return's interval too."""
    if not cmp:
        return f"no paired comparison with {parent}"
    lo, hi = cmp["delta_success_ci95"]
    text = (f"success {100 * cmp['delta_success']:+.0f} pts vs {parent} (95% CI {100 * lo:+.0f} to {100 * hi:+.0f}, "
            f"{cmp['episodes']} paired episodes), return {cmp['delta_return']:+.1f}")
    if cmp.get("metric") == "return":  # no success in either version: the flag is decided on the return
        rlo, rhi = cmp["delta_return_ci95"]
        text += f" (95% CI {rlo:+.1f} to {rhi:+.1f}; neither version succeeded, so the return decides)"
    return text + (": WORSE beyond the interval" if cmp["worse"] else "")
