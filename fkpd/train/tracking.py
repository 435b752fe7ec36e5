"""Training metrics where researchers read them: TensorBoard event files, and Weights & Biases.

Every run writes TensorBoard event files into its own output folder, next to its
``metrics.jsonl`` (``tensorboard --logdir runs/`` shows them all):

====================  ===========================  ===========================================
run                   folder                       scalars (tag, x axis)
====================  ===========================  ===========================================
``fkpd train-bc``     ``OUT/tb/``                  ``bc/loss``, ``bc/grad_norm``, ``bc/lr``,
                                                   ``bc/steps_per_s``, ``bc/eval/success_rate``,
                                                   ``bc/eval/mean_return`` (gradient step)
``fkpd align``        ``OUT/tb/``                  ``align/loss``, ``align/dpo``, ``align/reg``,
                                                   ``align/implicit_acc``, ``align/lr``, ... and
                                                   ``align/pairs/implicit_acc``, ``align/pairs/dpo``
                                                   on all pairs before (step 0) and after (gradient step)
``fkpd loop``         ``OUT/tb/``                  ``loop/success_rate``, ``loop/success_ci95_low``,
                                                   ``loop/success_ci95_high``, ``loop/mean_return``,
                                                   ``loop/implicit_acc``, ``loop/implicit_acc_new``,
                                                   ``loop/ood_action_dist``, ``loop/intent_score``,
                                                   ``loop/labels``, ... (round; round 0 is BC)
                      ``OUT/bc/tb/``,              its BC and each round's alignment, as above
                      ``OUT/round<r>/align/tb/``
====================  ===========================  ===========================================

Weights & Biases is optional (``wandb`` is not a requirement): :func:`wandb_run`, used by
the commands' ``--wandb``, starts one W&B run for the command, and every
:class:`RunLog` opened meanwhile logs to it too, each under its own prefix with its own
x axis (``bc/step``; ``align_r<r>/step`` for round r's alignment; ``loop/round``).
``--wandb-mode offline`` writes the run under ``OUT/wandb/`` without any network
access (``wandb sync`` uploads it later).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from fkpd.errors import ConfigError

log = logging.getLogger(__name__)

_WANDB: contextvars.ContextVar[Any] = contextvars.ContextVar("fkpd_wandb_run", default=None)
WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class TrackingConfig:
    """Where a command's metrics go besides ``OUT/tb/``. Every field is also a flag."""

    wandb: bool = field(default=False, metadata={"help": "also log to Weights & Biases (needs the wandb package)"})
    wandb_project: str = field(default="fkpd", metadata={"help": "W&B project"})
    wandb_mode: str = field(default="", metadata={"help": "W&B mode: online, offline (no network; `wandb sync` "
                                                          "later) or disabled; default $WANDB_MODE, else online"})
    wandb_name: str = field(default="", metadata={"help": "W&B run name (default: the output folder's name)"})

    def __post_init__(self) -> None:
        if self.wandb_mode and self.wandb_mode not in WANDB_MODES:
            raise ConfigError(f"--wandb-mode must be one of {', '.join(WANDB_MODES)}, got {self.wandb_mode!r}")


def _finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite real number (bools and NaN are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
            hasattr(value, "item") and type(value).__module__ == "numpy"):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of ``metrics`` (NaN, bools, strings, lists and mappings left
    out); an interval ``k_ci95 = (lo, hi)`` becomes ``k_ci95_low`` and ``k_ci95_high``."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key.endswith("ci95") and isinstance(value, (list, tuple)) and len(value) == 2:
            for suffix, v in zip(("low", "high"), value):
                if (f := _finite(v)) is not None:
                    out[f"{key}_{suffix}"] = f
        elif (f := _finite(value)) is not None:
            out[key] = f
    return out


def _summary_writer(log_dir: Path, purge_step: int | None) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``log_dir``, or None (with a
    warning) when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # requirements.txt installs it; a hand-made venv may lack it
        log.warning("no TensorBoard event files for %s: %s (pip install tensorboard)", log_dir, exc)
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, flush_secs=30)


