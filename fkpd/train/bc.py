"""Stage 1 of FKPD: behaviour cloning of a diffusion policy on an offline dataset.

L_BC(θ) = E_{(s,a)~D, t, ε} ‖ε − ε_θ(x_t, s, t)‖² (DESIGN.md §2), optimised with AdamW,
a cosine learning-rate schedule with warm-up (``diffusers.optimization``), gradient
clipping and EMA weights (``diffusers.training_utils.EMAModel`` with warm-up, as in
Chi et al.'s diffusion_policy). The EMA weights are what the checkpoint serves.

Output directory layout::

    OUT/checkpoint/   model.safetensors + config.json   (policy, EMA weights)
    OUT/train_state/  state.safetensors + state.json     (for --resume)
    OUT/metrics.jsonl                                    (one JSON line per log point)
    OUT/tb/                                              (the same as TensorBoard events, fkpd.train.tracking)
    OUT/config.json                                      (the resolved BCConfig)
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from fkpd.config import from_json_dict, save_json, to_json_dict
from fkpd.data import WindowSampler, load_dataset
from fkpd.envs import get_task
from fkpd.errors import CheckpointError, ConfigError, FKPDError
from fkpd.policy import DiffusionPolicy, PolicyConfig, pick_device
from fkpd.train.tracking import RunLog


class TrainingError(FKPDError, RuntimeError):
    """Training diverged (NaN/inf loss); the last good checkpoint is left untouched."""


@dataclass
class BCConfig:
    """Behaviour-cloning run. Every field is also a ``fkpd train-bc`` flag."""

    task: str = field(default="metaworld/door-open-v3", metadata={"help": "task id"})
    dataset: str = field(default="", metadata={"help": "D4RL-layout HDF5 file, D4RL dataset name (looked up in "
                                                       "D4RL's cache directory) or minari:DATASET_ID; D4RL "
                                                       "locomotion tasks default to their own dataset"})
    out_dir: str = field(default="", metadata={"help": "output directory (default runs/bc/<task>)"})
    steps: int = field(default=4000, metadata={"help": "gradient steps"})
    batch_size: int = field(default=256, metadata={"help": "windows per batch"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=1e-6, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=200, metadata={"help": "linear warm-up steps"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm"})
    ema_decay: float = field(default=0.999, metadata={"help": "max EMA decay"})
    ema_power: float = field(default=0.75, metadata={"help": "EMA warm-up power"})
    seed: int = field(default=0, metadata={"help": "seed for init, batches and noise"})
    device: str = field(default="auto", metadata={"help": "auto (cuda, mps, cpu), or a torch device"})
    log_every: int = field(default=100, metadata={"help": "steps between metric log lines"})
    save_every: int = field(default=1000, metadata={"help": "steps between checkpoints"})
    eval_every: int = field(default=2000, metadata={"help": "steps between evaluations (0: never)"})
    eval_episodes: int = field(default=10, metadata={"help": "episodes per periodic evaluation"})
    resume: bool = field(default=True, metadata={"help": "resume from OUT/train_state when present"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch default)"})

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "save_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"BCConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.lr <= 0:
            raise ConfigError(f"BCConfig.lr must be > 0, got {self.lr!r}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"BCConfig.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not self.out_dir:
            self.out_dir = str(Path("runs") / "bc" / self.task.replace("/", "_"))


def optimizer_step(loss: torch.Tensor, net: torch.nn.Module, opt: torch.optim.Optimizer, sched, grad_clip: float,
                   step: int, what: str, advice: str) -> float:
    """One guarded optimiser step shared by BC and alignment training.

    Stops before touching the weights when the loss is NaN/inf, so nothing diverged is
    ever saved; otherwise backward, gradient-norm clipping, optimiser and LR-schedule step.

    Args:
        loss: scalar loss of this step.
        net: the trained module (its parameters are clipped).
        step: 0-based step index, for the error message.
        what: the loss's name in the message (e.g. ``BC``).
        advice: what is untouched and what to try, appended to the message.

    Returns:
        The gradient norm before clipping.

    Raises:
        TrainingError: when ``loss`` is not finite.
    """
    if not torch.isfinite(loss):
        raise TrainingError(f"{what} loss became {loss.item()} at step {step}; stopped without saving. {advice}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    opt.step()
    sched.step()
    return float(grad_norm)


def _save_train_state(path: Path, net: torch.nn.Module, ema: EMAModel, opt: torch.optim.Optimizer,
                      sched, step: int, gen: torch.Generator) -> None:
    """Everything needed to resume, as safetensors + JSON (no pickles)."""
    tensors: dict[str, torch.Tensor] = {}
    for k, v in net.state_dict().items():
        tensors[f"net.{k}"] = v.detach().cpu().contiguous()
    ema_state = ema.state_dict()
    for i, p in enumerate(ema_state.pop("shadow_params")):
        tensors[f"ema.{i}"] = p.detach().cpu().contiguous()
    opt_state = opt.state_dict()
    for idx, st in opt_state["state"].items():
        for k, v in st.items():
            tensors[f"opt.{idx}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    tensors["rng"] = gen.get_state()
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp / "state.safetensors"))
    meta = {"step": step, "ema": {k: v for k, v in ema_state.items() if not isinstance(v, torch.Tensor)},
            "opt_param_groups": opt_state["param_groups"], "lr_scheduler": sched.state_dict()}
    save_json(tmp / "state.json", meta)
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.replace(path)


def _load_train_state(path: Path, net, ema: EMAModel, opt, sched, gen: torch.Generator) -> int:
    try:
        tensors = load_file(str(path / "state.safetensors"))
        meta = json.loads((path / "state.json").read_text())
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        n_ema = len([k for k in tensors if k.startswith("ema.")])
        ema_state = dict(meta["ema"])
        ema_state["shadow_params"] = [tensors[f"ema.{i}"] for i in range(n_ema)]
        ema.load_state_dict(ema_state)
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, idx, name = k.split(".", 2)
                state.setdefault(int(idx), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": meta["opt_param_groups"]})
        sched.load_state_dict(meta["lr_scheduler"])
        gen.set_state(tensors["rng"])
        return int(meta["step"])
    except Exception as exc:  # noqa: BLE001 - any failure means the state is unusable
        raise CheckpointError(
            f"cannot resume from {str(path)!r} ({type(exc).__name__}: {exc}). The training state is corrupt "
            "or from another configuration; delete that directory or pass --resume false.") from exc


def train_bc(cfg: BCConfig, policy_cfg: PolicyConfig | None = None, progress: bool = True,
             on_step: Callable[[int, int], None] | None = None) -> Path:
    """Train a diffusion policy by behaviour cloning; returns the checkpoint directory.

    Args:
        cfg: run config (dataset, steps, optimiser, output directory, ...).
        policy_cfg: architecture; ``obs_dim``/``action_dim`` are taken from the task.
        progress: show a tqdm bar with the loss.
        on_step: called after every optimiser step with ``(steps done, cfg.steps)``. An
            exception it raises stops training and propagates; the last saved
            checkpoint and resume state (every ``save_every`` steps) stay as they were,
            so a later call resumes from them.

    Raises:
        DatasetError: bad dataset (see :func:`fkpd.data.load_dataset`).
        UnknownTaskError: unknown task id.
        CheckpointError: unusable resume state.
        TrainingError: NaN/inf loss; the previous checkpoint stays as it was.
    """
    spec = get_task(cfg.task)
    if not cfg.dataset:  # a locomotion task's own D4RL dataset, from D4RL's cache directory ("" otherwise)
        cfg = dataclasses.replace(cfg, dataset=spec.own_dataset)
    if not cfg.dataset:
        raise ConfigError("no dataset given: pass --dataset FILE (make one with `fkpd data generate`)")
    ds = load_dataset(cfg.dataset, task_id=cfg.task)
    policy_cfg = policy_cfg or PolicyConfig()
    policy_cfg = from_json_dict(PolicyConfig, {**to_json_dict(policy_cfg), "obs_dim": spec.obs_dim,
                                               "action_dim": spec.action_dim})
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sampler = WindowSampler(ds, policy_cfg.n_obs_steps, policy_cfg.horizon)
    policy = DiffusionPolicy(policy_cfg, sampler.obs_normalizer, sampler.action_normalizer, task_id=cfg.task).to(device)
    opt = torch.optim.AdamW(policy.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps)
    ema = EMAModel(policy.net.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=cfg.ema_power,
                   foreach=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    state_dir = out / "train_state"
    ckpt_dir = out / "checkpoint"
    start = 0
    if cfg.resume and state_dir.exists():
        start = _load_train_state(state_dir, policy.net, ema, opt, sched, gen)
    run_meta = {"train": to_json_dict(cfg), "policy": to_json_dict(policy_cfg), "dataset_steps": len(ds.actions),
                "dataset_episodes": ds.num_episodes}
    save_json(out / "config.json", run_meta)

    def checkpoint(step: int, metrics: dict[str, Any]) -> None:
        ema.store(policy.net.parameters())
        ema.copy_to(policy.net.parameters())
        policy.save(ckpt_dir, extra={"kind": "bc", "parent": None, "round": 0, "step": step,
                                     "dataset": str(cfg.dataset), "train": to_json_dict(cfg), "metrics": metrics})
        ema.restore(policy.net.parameters())
        _save_train_state(state_dir, policy.net, ema, opt, sched, step, gen)

    if start >= cfg.steps:
        if not ckpt_dir.exists():
            checkpoint(start, {})
        return ckpt_dir
    policy.train()
    with (out / "metrics.jsonl").open("a") as log, RunLog(out / "tb", "bc", purge_step=start) as tb:
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train-bc", unit="step",
                   disable=not progress)
        t0, running = time.time(), None
        metrics: dict[str, Any] = {}
        for step in bar:
            obs, act = sampler.sample(cfg.batch_size, generator=gen)
            obs, act = obs.to(device), act.to(device)
            loss = policy.compute_loss(obs, act, generator=gen)
            grad_norm = optimizer_step(
                loss, policy.net, opt, sched, cfg.grad_clip, step, "BC",
                f"The last good checkpoint in {str(ckpt_dir)!r} is untouched. Lower --lr or check the dataset.")
            ema.step(policy.net.parameters())
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            bar.set_postfix(loss=f"{running:.4f}")
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                metrics = {"step": done, "loss": running, "grad_norm": grad_norm, "lr": sched.get_last_lr()[0],
                           "steps_per_s": (done - start) / max(time.time() - t0, 1e-9)}
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                tb.log(metrics, done)
            if done % cfg.save_every == 0 or done == cfg.steps:
                checkpoint(done, metrics)
            if cfg.eval_every and cfg.eval_episodes and done % cfg.eval_every == 0 and done != cfg.steps:
                from fkpd.policy.rollout import evaluate

                if done % cfg.save_every != 0:
                    checkpoint(done, metrics)
                res = evaluate(ckpt_dir, episodes=cfg.eval_episodes, progress=False)
                ev = {"step": done, "eval/success_rate": res.success_rate, "eval/mean_return": res.mean_return}
                log.write(json.dumps(ev) + "\n")
                log.flush()
                tb.log(ev, done)
                bar.write(f"step {done}: {res.format()}")
                policy.train()
            if on_step is not None:
                on_step(done, cfg.steps)
    return ckpt_dir
