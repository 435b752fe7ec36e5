"""Alignment rounds: FKPD (forward KL), plain Diffusion-DPO, or DPO with reverse KL.

One round trains the latest policy version π_θ (``init``, by default the reference) on
all preference pairs so far, against the frozen behaviour-cloning reference π_ref
(``checkpoint``), and saves a new version that records its parent, round and metrics:

    L(θ) = L_DPO(θ; pairs, π_ref, β) + λ·R(θ),
    R = L_BC on the offline dataset (``forward``, FKPD), the DPOK-style chain
    ‖ε_θ − ε_ref‖² (``reverse``) or 0 (``none``)           (DESIGN.md §2; :mod:`fkpd.train.losses`)

The trainer takes an in-memory list of winner-first pairs ``(σ_w, σ_l, p)``
(:func:`align`); reading a preferences file (:func:`fkpd.prefs.segments.load_preferences`)
and converting labels (:func:`fkpd.prefs.teachers.to_winner_first`) happen before, so the
preference database can feed the same function.

Output directory layout (like :mod:`fkpd.train.bc`)::

    OUT/checkpoint/   model.safetensors + config.json  (new version; parent, round, metrics)
    OUT/metrics.jsonl                                  (one JSON line per log point)
    OUT/tb/                                            (the same as TensorBoard events, fkpd.train.tracking)
    OUT/config.json                                    (the resolved AlignConfig)

The new checkpoint is written atomically, only after training finished with finite
losses; the parent and the reference are never written to.
"""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from diffusers.optimization import get_constant_schedule_with_warmup
from tqdm.auto import tqdm

from fkpd.config import save_json, to_json_dict
from fkpd.data import OfflineDataset, WindowSampler, load_dataset, names_a_dataset
from fkpd.errors import CheckpointError, ConfigError
from fkpd.train.losses import (BC_SOURCES, OBJECTIVES, REGULARIZERS, DPOTerms, PairBatch, alignment_loss, dpo_metrics,
                               dpo_terms, preference_nll)
from fkpd.policy import DiffusionPolicy, checkpoint_dir, pick_device, read_checkpoint_meta
from fkpd.prefs.segments import PreferenceError, Segment, load_preferences
from fkpd.prefs.teachers import to_winner_first
from fkpd.train.bc import TrainingError, optimizer_step
from fkpd.train.tracking import RunLog

WinnerFirstPair = tuple[Segment, Segment, float]


#: ``acc_lr_decay`` when not given, per objective: the released code's k = 20 for its
#: in-sigmoid form (benchmarked so); off for the others, as they were benchmarked.
DEFAULT_ACC_LR_DECAY = {"in_sigmoid": 20.0, "additive": 0.0, "filtered_bc": 0.0}