class RunLog:
    """Scalars of one run: TensorBoard event files under ``log_dir``, and the active W&B
    run (:func:`wandb_run`) when there is one.

    Args:
        log_dir: the run's ``OUT/tb`` folder (created).
        namespace: tag prefix (``bc``, ``align``, ``loop``).
        wandb_namespace: the prefix in W&B, where several runs share one W&B run
            (default ``namespace``; ``align_r2`` for round 2's alignment).
        purge_step: a resumed run's first step: TensorBoard hides what an earlier,
            interrupted run logged from there on.

    Use as a context manager (or call :meth:`close`).
    """

    def __init__(self, log_dir: Path | str, namespace: str, *, wandb_namespace: str | None = None,
                 purge_step: int | None = None) -> None:
        self.namespace = namespace
        self.log_dir = Path(log_dir)
        self._tb = _summary_writer(self.log_dir, purge_step or None)
        self._wandb = _WANDB.get()
        self._wandb_ns = wandb_namespace or namespace
        self._x = "round" if namespace == "loop" else "step"
        if self._wandb is not None:
            self._wandb.define_metric(f"{self._wandb_ns}/{self._x}")
            self._wandb.define_metric(f"{self._wandb_ns}/*", step_metric=f"{self._wandb_ns}/{self._x}")

    def log(self, metrics: Mapping[str, Any], step: int, prefix: str = "") -> None:
        """Log the finite numbers of ``metrics`` (:func:`scalars`) at ``step``, as tags
        ``<namespace>/<prefix><key>``."""
        values = {f"{prefix}{k}": v for k, v in scalars(metrics).items() if k not in ("step", "round", "parent_round")}
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(f"{self.namespace}/{key}", value, int(step))
        if self._wandb is not None and values:
            self._wandb.log({f"{self._wandb_ns}/{k}": v for k, v in values.items()}
                            | {f"{self._wandb_ns}/{self._x}": int(step)})

    def flush(self) -> None:
        """Write what is buffered to the event file now."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close the event file (the W&B run stays open for its owner)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def wandb_run(cfg: TrackingConfig, out_dir: Path | str | None, config: Mapping[str, Any] | None = None,
              job_type: str = "") -> Iterator[Any]:
    """One W&B run for the duration of the block, when ``cfg.wandb``; else nothing.

    Every :class:`RunLog` opened inside the block logs to it. The run's files go to
    ``out_dir/wandb/`` (W&B's default folder when None).

    Args:
        cfg: ``--wandb`` and friends.
        out_dir: the command's output folder.
        config: the resolved config, recorded with the run.
        job_type: ``train-bc``, ``align`` or ``loop``.

    Yields:
        The ``wandb`` run, or None when ``cfg.wandb`` is false.

    Raises:
        ConfigError: ``--wandb`` without the ``wandb`` package installed.
    """
    if not cfg.wandb:
        yield None
        return
    try:
        import wandb
    except ImportError:
        raise ConfigError("--wandb needs the wandb package (pip install wandb); it is not one of FKPD Studio's "
                          "requirements. TensorBoard event files are written to OUT/tb/ without it") from None
    mode = cfg.wandb_mode or os.environ.get("WANDB_MODE", "").strip() or "online"
    if mode not in WANDB_MODES:
        raise ConfigError(f"WANDB_MODE must be one of {', '.join(WANDB_MODES)}, got {mode!r}")
    directory = None
    if out_dir is not None:
        directory = Path(out_dir)
        directory.mkdir(parents=True, exist_ok=True)
    name = cfg.wandb_name or (directory.name if directory is not None else None)
    run = wandb.init(project=cfg.wandb_project, name=name, dir=str(directory) if directory else None, mode=mode,
                     config=dict(config or {}), job_type=job_type or None, reinit="finish_previous")
    token = _WANDB.set(run)
    try:
        yield run
    finally:
        _WANDB.reset(token)
        run.finish()


__all__ = ["RunLog", "TrackingConfig", "WANDB_MODES", "scalars", "wandb_run"]
