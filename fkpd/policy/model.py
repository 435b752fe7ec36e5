"""Diffusion policy: noise-prediction network, DDPM training, DDIM sampling, checkpoints.

The method side of Chi et al., "Diffusion Policy" (RSS 2023), with a residual-MLP
noise-prediction network in place of the 1-D U-Net (state observations are small),
and the small policy API of LeRobot's ``DiffusionPolicy``: :meth:`DiffusionPolicy.reset`,
:meth:`~DiffusionPolicy.select_action`, :meth:`~DiffusionPolicy.predict_action_chunk`
and :meth:`~DiffusionPolicy.compute_loss`.

Noise schedules come from ``diffusers`` (``DDPMScheduler`` adds training noise,
``DDIMScheduler`` samples), both built from the same config so ᾱ_t agree.

Shapes use DESIGN.md letters: B batch, To observation history, Ta action horizon
(length of a predicted chunk), Do/Da observation/action dims. Observations and actions
inside the network are normalised to ``[-1, 1]`` by the policy's own
:class:`~fkpd.data.Normalizer`; the public methods take and return raw values.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from fkpd.config import from_json_dict, save_json, to_json_dict
from fkpd.data import Normalizer
from fkpd.errors import CheckpointError, ConfigError

CHECKPOINT_FORMAT = "fkpd-policy/1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def pick_device(preference: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; anything else is passed to ``torch.device``.

    Raises:
        ConfigError: when the requested device is not available here.
    """
    if preference in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(preference)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {preference!r} asked for CUDA but no CUDA GPU is visible; use --device auto or cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {preference!r} asked for MPS but it is not available; use --device auto or cpu")
    return dev


