"""The round engine: one alignment round, for the headless loop and the app's worker.

DESIGN.md §5: a round is *make pairs from a policy version → get labels → align on all
labels so far → evaluate → register*. :class:`RoundEngine` is its only
implementation; ``fkpd loop`` (:func:`fkpd.train.loop.run_loop`, scripted teacher) and
the worker's ``alignment_round`` / ``bootstrap`` jobs (:mod:`fkpd.studio.alignment`,
:mod:`fkpd.studio.bootstrap`, people through the preference store) both call it,
with their own pair source, labeller and registration:

==========================  =========================================  ==================================
step                        engine                                     supplied by the caller
==========================  =========================================  ==================================
pairs of round r            :meth:`RoundEngine.make_batch`             :class:`~fkpd.prefs.pairs.PairSource`
labels                      ``labeller.request`` / ``labeller.labels`` :class:`~fkpd.prefs.labellers.Labeller`
alignment                   :meth:`RoundEngine.run_round`              base :class:`~fkpd.train.align.AlignConfig`
evaluation                  :meth:`RoundEngine.run_round`              :class:`~fkpd.train.evaluate.Evaluator`
registration                ``register(result)`` callback              loop: a row; worker: a store version
==========================  =========================================  ==================================

Seed rules (the same for both callers): the pairs of round r come from
:meth:`fkpd.prefs.pairs.PairPlan.for_round` ``(seed, r, ...)``; round r aligns with
seed ``1000·seed + r`` (:meth:`RoundEngine.align_config`); evaluation uses the
evaluation reset seeds with noise seeded by ``seed``.

The pairs of round r are made from version r−1 at the end of round r−1 (or after BC,
for round 1), so the app can show them while people label; the loop does the same, so
its order of work is the app's.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fkpd.policy import DiffusionPolicy
from fkpd.prefs.labellers import Labeller
from fkpd.prefs.pairs import ClipSink, PairSource
from fkpd.prefs.segments import PreferenceError, Segment
from fkpd.train.align import AlignConfig, AlignResult, WinnerFirstPair, align, pairs_from_labels
from fkpd.train.evaluate import Evaluator, compare_with_parent


class NoLabelsError(PreferenceError):
    """A round was asked to train with no trainable label (none yet, or only skips)."""


def round_seed(seed: int, round_: int) -> int:
    """Alignment seed of round ``round_`` of a run seeded with ``seed``: ``1000·seed + r``."""
    return 1000 * int(seed) + int(round_)


@dataclass
class RoundResult:
    """What one round produced.

    Attributes:
        round: r (>= 1).
        checkpoint: the new checkpoint directory (π_r).
        policy: π_r, loaded.
        alignment: the trainer's :class:`~fkpd.train.align.AlignResult` (implicit
            accuracy before/after on all training pairs, training metrics, steps/s).
        evaluation: :class:`~fkpd.train.evaluate.Evaluator` output for π_r.
        labels_used: comparisons read (skips included).
        trained_pairs: winner-first pairs trained on (skips dropped).
        config: the round's resolved :class:`~fkpd.train.align.AlignConfig`.
        align_s, eval_s: wall seconds of alignment and evaluation.
        comparison: :func:`fkpd.train.evaluate.compare_with_parent` of π_r against its
            parent on the same evaluation seeds (None without the parent's evaluation);
            ``comparison["worse"]`` flags a round that undid its parent's gains.
        registered: what the ``register`` callback returned (e.g. a store version).
    """

    round: int
    checkpoint: Path
    policy: DiffusionPolicy
    alignment: AlignResult
    evaluation: dict[str, Any]
    labels_used: int
    trained_pairs: int
    config: AlignConfig
    align_s: float
    eval_s: float
    comparison: dict[str, Any] | None = None
    registered: Any = None


class RoundEngine:
    """Runs alignment rounds for one task, reference policy and dataset.

    Args:
        task_id: the task (checked against the checkpoints' by the trainer).
        reference: π_ref's checkpoint directory (the frozen BC policy, version 0).
        dataset: the offline dataset of the forward-KL term, as named (a file, a D4RL
            name or ``minari:ID``).
        seed: the run's seed (see the module docstring).
        source: makes the pairs of each round.
        labeller: labels them.
        evaluator: evaluates each new version.
        align_cfg: the alignment settings of every round (``regularizer``, ``beta``,
            ``lam``, ``steps``, ...); the engine sets ``checkpoint``, ``init``,
            ``prefs``, ``out_dir``, ``dataset``, ``round`` and ``seed``. Only
            :meth:`run_round` needs it.
    """

    def __init__(self, task_id: str, reference: Path | str, dataset: str, seed: int, source: PairSource,
                 labeller: Labeller, evaluator: Evaluator, align_cfg: AlignConfig | None = None) -> None:
        self.task_id, self.reference, self.dataset, self.seed = task_id, Path(reference), str(dataset), int(seed)
        self.source, self.labeller, self.evaluator, self.align_cfg = source, labeller, evaluator, align_cfg

    def make_batch(self, policy: DiffusionPolicy, round_: int, *, on_clip: ClipSink | None = None,
                   progress: Callable[[int, int], None] | None = None) -> list[tuple[Segment, Segment]]:
        """Make the pairs of round ``round_`` with ``policy`` (version ``round_ − 1``) and
        hand them to the labeller.

        Args:
            policy: the version the pairs are made from.
            round_: the round they will be labelled for.
            on_clip: optional writer of each clip's files.
            progress: optional ``(clips done, clips in all)`` callback.

        Returns:
            The pairs, ``[(left, right), ...]``.
        """
        pairs = self.source.make_pairs(policy, round_, on_clip=on_clip, progress=progress)
        self.labeller.request(round_, pairs)
        return pairs

    def training_pairs(self) -> tuple[list[WinnerFirstPair], int]:
        """Every label so far as winner-first pairs (skips dropped), and the number of
        labels they came from."""
        labels = self.labeller.labels()
        return pairs_from_labels(labels), len(labels)

    def align_config(self, round_: int, parent: Path | str, out_dir: Path | str) -> AlignConfig:
        """The resolved :class:`AlignConfig` of round ``round_``.

        Raises:
            ValueError: the engine has no ``align_cfg``.
        """
        if self.align_cfg is None:
            raise ValueError("this RoundEngine was built without align_cfg; it can make batches but not train")
        return dataclasses.replace(self.align_cfg, checkpoint=str(self.reference), init=str(parent), prefs="",
                                   out_dir=str(out_dir), dataset=self.dataset, round=int(round_),
                                   seed=round_seed(self.seed, round_))

    def run_round(self, round_: int, parent: Path | str, out_dir: Path | str, *,
                  register: Callable[[RoundResult], Any] | None = None, progress: bool = False,
                  on_step: Callable[[int, int], None] | None = None,
                  on_start: Callable[[int, int], None] | None = None,
                  eval_progress: Callable[[float, str], None] | None = None,
                  parent_evaluation: dict[str, Any] | None = None) -> RoundResult:
        """Align π_{r−1} on all labels so far, evaluate π_r, register it.

        Args:
            round_: r (>= 1).
            parent: π_{r−1}'s checkpoint directory (the reference in round 1).
            out_dir: where the trainer writes π_r (a new directory).
            register: called with the result after evaluation; its return value is
                ``RoundResult.registered``. An exception it raises leaves π_r
                unregistered.
            progress: tqdm bars in the trainer.
            on_step: the trainer's per-step callback ``(done, total)``; an exception it
                raises stops the round before anything is saved.
            on_start: called with ``(trained pairs, labels)`` once the labels are read.
            eval_progress: ``(fraction, message)`` callback of the evaluation.
            parent_evaluation: π_{r−1}'s evaluation (same evaluator, same seeds), for
                the paired comparison ``RoundResult.comparison``.

        Returns:
            :class:`RoundResult`.

        Raises:
            NoLabelsError: no trainable label yet.
            FKPDError: from the trainer (``TrainingError`` on a NaN loss: nothing is
                saved, the parent is untouched), checkpoints or evaluation.
        """
        pairs, n_labels = self.training_pairs()
        if not pairs:
            raise NoLabelsError(f"no trainable labels for round {round_} ({n_labels} labels, all skips or none); "
                                "label some pairs left/right/equal first")
        if on_start is not None:
            on_start(len(pairs), n_labels)
        cfg = self.align_config(round_, parent, out_dir)
        t0 = time.time()
        alignment = align(cfg, pairs, progress=progress, task_id=self.task_id, on_step=on_step)
        align_s = time.time() - t0
        policy = DiffusionPolicy.load(alignment.checkpoint, task_id=self.task_id)
        t0 = time.time()
        evaluation = self.evaluator(policy, progress=eval_progress)
        result = RoundResult(round_, alignment.checkpoint, policy, alignment, evaluation, n_labels, len(pairs), cfg,
                             align_s, time.time() - t0, compare_with_parent(evaluation, parent_evaluation))
        if register is not None:
            result.registered = register(result)
        return result