@dataclass
class AlignConfig:
    """One alignment round. Every field is also a ``fkpd align`` flag.

    Defaults follow the reference points of DESIGN.md §2 (β = 500 as in FKPD's code,
    lr 1e-4) except λ: with this loss scale the DPO gradient carries a factor
    β/2·σ(−z) ≈ β/4 = 125 at the start, so λ = 1 leaves the BC term ~100x weaker and the
    policy drifts off the data. λ = 100 balances the two. On door-open (one set of 200
    return-teacher pairs from BC rollouts, 50 evaluation episodes, one seed, so only
    indicative) λ = 1/10/100/300 gave mean returns 407/486/543/500 and success
    0/10/24/18% against BC's 432 (12%) and DPO-only's 278 (0%).

    ``objective`` picks the form (:func:`fkpd.train.losses.alignment_loss`): ``in_sigmoid``
    (the default: the released code's form, with ``c_bc``, ``loser_weight``,
    ``with_reference`` and ``bc_source``; its CPOD MetaWorld settings are ``--objective
    in_sigmoid --with-reference false --c-bc 1 --lr 2e-5 --acc-lr-decay 20``), ``additive``
    (the paper's L_DPO + λ·R, with ``regularizer`` and ``lam``; the other regularisers,
    reverse KL and none, belong to this form only) or ``filtered_bc`` (the baseline).
    ``acc_lr_decay`` applies to every objective; unset, it is 20 for ``in_sigmoid`` and 0
    for the others (:data:`DEFAULT_ACC_LR_DECAY`). The default (in-sigmoid, c_bc = 1,
    reference terms on, k = 20, 300 steps) was picked from the four-task MetaWorld
    benchmark (``bench/bench_alignment.py``, 3 seeds, 400 labels, 50 evaluation
    episodes); the tables and the reason are in the README.
    """

    checkpoint: str = field(default="", metadata={"help": "reference (BC) checkpoint REF, kept frozen"})
    prefs: str = field(default="", metadata={"help": "preferences file (fkpd-prefs/1 JSON) listing segment pairs"})
    init: str = field(default="", metadata={"help": "checkpoint to start from, the latest version (default: REF)"})
    out_dir: str = field(default="", metadata={"help": "output directory (default runs/align/<task>/round<k>)"})
    dataset: str = field(default="", metadata={"help": "offline dataset for the forward-KL term (default: REF's)"})
    objective: str = field(default="in_sigmoid", metadata={"help": "in_sigmoid: the BC term inside the sigmoid "
                                                               "(the released code's form; the default, see the "
                                                               "README's benchmark); additive: L_DPO + λ·R (the "
                                                               "paper's equation); filtered_bc: BC on preferred "
                                                               "segments only (baseline)"})
    regularizer: str = field(default="forward", metadata={"help": "additive objective: forward (FKPD), reverse "
                                                                  "(DPOK-style) or none; the other objectives "
                                                                  "take forward only"})
    beta: float = field(default=500.0, metadata={"help": "β of the DPO term"})
    lam: float = field(default=100.0, metadata={"help": "λ, weight of the regulariser (see the class docstring)"})
    c_bc: float = field(default=1.0, metadata={"help": "in_sigmoid: weight of L_BC inside the sigmoid"})
    loser_weight: float = field(default=1.0, metadata={"help": "in_sigmoid: λ_l, weight of the loser's terms"})
    with_reference: bool = field(default=True, metadata={"help": "in_sigmoid: include the reference terms m_ref"})
    bc_source: str = field(default="dataset", metadata={"help": "in_sigmoid: L_BC on offline-dataset windows "
                                                                "(dataset) or on the pair's own segments (pairs)"})
    acc_lr_decay: float | None = field(default=None, metadata={
        "help": "k: scale each step's learning rate by exp(-k·max(acc − 0.5, 0)), acc the batch's implicit accuracy; "
                "0: off (default: 20 with in_sigmoid, as the released code, 0 with the other objectives)"})
    steps: int = field(default=300, metadata={"help": "gradient steps"})
    lr: float = field(default=1e-4, metadata={"help": "learning rate (AdamW, constant after warm-up)"})
    batch_pairs: int = field(default=8, metadata={"help": "preference pairs per step (2·L windows each)"})
    bc_batch_size: int = field(default=256, metadata={"help": "dataset windows per step (forward)"})
    reverse_states: int = field(default=64, metadata={"help": "states per step for the reverse-KL chain"})
    warmup_steps: int = field(default=10, metadata={"help": "linear learning-rate warm-up steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm"})
    round: int = field(default=-1, metadata={"help": "round number to record (-1: parent's round + 1)"})
    seed: int = field(default=0, metadata={"help": "seed for batches and noise"})
    device: str = field(default="auto", metadata={"help": "auto (cuda, mps, cpu), or a torch device"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch default)"})
    log_every: int = field(default=25, metadata={"help": "steps between metric log lines"})
    eval_pairs: int = field(default=256, metadata={"help": "pairs of the implicit accuracy before and after the "
                                                           "round: a seeded random sample of this size, with its "
                                                           "Wilson interval at 95 percent (0: all pairs, exact)"})

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.acc_lr_decay is None:
            self.acc_lr_decay = DEFAULT_ACC_LR_DECAY[self.objective]
        if self.bc_source not in BC_SOURCES:
            raise ConfigError(f"--bc-source must be one of {', '.join(BC_SOURCES)}, got {self.bc_source!r}")
        for name in ("c_bc", "loser_weight", "acc_lr_decay"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value!r}")
        if self.regularizer not in REGULARIZERS:
            raise ConfigError(f"--regularizer must be one of {', '.join(REGULARIZERS)}, got {self.regularizer!r}")
        if self.objective != "additive" and self.regularizer != "forward":
            raise ConfigError(f"--regularizer {self.regularizer} belongs to the additive objective (L_DPO + λ·R); "
                              f"the {self.objective} objective has its own forward-KL (BC) term. Pass --objective "
                              f"additive --regularizer {self.regularizer} (e.g. to compare with reverse KL or "
                              "DPO alone)")
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ConfigError(f"--beta must be a finite number > 0, got {self.beta!r}")
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise ConfigError(f"--lam must be a finite number >= 0, got {self.lam!r}")
        if not (self.lr > 0):
            raise ConfigError(f"--lr must be > 0, got {self.lr!r}")
        if int(self.eval_pairs) < 0:
            raise ConfigError(f"--eval-pairs must be >= 0 (0: all pairs), got {self.eval_pairs!r}")
        for name in ("steps", "batch_pairs", "bc_batch_size", "reverse_states", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"AlignConfig.{name} must be >= 1, got {getattr(self, name)!r}")


@dataclass
class AlignResult:
    """What :func:`align` returns.

    Attributes:
        checkpoint: the new checkpoint directory.
        metrics: last logged training window (loss, dpo, reg, implicit_acc, ...).
        before, after: :func:`evaluate_pairs` on the training pairs (a sample of
            ``AlignConfig.eval_pairs``, with its interval) at the start and end.
        steps_per_s: gradient steps per second (wall clock, training loop only).
        history: every logged line.
    """

    checkpoint: Path
    metrics: dict[str, float]
    before: dict[str, float]
    after: dict[str, float]
    steps_per_s: float
    history: list[dict[str, float]]


class SegmentRef:
    """A stored segment known by its length and task, whose arrays are read only when a
    batch needs them (:class:`PairWindows` streams them through a bounded cache), so a
    round never holds every labelled segment in memory at once.

    Args:
        key: identifies the segment (e.g. the store's clip id) in that cache.
        length: L, its number of steps.
        task_id: the task it was recorded on ('' when unknown).
        load: returns the :class:`~fkpd.prefs.segments.Segment`; may raise
            ``PreferenceError`` or ``ArtifactIntegrityError`` (a missing or changed file).
    """

    __slots__ = ("key", "length", "task_id", "_load")

    def __init__(self, key: Any, length: int, task_id: str, load: Callable[[], Segment]) -> None:
        self.key, self.length, self.task_id, self._load = key, int(length), task_id, load

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return f"SegmentRef({self.key!r}, length={self.length}, task_id={self.task_id!r})"

    def load(self) -> Segment:
        """Read the segment; its length must be the recorded one.

        Raises:
            PreferenceError: the file holds another number of steps than recorded, or bad arrays.
        """
        seg = self._load()
        if len(seg) != self.length:
            raise PreferenceError(f"segment {self.key!r} ({seg.path or 'stored'}) has {len(seg)} steps but "
                                  f"{self.length} were recorded for it; the file was replaced")
        return seg


#: Steps of stored segments (:class:`SegmentRef`) :class:`PairWindows` keeps loaded
#: (least recently used dropped first): about 45 MB at Do = 39, Da = 4.
SEGMENT_CACHE_STEPS = 1 << 18


class PairWindows:
    """Winner-first pairs as policy windows, for batched DPO steps, built batch by batch.

    The segments of the pairs asked for are concatenated into one
    :class:`~fkpd.data.OfflineDataset` (each segment an episode) and windowed by one
    :class:`~fkpd.data.WindowSampler` with the reference's normalisers, so windows are
    edge-padded inside each segment exactly as in behaviour cloning; segments of
    different lengths are padded to L_max (of all pairs) and masked. Segments given as
    :class:`SegmentRef` are read when a batch needs them and kept in a cache of at most
    ``cache_steps`` steps, so memory and start-up time do not grow with the number of
    pairs; in-memory segments are used as they are.

    Args:
        pairs: ``[(σ_w, σ_l, p), ...]`` winner first, p in {1.0, 0.5}; σ a
            :class:`~fkpd.prefs.segments.Segment` or a :class:`SegmentRef`.
        policy: supplies To, Ta, Do, Da and the normalisers.
        task_id: when given, segments that record another task are refused.
        cache_steps: bound of the cache of loaded :class:`SegmentRef` segments, in steps.

    Raises:
        PreferenceError: empty list, a segment of the wrong size or task, or p not in
            {1, 0.5} (for a :class:`SegmentRef`, its size is checked when it is read).
    """

    def __init__(self, pairs: Sequence[WinnerFirstPair], policy: DiffusionPolicy, task_id: str | None = None,
                 cache_steps: int = SEGMENT_CACHE_STEPS) -> None:
        if not pairs:
            raise PreferenceError("no trainable preference pairs (empty set, or only skips); label some pairs "
                                  "left/right/equal first")
        self.cfg = cfg = policy.cfg
        self.obs_normalizer, self.action_normalizer = policy.obs_normalizer, policy.action_normalizer
        segs: list = []
        ps = []
        for i, item in enumerate(pairs):
            if len(item) != 3:
                raise PreferenceError(f"pair {i}: expected (winner, loser, p), got {len(item)} items")
            w, l, p = item
            if p not in (1.0, 0.5):
                raise PreferenceError(f"pair {i}: p = {p!r}; winner-first pairs carry p = 1.0 or 0.5 "
                                      "(convert labels with fkpd.prefs.teachers.to_winner_first)")
            for seg in (w, l):
                if task_id and seg.task_id and seg.task_id != task_id:
                    where = getattr(seg, "path", None) or getattr(seg, "key", "")
                    raise PreferenceError(f"pair {i}: segment {where or ''} was recorded on {seg.task_id!r}, not "
                                          f"{task_id!r}; use preferences of this task")
                if not isinstance(seg, SegmentRef):
                    self._check(seg, f"pair {i}")
            segs += [w, l]
            ps.append(float(p))
        self.segments = segs  # 2·i winner, 2·i + 1 loser of pair i
        self.lengths = np.array([len(s) for s in segs], np.int64)
        if (self.lengths < 1).any():
            raise PreferenceError("a segment of length 0 in the pairs; every segment needs at least one step")
        self.ends = np.cumsum(self.lengths)
        self.max_len = int(self.lengths.max())
        self.p = torch.tensor(ps, dtype=torch.float32)
        self.cache_steps = int(cache_steps)
        self._cache: OrderedDict[Any, Segment] = OrderedDict()
        self._cached_steps = 0

    def _check(self, seg: Segment, what: str) -> None:
        cfg = self.cfg
        if seg.observations.shape[1] != cfg.obs_dim or seg.actions.shape[1] != cfg.action_dim:
            raise PreferenceError(
                f"{what}: segment {seg.path or ''} has Do={seg.observations.shape[1]}, "
                f"Da={seg.actions.shape[1]} but the policy has Do={cfg.obs_dim}, Da={cfg.action_dim}; "
                "the preferences come from another task")

    def __len__(self) -> int:
        return len(self.p)

    def segment(self, i: int) -> Segment:
        """Segment ``i`` (2·pair + 0 winner / 1 loser), read through the cache if stored."""
        seg = self.segments[i]
        if not isinstance(seg, SegmentRef):
            return seg
        got = self._cache.get(seg.key)
        if got is not None:
            self._cache.move_to_end(seg.key)
            return got
        got = seg.load()
        self._check(got, f"pair {i // 2}")
        self._cache[seg.key] = got
        self._cached_steps += len(got)
        while self._cached_steps > self.cache_steps and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached_steps -= len(old)
        return got

    def _sampler(self, seg_ids: Sequence[int]) -> tuple[WindowSampler, np.ndarray]:
        """A :class:`WindowSampler` over segments ``seg_ids`` and their start rows in it."""
        segs = [self.segment(int(i)) for i in seg_ids]
        lengths = np.array([len(s) for s in segs], np.int64)
        ends = np.cumsum(lengths)
        ds = OfflineDataset(
            observations=np.concatenate([s.observations for s in segs]),
            actions=np.concatenate([s.actions for s in segs]),
            rewards=np.concatenate([s.rewards for s in segs]),
            episode_ends=ends, infos={}, attrs={})
        sampler = WindowSampler(ds, self.cfg.n_obs_steps, self.cfg.horizon, self.obs_normalizer,
                                self.action_normalizer)
        return sampler, ends - lengths

    def batch(self, idx: torch.Tensor) -> PairBatch:
        """Pairs ``idx`` (B,) -> :class:`~fkpd.train.losses.PairBatch` with L = L_max."""
        idx = torch.as_tensor(idx).flatten()
        b = len(idx)
        seg_ids = torch.stack([2 * idx, 2 * idx + 1], 1).flatten().numpy()  # (2B,) w0, l0, w1, l1, ...
        sampler, starts = self._sampler(seg_ids)
        lengths = self.lengths[seg_ids]
        steps = np.arange(self.max_len)[None]
        index = starts[:, None] + np.minimum(steps, lengths[:, None] - 1)
        obs, act = sampler.get(torch.from_numpy(index.reshape(-1)))
        obs = obs.view(b, 2, self.max_len, *obs.shape[1:])
        act = act.view(b, 2, self.max_len, *act.shape[1:])
        mask = torch.from_numpy((steps < lengths[:, None]).astype(np.float32)).view(b, 2, self.max_len)
        return PairBatch(obs[:, 0], act[:, 0], mask[:, 0], obs[:, 1], act[:, 1], mask[:, 1], self.p[idx])

    def states(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` random observation histories (n, To, Do), uniform over the windows (steps)
        of all segments."""
        idx = torch.randint(0, int(self.ends[-1]), (n,), generator=generator).numpy()
        seg = np.searchsorted(self.ends, idx, side="right")
        used, where = np.unique(seg, return_inverse=True)
        sampler, starts = self._sampler(used)
        rows = starts[where] + (idx - (self.ends[seg] - self.lengths[seg]))
        return sampler.obs[sampler.obs_index[torch.from_numpy(rows)]]


def sample_pairs(n_pairs: int, size: int | None, seed: int) -> torch.Tensor:
    """Indices of a seeded uniform random sample of ``size`` of ``n_pairs`` pairs, without
    replacement, in increasing order; all pairs (``arange``) when ``size`` is None, 0 or
    at least ``n_pairs``."""
    if not size or size >= n_pairs:
        return torch.arange(n_pairs)
    gen = torch.Generator().manual_seed(int(seed) + 0x5EED)  # apart from the noise draw's generator
    return torch.randperm(n_pairs, generator=gen)[:int(size)].sort().values


def wilson_interval(p_hat: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (Wilson, JASA 1927) from the
    observed fraction ``p_hat`` of ``n`` trials (half-counts allowed); ``(nan, nan)``
    when n = 0."""
    if n <= 0 or not math.isfinite(p_hat):
        return float("nan"), float("nan")
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + confidence / 2))
    denom = 1 + z * z / n
    centre = (p_hat + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p_hat * (1 - p_hat), 0.0) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@torch.no_grad()
def evaluate_pairs(policy: DiffusionPolicy, reference: DiffusionPolicy, windows: PairWindows, beta: float,
                   seed: int = 0, batch_pairs: int = 32, sample: int | None = None,
                   reference_cache: dict | None = None) -> dict[str, float]:
    """DPO metrics (:func:`fkpd.train.losses.dpo_metrics`) and loss over the pairs, or over
    a seeded random sample of them, with a fixed noise draw (``seed``) so values at
    different θ are comparable.

    The cost is that of the pairs evaluated: with ``sample`` it stays flat however many
    pairs there are, and ``implicit_acc_low``/``implicit_acc_high`` bound the accuracy
    over all pairs (95 % Wilson interval over the sample's strict pairs). With the same
    ``seed``, ``sample`` and ``batch_pairs`` the pairs and (t, ε) draws are the same, so
    the frozen reference's errors are too: a ``reference_cache`` dict passed to several
    calls (before and after a round) keeps them, and the reference runs once.

    Args:
        sample: pairs to evaluate (None or 0: all, the exact value).
        reference_cache: a dict to keep m_ref in between calls (filled by the first).

    Returns:
        metrics over the pairs evaluated, plus ``dpo`` (mean loss), ``pairs`` (all),
        ``pairs_evaluated`` and the interval ``implicit_acc_low``/``implicit_acc_high``.
    """
    gen = torch.Generator().manual_seed(seed)
    dev = policy.device
    chosen = sample_pairs(len(windows), sample, seed)
    key = (len(windows), int(seed), int(sample or 0), int(batch_pairs))
    cached = None
    if reference_cache is not None:
        if reference_cache.get("key") != key:
            reference_cache.clear()
            reference_cache.update(key=key, errors=[])
        cached = reference_cache["errors"]
    terms_all = []
    for k, b0 in enumerate(range(0, len(chosen), batch_pairs)):
        idx = chosen[b0:b0 + batch_pairs]
        batch = windows.batch(idx).to(dev)
        ref = cached[k] if cached is not None and k < len(cached) else None
        terms = dpo_terms(policy, reference, batch, beta, generator=gen, reference_errors=ref)
        if cached is not None and ref is None:
            cached.append((terms.ref_w, terms.ref_l))
        terms_all.append(terms)
    terms = DPOTerms(*(torch.cat([getattr(t, k) for t in terms_all]) for k in DPOTerms._fields))
    p = windows.p[chosen].to(dev)
    loss = preference_nll(terms.z, p).mean()
    out = dpo_metrics(terms, p, beta)
    low, high = wilson_interval(out["implicit_acc"], out["strict_pairs"])
    out.update(dpo=float(loss), pairs=len(windows), pairs_evaluated=len(chosen), implicit_acc_low=low,
               implicit_acc_high=high)
    return out


def pairs_from_labels(items: Sequence[tuple[Segment, Segment, float | None]]) -> list[WinnerFirstPair]:
    """``(left, right, p_left)`` labels -> winner-first pairs, skips dropped."""
    return [wf for wf in (to_winner_first(l, r, p) for l, r, p in items) if wf is not None]


def _decay_lr(opt: torch.optim.Optimizer, sched, k: float, acc: float) -> float:
    """Set this step's learning rate to the schedule's times exp(−k·max(acc − 0.5, 0))
    (the released code's accuracy-based decay; the schedule's ``step`` resets it after
    the update, so the factor never compounds). Returns the rate used."""
    factor = math.exp(-k * max(acc - 0.5, 0.0)) if k > 0 and math.isfinite(acc) else 1.0
    for group, lr in zip(opt.param_groups, sched.get_last_lr()):
        group["lr"] = lr * factor
    return float(opt.param_groups[0]["lr"])


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    """NaN -> None so the JSON is strict."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _same(a: DiffusionPolicy, b: DiffusionPolicy) -> bool:
    return (to_json_dict(a.cfg) == to_json_dict(b.cfg)
            and a.obs_normalizer.state_dict() == b.obs_normalizer.state_dict()
            and a.action_normalizer.state_dict() == b.action_normalizer.state_dict())


def align(cfg: AlignConfig, pairs: Sequence[WinnerFirstPair] | None = None, progress: bool = True,
          task_id: str | None = None, on_step: Callable[[int, int], None] | None = None) -> AlignResult:
    """Run one alignment round and save the new policy version.

    Args:
        cfg: the round's config; ``cfg.checkpoint`` (REF) is required.
        pairs: winner-first pairs ``(σ_w, σ_l, p)``; when None they are read from
            ``cfg.prefs`` and converted with :func:`fkpd.prefs.teachers.to_winner_first`.
        progress: show a tqdm bar with loss and implicit accuracy.
        task_id: the preferences' task, checked against REF's when given.
        on_step: called after every optimiser step with ``(steps done, cfg.steps)``. An
            exception it raises stops the round and propagates; nothing is saved (the
            checkpoint is written only at the end).

    Returns:
        :class:`AlignResult`.

    Raises:
        ConfigError: no REF, an output that would overwrite the parent or REF, or no
            dataset for ``forward``.
        CheckpointError: REF or ``init`` missing/corrupt, for another task than the
            preferences, or with another architecture/normalisers than REF.
        PreferenceError: missing preferences or segment files, an empty preference
            set, segments of the wrong size.
        DatasetError: a bad offline dataset.
        TrainingError: a NaN/inf loss; nothing is written, the parent is untouched.
    """
    if not cfg.checkpoint:
        raise ConfigError("no reference checkpoint given: pass --checkpoint REF (the BC policy)")
    ref_meta = read_checkpoint_meta(cfg.checkpoint)
    task = ref_meta.get("task_id")
    if pairs is None:
        if not cfg.prefs:
            raise ConfigError("no preferences given: pass --prefs FILE (an fkpd-prefs/1 JSON file)")
        prefs_task, items = load_preferences(cfg.prefs)
        task_id = task_id or prefs_task
        pairs = pairs_from_labels(items)
    seg_tasks = sorted({s.task_id for item in pairs for s in item[:2] if getattr(s, "task_id", "")})
    if len(seg_tasks) > 1:
        raise PreferenceError(f"the preference segments come from several tasks {seg_tasks}; align one task at a time")
    task_id = task_id or (seg_tasks[0] if seg_tasks else None)
    if task_id is not None and task_id != task:
        raise CheckpointError(
            f"reference checkpoint {cfg.checkpoint!r} is for task {task!r} but the preferences are for "
            f"{task_id!r}; use the BC checkpoint of {task_id}")
    if not pairs:
        raise PreferenceError("no trainable preference pairs (empty set, or only skips); label some pairs "
                              "left/right/equal first")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    init = cfg.init or cfg.checkpoint
    reference = DiffusionPolicy.load(cfg.checkpoint, device=device).requires_grad_(False).eval()
    policy = DiffusionPolicy.load(init, task_id=task, device=device)
    if not _same(policy, reference):
        raise CheckpointError(f"--init {init!r} has another architecture or normalisers than the reference "
                              f"{cfg.checkpoint!r}; start from REF or from a version aligned from it")
    parent_meta = policy.checkpoint_meta
    round_ = cfg.round if cfg.round >= 0 else int(parent_meta.get("round", 0) or 0) + 1
    out = Path(cfg.out_dir or Path("runs") / "align" / str(task).replace("/", "_") / f"round{round_}")
    ckpt_dir = out / "checkpoint"
    for what, path in (("parent (--init)", init), ("reference (--checkpoint)", cfg.checkpoint)):
        if ckpt_dir.resolve() == checkpoint_dir(path).resolve():
            raise ConfigError(f"--out-dir {str(out)!r} would overwrite the {what} checkpoint {path!r}; "
                              "choose another output directory")
    windows = PairWindows(pairs, reference, task_id=task)
    sampler = None
    dataset = cfg.dataset or ref_meta.get("dataset") or ""
    needs_data = ((cfg.objective == "additive" and cfg.regularizer == "forward" and cfg.lam > 0)
                  or (cfg.objective == "in_sigmoid" and cfg.bc_source == "dataset" and cfg.c_bc > 0))
    if needs_data:
        if not dataset:
            what = "regularizer 'forward'" if cfg.objective == "additive" else "objective 'in_sigmoid' (--bc-source dataset)"
            raise ConfigError(f"{what} needs the offline dataset: pass --dataset FILE")
        if not names_a_dataset(dataset):
            source = "--dataset" if cfg.dataset else "the dataset recorded in the reference checkpoint"
            raise ConfigError(f"{source} {dataset!r} does not exist here; pass --dataset FILE (the offline data "
                              "the reference was cloned from)")
        ds = load_dataset(dataset, task_id=task)
        sampler = WindowSampler(ds, reference.cfg.n_obs_steps, reference.cfg.horizon,
                                reference.obs_normalizer, reference.action_normalizer)

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    ref_cache: dict = {}  # m_ref of the evaluated pairs, the same before and after (frozen reference, same draw)
    before = evaluate_pairs(policy, reference, windows, cfg.beta, seed=cfg.seed, sample=cfg.eval_pairs,
                            reference_cache=ref_cache)
    opt = torch.optim.AdamW(policy.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_constant_schedule_with_warmup(opt, cfg.warmup_steps)
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / "config.json", {"align": to_json_dict(cfg), "task_id": task, "pairs": len(windows),
                                    "init": str(init), "round": round_})
    policy.train()
    history: list[dict[str, float]] = []
    acc: dict[str, list[float]] = {}
    bar = tqdm(range(cfg.steps), desc=f"align r{round_} {cfg.regularizer}", unit="step", disable=not progress)
    t0 = time.time()
    last: dict[str, float] = {}
    with (out / "metrics.jsonl").open("w") as log, RunLog(out / "tb", "align",
                                                          wandb_namespace=f"align_r{round_}") as tb:
        tb.log(before, 0, prefix="pairs/")
        for step in bar:
            idx = torch.randint(0, len(windows), (min(cfg.batch_pairs, len(windows)),), generator=gen)
            batch = windows.batch(idx).to(device)
            bc_batch = states = None
            if sampler is not None:
                bo, ba = sampler.sample(cfg.bc_batch_size, generator=gen)
                bc_batch = (bo.to(device), ba.to(device))
            if cfg.objective == "additive" and cfg.regularizer == "reverse" and cfg.lam > 0:
                states = windows.states(cfg.reverse_states, generator=gen).to(device)
            loss, m = alignment_loss(policy, reference, batch, cfg.beta, cfg.regularizer, cfg.lam,
                                     bc_batch=bc_batch, states=states, generator=gen, objective=cfg.objective,
                                     c_bc=cfg.c_bc, loser_weight=cfg.loser_weight,
                                     with_reference=cfg.with_reference, bc_source=cfg.bc_source)
            m["lr"] = _decay_lr(opt, sched, cfg.acc_lr_decay, m.get("implicit_acc", float("nan")))
            m["grad_norm"] = optimizer_step(
                loss, policy.net, opt, sched, cfg.grad_clip, step, "alignment",
                f"The parent checkpoint {str(init)!r} is untouched. Lower --beta or --lr, or check the preferences.")
            for k, v in m.items():
                if isinstance(v, float) and math.isfinite(v):
                    acc.setdefault(k, []).append(v)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                last = {k: float(np.mean(v)) for k, v in acc.items()}
                last.update(step=done, steps_per_s=done / max(time.time() - t0, 1e-9))
                acc = {}
                history.append(last)
                log.write(json.dumps(_clean(last)) + "\n")
                log.flush()
                tb.log(last, done)
                bar.set_postfix(loss=f"{last['loss']:.3f}", dpo=f"{last['dpo']:.3f}",
                                acc=f"{last.get('implicit_acc', float('nan')):.2f}")
            if on_step is not None:
                on_step(done, cfg.steps)
        steps_per_s = cfg.steps / max(time.time() - t0, 1e-9)
        policy.eval()
        after = evaluate_pairs(policy, reference, windows, cfg.beta, seed=cfg.seed, sample=cfg.eval_pairs,
                               reference_cache=ref_cache)
        tb.log(after, cfg.steps, prefix="pairs/")
    if not math.isfinite(after["dpo"]):
        raise TrainingError(f"the aligned policy gives a non-finite DPO loss on the training pairs; stopped without "
                            f"saving. The parent checkpoint {str(init)!r} is untouched. Lower --beta or --lr.")
    policy.save(ckpt_dir, extra={
        "kind": "align", "objective": cfg.objective, "regularizer": cfg.regularizer, "parent": str(init), "reference": str(cfg.checkpoint),
        "round": round_, "dataset": str(dataset), "pairs": len(windows), "align": to_json_dict(cfg),
        "metrics": {"train": _clean(last), "pairs_before": _clean(before), "pairs_after": _clean(after),
                    "steps_per_s": steps_per_s}})
    return AlignResult(ckpt_dir, last, before, after, steps_per_s, history)