@dataclass
class PolicyConfig:
    """Architecture and diffusion settings of a :class:`DiffusionPolicy`.

    Every field is validated in ``__post_init__``; errors print the bad value.
    """

    obs_dim: int = field(default=39, metadata={"help": "Do, observation size"})
    action_dim: int = field(default=4, metadata={"help": "Da, action size"})
    n_obs_steps: int = field(default=2, metadata={"help": "To, observation history length"})
    horizon: int = field(default=16, metadata={"help": "Ta, predicted action-chunk length"})
    n_action_steps: int = field(default=8, metadata={"help": "actions executed per chunk (receding horizon)"})
    hidden_dim: int = field(default=256, metadata={"help": "residual MLP width"})
    n_blocks: int = field(default=2, metadata={"help": "residual blocks"})
    mlp_ratio: int = field(default=2, metadata={"help": "inner width of a block, in multiples of hidden_dim"})
    time_embed_dim: int = field(default=64, metadata={"help": "diffusion-step embedding size"})
    num_train_timesteps: int = field(default=100, metadata={"help": "N, diffusion steps in training"})
    num_inference_steps: int = field(default=10, metadata={"help": "DDIM steps when sampling"})
    beta_schedule: str = field(default="squaredcos_cap_v2", metadata={"help": "diffusers beta schedule (cosine)"})

    def __post_init__(self) -> None:
        for name in ("obs_dim", "action_dim", "n_obs_steps", "horizon", "n_action_steps",
                     "hidden_dim", "n_blocks", "mlp_ratio", "time_embed_dim", "num_train_timesteps", "num_inference_steps"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"PolicyConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.n_action_steps > self.horizon:
            raise ConfigError(
                f"n_action_steps ({self.n_action_steps}) must not exceed horizon ({self.horizon})")
        if self.num_inference_steps > self.num_train_timesteps:
            raise ConfigError(
                f"num_inference_steps ({self.num_inference_steps}) must not exceed "
                f"num_train_timesteps ({self.num_train_timesteps})")


class _ResBlock(nn.Module):
    """Pre-norm residual MLP block with FiLM conditioning (Perez et al., 2018)."""

    def __init__(self, dim: int, cond_dim: int, ratio: int = 1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.film = nn.Linear(cond_dim, 2 * dim)
        self.fc1 = nn.Linear(dim, ratio * dim)
        self.fc2 = nn.Linear(ratio * dim, dim)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """FiLM ``(1 + scale, shift)``, each (B, H), from the conditioning (B, C)."""
        scale, shift = self.film(cond).chunk(2, dim=-1)
        return 1 + scale, shift

    def forward(self, h: torch.Tensor, gain: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        # Functional calls instead of submodule calls: the same maths with less
        # per-op Python overhead, which dominates batch-1 sampling on a CPU.
        y = torch.addcmul(shift, F.layer_norm(h, self.norm.normalized_shape, eps=self.norm.eps), gain)
        y = F.linear(F.mish(F.linear(y, self.fc1.weight, self.fc1.bias)), self.fc2.weight, self.fc2.bias)
        return h + y


def _mlp(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``Linear, Mish, Linear`` of ``seq`` as functional calls (the module calls' result)."""
    first, last = seq[0], seq[2]
    return F.linear(F.mish(F.linear(x, first.weight, first.bias)), last.weight, last.bias)


class NoiseNet(nn.Module):
    """ε_θ(x_t, s, t): residual MLP predicting the noise added to an action chunk.

    The conditioning (observation history and diffusion step) enters additively at the
    input and through FiLM in every block. It is computed by :meth:`condition`
    separately from :meth:`denoise`, so sampling computes it once for all DDIM steps in
    one batched call and each denoising step costs only the residual trunk.

    Args:
        cfg: the :class:`PolicyConfig`.

    Shapes: ``x_t (B, Ta, Da)``, ``obs (B, To, Do)`` normalised, ``t (B,) int`` ->
    ``(B, Ta, Da)``.
    """

    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        e, h = cfg.time_embed_dim, cfg.hidden_dim
        self.time_mlp = nn.Sequential(nn.Linear(e, h), nn.Mish(), nn.Linear(h, h))
        self.obs_mlp = nn.Sequential(nn.Linear(cfg.n_obs_steps * cfg.obs_dim, h), nn.Mish(), nn.Linear(h, h))
        self.inp = nn.Linear(cfg.horizon * cfg.action_dim, h)
        self.blocks = nn.ModuleList(_ResBlock(h, h, cfg.mlp_ratio) for _ in range(cfg.n_blocks))
        self.out_norm = nn.LayerNorm(h)
        self.out = nn.Linear(h, cfg.horizon * cfg.action_dim)
        half = e // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """Sinusoidal embedding of diffusion steps ``t (B,)`` through an MLP -> ``(B, H)``."""
        return self.time_mlp(self.sinusoids(t))

    def condition(self, obs: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Conditioning for ``obs (B, To, Do)``, ``t (B,)``: the input bias (B, H) and
        one FiLM ``(gain, shift)`` pair of (B, H) tensors per block."""
        cond = F.mish(self.obs_mlp(obs.reshape(obs.shape[0], -1)) + self.time_embedding(t))
        return cond, [block.modulation(cond) for block in self.blocks]

    def sinusoids(self, t: torch.Tensor) -> torch.Tensor:
        """The parameter-free part of :meth:`time_embedding`: ``t (K,)`` -> ``(K, E)``."""
        args = t.float()[:, None] * self.freqs[None]
        emb = torch.cat([args.sin(), args.cos()], dim=-1)
        pad = self.cfg.time_embed_dim - emb.shape[-1]
        return F.pad(emb, (0, pad)) if pad else emb

    def denoise(self, x_t: torch.Tensor, cond: torch.Tensor, films: list) -> torch.Tensor:
        """The residual trunk: ``x_t (B, Ta, Da)`` and :meth:`condition` output -> ε (B, Ta, Da)."""
        b = x_t.shape[0]
        h = torch.addmm(cond, x_t.reshape(b, -1), self.inp.weight.t()) + self.inp.bias
        for block, (gain, shift) in zip(self.blocks, films):
            h = block.forward(h, gain, shift)
        h = F.layer_norm(h, self.out_norm.normalized_shape, self.out_norm.weight, self.out_norm.bias, self.out_norm.eps)
        return F.linear(h, self.out.weight, self.out.bias).reshape(b, self.cfg.horizon, self.cfg.action_dim)

    def sampling_steps(self, obs: torch.Tensor, sinusoids: torch.Tensor) -> list[tuple[torch.Tensor, list]]:
        """Per-step conditioning of a sampling chain: every observation at every step.

        The observation MLP runs once on the B histories, the time MLP once on the K
        steps' sinusoids (:meth:`sinusoids`), FiLM once on all K·B rows; the values are
        those of :meth:`condition` on ``obs`` repeated K times (up to float rounding).

        Args:
            obs: (B, To, Do) normalised histories.
            sinusoids: (K, E) from :meth:`sinusoids` of the K diffusion steps.

        Returns:
            K items ``(bias, films)``, one per step, for :meth:`denoise_step`: ``bias``
            (B, H) is the conditioning plus the input layer's bias; ``films`` one
            ``(gain, shift)`` pair per block, each (B, H), or (H,) when B = 1.
        """
        k, b = sinusoids.shape[0], obs.shape[0]
        obs_feat = _mlp(self.obs_mlp, obs.reshape(b, -1))                  # (B, H)
        time_feat = _mlp(self.time_mlp, sinusoids)                         # (K, H)
        cond = F.mish(obs_feat.unsqueeze(0) + time_feat.unsqueeze(1))      # (K, B, H)
        rows = cond.squeeze(1) if b == 1 else cond                         # (K, H) for one row
        films = []
        for block in self.blocks:
            scale, shift = F.linear(rows, block.film.weight, block.film.bias).chunk(2, dim=-1)
            films.append(((1 + scale).unbind(0), shift.unbind(0)))            # as block.modulation
        biases = (cond + self.inp.bias).unbind(0)
        return [(biases[i], [(g[i], s[i]) for g, s in films]) for i in range(k)]

    def trunk_tensors(self) -> tuple:
        """The residual trunk's weights as one tuple for :meth:`denoise_step`, gathered
        once per sampling chain (a module attribute lookup costs about as much as a
        batch-1 op)."""
        blocks = tuple((blk.fc1.weight, blk.fc1.bias, blk.fc2.weight, blk.fc2.bias, blk.norm.eps) for blk in self.blocks)
        return (self.inp.weight.t(), blocks, self.out_norm.normalized_shape, self.out_norm.weight,
                self.out_norm.bias, self.out_norm.eps, self.out.weight, self.out.bias)

    @staticmethod
    def denoise_step(x_t: torch.Tensor, bias: torch.Tensor, films: list, trunk: tuple,
                     x_scale: float = 1.0) -> torch.Tensor:
        """:meth:`denoise` for sampling, on flat chunks: the same maths, fewer ops.

        The input layer's bias is folded into ``bias`` (from :meth:`sampling_steps`);
        the network sees ``x_scale · x_t`` (the scale goes into the input matmul, see
        :func:`ddim_step_scaled`); with one row, FiLM's gain and shift are passed to the
        LayerNorm as its affine parameters (one op instead of two).

        Args:
            x_t: (B, Ta·Da) the (scaled) sample.
            bias, films: one step of :meth:`sampling_steps`.
            trunk: :meth:`trunk_tensors`.
            x_scale: the sample's scale.

        Returns:
            ε (B, Ta·Da).
        """
        inp_wt, blocks, shape, out_norm_w, out_norm_b, out_norm_eps, out_w, out_b = trunk
        h = torch.addmm(bias, x_t, inp_wt, alpha=x_scale)
        for (w1, b1, w2, b2, eps), (gain, shift) in zip(blocks, films):
            if gain.dim() == 1:
                y = torch.layer_norm(h, shape, gain, shift, eps)
            else:
                y = torch.addcmul(shift, torch.layer_norm(h, shape, None, None, eps), gain)
            h = h + F.linear(F.mish(F.linear(y, w1, b1), inplace=True), w2, b2)
        return F.linear(torch.layer_norm(h, shape, out_norm_w, out_norm_b, out_norm_eps), out_w, out_b)

    def forward(self, x_t: torch.Tensor, obs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond, films = self.condition(obs, t)
        return self.denoise(x_t, cond, films)


@dataclass(frozen=True)
class DDIMStep:
    """One deterministic DDIM step (η = 0, ε-prediction) as four numbers.

    Song et al., "Denoising Diffusion Implicit Models" (ICLR 2021), eq. 12 with σ_t = 0,
    as ``diffusers.DDIMScheduler.step`` computes it (x̂_0 clipped to the scheduler's
    ``clip_sample_range`` when ``clip_sample``):

        x̂_0 = clip((x_t − √(1−ᾱ_t)·ε) / √ᾱ_t),   x_prev = √ᾱ_prev·x̂_0 + √(1−ᾱ_prev)·ε,

    written as ``clip((x_t − noise_scale·ε)·x0_scale, ±bound) + direction·ε`` (the clip
    by ±r applied after the factor √ᾱ_prev is the clip by ±r·√ᾱ_prev). Python floats,
    so the step runs on any device.

    Attributes:
        t: the diffusion step.
        noise_scale: √(1−ᾱ_t).
        x0_scale: √ᾱ_prev / √ᾱ_t.
        bound: √ᾱ_prev·clip_sample_range (``inf`` without clipping).
        direction: √(1−ᾱ_prev), 0 at the last step (ᾱ_prev = the final ᾱ, 1 by default).
    """

    t: int
    noise_scale: float
    x0_scale: float
    bound: float
    direction: float


def ddim_steps(sched: DDIMScheduler) -> list[DDIMStep] | None:
    """The :class:`DDIMStep` coefficients of a ``diffusers`` DDIM scheduler's timesteps
    (after ``set_timesteps``), read from its ``alphas_cumprod``, ``final_alpha_cumprod``
    and config; None where :func:`ddim_step` does not apply (a prediction type other
    than ``epsilon``, or dynamic thresholding), and the scheduler's own ``step`` is used.

    Raises:
        ConfigError: when ``set_timesteps`` has not been called.
    """
    if sched.num_inference_steps is None:
        raise ConfigError("the DDIM scheduler has no timesteps; call set_timesteps(num_inference_steps) first")
    cfg = sched.config
    if cfg.prediction_type != "epsilon" or cfg.thresholding:
        return None
    stride = cfg.num_train_timesteps // sched.num_inference_steps  # as DDIMScheduler.step
    ac = sched.alphas_cumprod
    plan = []
    for t in (int(v) for v in sched.timesteps):
        a_t = float(ac[t])
        a_prev = float(ac[t - stride]) if t - stride >= 0 else float(sched.final_alpha_cumprod)
        bound = math.sqrt(a_prev) * float(cfg.clip_sample_range) if cfg.clip_sample else math.inf
        plan.append(DDIMStep(t, math.sqrt(1 - a_t), math.sqrt(a_prev) / math.sqrt(a_t), bound,
                             math.sqrt(1 - a_prev)))
    return plan


def ddim_step(step: DDIMStep, eps: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """x_prev of a :class:`DDIMStep`: ``DDIMScheduler.step(eps, t, x_t, eta=0).prev_sample``
    (the same values up to float rounding).

    Args:
        eps, x_t: the predicted noise and the sample, same shape, on any device.

    Returns:
        x_prev, a new tensor of that shape (``x_t`` and ``eps`` are not modified).
    """
    z, scale = ddim_step_scaled(step, eps, x_t, 1.0)
    return z.mul_(scale)


def ddim_step_scaled(step: DDIMStep, eps: torch.Tensor, z: torch.Tensor, scale: float
                     ) -> tuple[torch.Tensor, float]:
    """:func:`ddim_step` on a sample kept as ``x_t = scale · z``, in three tensor ops.

    With g = scale·x0_scale, x_prev = g·[clip(z − (noise_scale/scale)·ε, ±bound/g)
    + (direction/g)·ε], so carrying the factor g as a Python float saves the
    multiplication; a sampler passes ``scale`` on to the network's input matmul
    (:meth:`NoiseNet.denoise_step`) and multiplies once at the end.

    Returns:
        ``(z_prev, scale_prev)`` with x_prev = scale_prev · z_prev (a new tensor).
    """
    g = scale * step.x0_scale
    z = torch.sub(z, eps, alpha=step.noise_scale / scale)
    if step.bound != math.inf:
        z.clamp_(-step.bound / g, step.bound / g)
    if step.direction:
        z.add_(eps, alpha=step.direction / g)
    return z, g


def make_schedulers(cfg: PolicyConfig) -> tuple[DDPMScheduler, DDIMScheduler]:
    """The training (DDPM) and sampling (DDIM) schedulers, sharing one ᾱ_t schedule."""
    train = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                          clip_sample=True, prediction_type="epsilon")
    sample = DDIMScheduler.from_config(train.config)
    sample.set_timesteps(cfg.num_inference_steps)
    return train, sample


class DiffusionPolicy(nn.Module):
    """A diffusion policy over action chunks, executed with a receding horizon.

    Args:
        cfg: architecture and schedule.
        obs_normalizer, action_normalizer: fitted on the training data; kept with the
            policy and saved in its checkpoint.
        task_id: the task the policy acts in (checked when loading for a task).
    """

    def __init__(self, cfg: PolicyConfig, obs_normalizer: Normalizer, action_normalizer: Normalizer,
                 task_id: str = "") -> None:
        super().__init__()
        if obs_normalizer.low.shape != (cfg.obs_dim,) or action_normalizer.low.shape != (cfg.action_dim,):
            raise ConfigError(
                f"normaliser sizes {obs_normalizer.low.shape}/{action_normalizer.low.shape} do not match "
                f"obs_dim={cfg.obs_dim}, action_dim={cfg.action_dim}")
        self.cfg = cfg
        self.task_id = task_id
        self.obs_normalizer = obs_normalizer
        self.action_normalizer = action_normalizer
        self.net = NoiseNet(cfg)
        self.train_scheduler, self.sample_scheduler = make_schedulers(cfg)
        self.register_buffer("alphas_cumprod", self.train_scheduler.alphas_cumprod.clone().float(), persistent=False)
        self._obs_queue: deque[np.ndarray] = deque(maxlen=cfg.n_obs_steps)
        self._action_queue: deque[np.ndarray] = deque()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- training -------------------------------------------------------------------
    def add_noise(self, actions: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t a + √(1−ᾱ_t) ε (DDPM forward process). ``actions (B, Ta, Da)``, ``t (B,)``."""
        ac = self.alphas_cumprod[t].view(-1, 1, 1)
        return ac.sqrt() * actions + (1 - ac).sqrt() * noise

    def sample_noise_and_timesteps(self, batch: int, generator: torch.Generator | None = None
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """ε ~ N(0, I) of shape ``(B, Ta, Da)`` and t ~ U{0..N-1} of shape ``(B,)``."""
        dev = self.device
        noise = torch.randn(batch, self.cfg.horizon, self.cfg.action_dim, generator=generator,
                            device="cpu" if generator is not None else dev).to(dev)
        t = torch.randint(0, self.cfg.num_train_timesteps, (batch,), generator=generator,
                          device="cpu" if generator is not None else dev).to(dev)
        return noise, t

    def denoising_error(self, obs: torch.Tensor, actions: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor) -> torch.Tensor:
        """Per-sample ‖ε − ε_θ(x_t, s, t)‖², averaged over Ta and Da (DESIGN.md §2).

        Args:
            obs: (B, To, Do) normalised observation history.
            actions: (B, Ta, Da) normalised action chunk.
            t: (B,) diffusion steps in ``[0, N)``.
            noise: (B, Ta, Da) the ε added.

        Returns:
            (B,) errors; lower means higher likelihood of the chunk under the policy.
        """
        x_t = self.add_noise(actions, noise, t)
        pred = self.net(x_t, obs, t)
        return (pred - noise).pow(2).mean(dim=(1, 2))

    def compute_loss(self, obs: torch.Tensor, actions: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """L_BC = E_{t, ε} ‖ε − ε_θ(x_t, s, t)‖² on a batch (DESIGN.md §2, Stage 1).

        Args:
            obs: (B, To, Do) normalised; actions: (B, Ta, Da) normalised.

        Returns:
            scalar loss.
        """
        noise, t = self.sample_noise_and_timesteps(actions.shape[0], generator)
        return self.denoising_error(obs, actions, t, noise).mean()

    # -- inference ------------------------------------------------------------------
    def _sampling_plan(self, device: torch.device) -> tuple[list[DDIMStep] | None, list[int], torch.Tensor]:
        """The DDIM steps (:func:`ddim_steps`, None for the scheduler's own ``step``), the
        timesteps, and their (K, E) sinusoids on ``device``: the parameter-free parts of
        sampling, cached per scheduler and device (the network's weights never are)."""
        sched = self.sample_scheduler
        key = (sched.num_inference_steps, str(device))
        cached = self.__dict__.get("_plan_cache")
        if cached is None or cached[0] is not sched or cached[1] != key:
            steps = [int(t) for t in sched.timesteps]
            with torch.inference_mode(False), torch.no_grad():
                sins = self.net.sinusoids(torch.tensor(steps, dtype=torch.long, device=device))
            cached = self.__dict__["_plan_cache"] = (sched, key, (ddim_steps(sched), steps, sins))
        return cached[2]

    @torch.no_grad()
    def sample_normalized(self, obs: torch.Tensor, generator: torch.Generator | None = None,
                          initial_noise: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM sampling (η = 0). ``obs (B, To, Do)`` normalised -> ``(B, Ta, Da)`` normalised.

        The K steps' conditioning is computed in one batched call
        (:meth:`NoiseNet.sampling_steps`), each step then costs the residual trunk
        (:meth:`NoiseNet.denoise_step`) and a fused DDIM update
        (:func:`ddim_step_scaled`, coefficients read once from the ``diffusers``
        scheduler): the same values as ``DDIMScheduler.step`` up to float rounding.
        Everything runs on ``obs.device``; the initial noise is drawn on the CPU when a
        ``generator`` is given (so a seed gives the same chain on every device) and on
        ``obs.device`` otherwise.

        Args:
            obs: (B, To, Do) normalised observation histories.
            generator: for the initial noise x_T ~ N(0, I).
            initial_noise: (B, Ta, Da) x_T; overrides ``generator``.
        """
        b, dev = obs.shape[0], obs.device
        ta, da = self.cfg.horizon, self.cfg.action_dim
        if initial_noise is None:
            initial_noise = torch.randn(b, ta, da, generator=generator,
                                        device="cpu" if generator is not None else dev)
        x = initial_noise.to(dev).reshape(b, ta * da)
        plan, timesteps, sins = self._sampling_plan(dev)
        net = self.net
        per_step = net.sampling_steps(obs, sins)
        trunk = net.trunk_tensors()
        if plan is None:  # a scheduler the fused step does not cover: diffusers' own step
            sched = self.sample_scheduler
            for t, (bias, films) in zip(timesteps, per_step):
                eps = net.denoise_step(x, bias, films, trunk)
                x = sched.step(eps.view(b, ta, da), t, x.view(b, ta, da), return_dict=False)[0].reshape(b, -1)
        else:
            scale = 1.0
            for step, (bias, films) in zip(plan, per_step):
                x, scale = ddim_step_scaled(step, net.denoise_step(x, bias, films, trunk, scale), x, scale)
            x = x.mul_(scale)
        return x.view(b, ta, da)

    @torch.no_grad()
    def predict_action_chunk(self, obs_history: np.ndarray | torch.Tensor,
                             generator: torch.Generator | None = None,
                             initial_noise: torch.Tensor | None = None) -> np.ndarray:
        """Sample action chunks for raw observation histories.

        Normalisation runs in NumPy on the host (B·To·Do numbers), the chain on the
        policy's device under ``torch.inference_mode``.

        Args:
            obs_history: (B, To, Do) raw observations (oldest first), NumPy or a CPU tensor.
            generator: torch generator for the initial noise (CPU), for reproducibility.
            initial_noise: (B, Ta, Da) the DDIM chain's starting noise; overrides
                ``generator`` (e.g. one generator per row).

        Returns:
            (B, Ta, Da) float32 raw actions, clipped to ``[-1, 1]``.

        Raises:
            ValueError: when the history has the wrong shape.
        """
        x = np.asarray(obs_history, np.float32)
        if x.ndim != 3 or x.shape[1:] != (self.cfg.n_obs_steps, self.cfg.obs_dim):
            raise ValueError(
                f"obs_history must be (B, To={self.cfg.n_obs_steps}, Do={self.cfg.obs_dim}), got {tuple(x.shape)}")
        obs = torch.from_numpy(np.ascontiguousarray(self.obs_normalizer.normalize(x), np.float32))
        with torch.inference_mode():
            act = self.sample_normalized(obs.to(self.net.out.weight.device), generator=generator,
                                         initial_noise=initial_noise).cpu().numpy()
        return np.clip(self.action_normalizer.unnormalize(act), -1.0, 1.0).astype(np.float32, copy=False)

    def reset(self) -> None:
        """Clear the observation history and queued actions (call at every episode start)."""
        self._obs_queue.clear()
        self._action_queue.clear()

    @torch.no_grad()
    def select_action(self, obs: np.ndarray, generator: torch.Generator | None = None) -> np.ndarray:
        """One action for the current observation ``(Do,)`` -> ``(Da,)``.

        Samples a chunk of Ta actions when the queue is empty and executes its first
        ``n_action_steps`` (receding horizon, Chi et al. §3.1). The history is padded
        with the first observation at the start of an episode.
        """
        obs = np.asarray(obs, np.float32)
        if not self._obs_queue:
            for _ in range(self.cfg.n_obs_steps):
                self._obs_queue.append(obs)
        else:
            self._obs_queue.append(obs)
        if not self._action_queue:
            hist = np.stack(self._obs_queue)[None]
            chunk = self.predict_action_chunk(hist, generator=generator)[0]
            self._action_queue.extend(chunk[: self.cfg.n_action_steps])
        return self._action_queue.popleft()

    # -- checkpoints ----------------------------------------------------------------
    def save(self, directory: Path | str, extra: dict[str, Any] | None = None) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into ``directory`` atomically.

        The directory is written under a temporary name and renamed, so a crash never
        leaves a half-written checkpoint (an existing checkpoint at ``directory`` is
        replaced only once the new one is complete). ``extra`` (parent, round, metrics,
        training config, ...) is stored in ``config.json``.
        """
        directory = Path(directory)
        tmp = directory.with_name(directory.name + ".tmp")
        if tmp.exists():
            for p in tmp.iterdir():
                p.unlink()
        tmp.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        digest = hashlib.sha256((tmp / WEIGHTS_FILE).read_bytes()).hexdigest()
        meta = {
            "format": CHECKPOINT_FORMAT,
            "task_id": self.task_id,
            "policy": to_json_dict(self.cfg),
            "normalizer": {"obs": self.obs_normalizer.state_dict(), "action": self.action_normalizer.state_dict()},
            "weights_sha256": digest,
        }
        meta.update(extra or {})
        save_json(tmp / CONFIG_FILE, meta)
        if directory.exists():
            old = directory.with_name(directory.name + ".old")
            if old.exists():
                _rmtree(old)
            directory.replace(old)
            tmp.replace(directory)
            _rmtree(old)
        else:
            tmp.replace(directory)
        return directory

    @classmethod
    def load(cls, directory: Path | str, task_id: str | None = None,
             device: str | torch.device = "cpu") -> "DiffusionPolicy":
        """Load a checkpoint written by :meth:`save`.

        Args:
            directory: checkpoint directory (or its ``config.json`` / weights file).
            task_id: when given, the checkpoint must be for this task.
            device: where to put the weights.

        Raises:
            CheckpointError: missing directory or file, unreadable JSON, wrong format,
                weights that fail their checksum or do not fit the config, or a
                checkpoint for another task.
        """
        meta = read_checkpoint_meta(directory)
        directory = checkpoint_dir(directory)
        if task_id is not None and meta.get("task_id") != task_id:
            raise CheckpointError(
                f"checkpoint {str(directory)!r} is for task {meta.get('task_id')!r}, not {task_id!r}. "
                "Use a checkpoint trained on this task.")
        weights = directory / WEIGHTS_FILE
        if not weights.exists():
            raise CheckpointError(f"checkpoint {str(directory)!r} has no {WEIGHTS_FILE}; it is incomplete. "
                                  "Retrain or restore it.")
        blob = weights.read_bytes()
        if meta.get("weights_sha256") and hashlib.sha256(blob).hexdigest() != meta["weights_sha256"]:
            raise CheckpointError(
                f"checkpoint {str(directory)!r}: {WEIGHTS_FILE} does not match its recorded sha256; the file "
                "is corrupt or was modified. Retrain or restore it from a backup.")
        try:
            cfg = from_json_dict(PolicyConfig, meta["policy"])
            norm = meta["normalizer"]
            policy = cls(cfg, Normalizer.from_state_dict(norm["obs"]), Normalizer.from_state_dict(norm["action"]),
                         task_id=meta.get("task_id", ""))
            state = load(blob)  # the bytes already read and checksummed above
            policy.net.load_state_dict(state)
        except (KeyError, TypeError, RuntimeError, SafetensorError, ConfigError) as exc:
            raise CheckpointError(
                f"checkpoint {str(directory)!r} is corrupt or does not match its config ({exc}). "
                "Retrain or restore it.") from exc
        policy.checkpoint_meta = meta
        return policy.to(device).eval()


def checkpoint_dir(path: Path | str) -> Path:
    path = Path(path)
    return path.parent if path.is_file() else path


def read_checkpoint_meta(path: Path | str) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint as a dict.

    Raises:
        CheckpointError: missing, unreadable, or not an FKPD policy checkpoint.
    """
    directory = checkpoint_dir(path)
    cfg_path = directory / CONFIG_FILE
    if not directory.exists():
        raise CheckpointError(f"checkpoint {str(directory)!r} does not exist. Train one with `fkpd train-bc` "
                              "or pass the right path.")
    if not cfg_path.exists():
        raise CheckpointError(f"{str(directory)!r} has no {CONFIG_FILE}; it is not an FKPD checkpoint "
                              "directory (expected model.safetensors + config.json).")
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {str(directory)!r}: {CONFIG_FILE} is not valid JSON ({exc}); "
                              "the checkpoint is corrupt. Retrain or restore it.") from exc
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {str(directory)!r}: format is {meta.get('format') if isinstance(meta, dict) else None!r}, "
                              f"expected {CHECKPOINT_FORMAT!r}.")
    return meta


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
