"""The alignment losses of FKPD, as pure functions returning ``(loss, metrics)``.

All follow DESIGN.md §2 and work on *normalised* tensors (the policy's own
normalisers), with ε-prediction networks ε_θ (the policy being aligned) and ε_ref (the
frozen behaviour-cloning reference, always evaluated under ``torch.no_grad``).

* :func:`segment_errors` — the segment likelihood proxy
  m(σ) = (1/L) Σ_h ‖ε_h − ε(x_{t_h,h}, s_h, t_h)‖², one (t_h, ε_h) per step h;
* :func:`dpo_loss` — the Diffusion-DPO term over segment pairs (Wallace et al.,
  "Diffusion Model Alignment Using Direct Preference Optimization", CVPR 2024, its
  final objective, with segments in place of images as in FKPD, Shan et al., AAAI 2025):
  z = −(β/2)·[(m_θ(σ_w) − m_ref(σ_w)) − (m_θ(σ_l) − m_ref(σ_l))],
  L = −[p·log σ(z) + (1−p)·log σ(−z)] (p = 1 for a strict preference, 0.5 for a tie);
* :func:`bc_loss` — the forward-KL regulariser, L_BC on offline-dataset windows
  (the FKPD objective): L_FKPD = L_DPO + λ·L_BC(D);
* :func:`reverse_kl_loss` — the reverse-KL comparison (DPOK, Fan et al., NeurIPS 2023,
  its KL upper bound over the sampling chain): Σ over the policy's own DDIM chain of ‖ε_θ(x_t,s,t) − ε_ref(x_t,s,t)‖²;
* :func:`alignment_loss` — L_DPO + λ·regulariser, the objective the trainer optimises.

A "step" h of a segment is one policy window: the observation history ending at step h
and the action chunk starting at h (To and Ta steps, edge-padded inside the segment as
:class:`fkpd.data.WindowSampler` does), so a segment of L steps gives L windows.

Shapes: B pairs (or windows), L steps per segment, To observation history, Ta action
horizon, Do/Da observation/action dims. Segments of different lengths are padded to a
common L with a ``mask`` (B, L) that is 1 on real steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

REGULARIZERS = ("forward", "reverse", "none")


@dataclass
class PairBatch:
    """B preference pairs in winner-first order, as policy windows.

    Attributes:
        obs_w, obs_l: (B, L, To, Do) normalised observation histories of the first
            (preferred) and second segment of each pair.
        act_w, act_l: (B, L, Ta, Da) normalised action chunks.
        mask_w, mask_l: (B, L) 1.0 on real steps, 0.0 on padding.
        p: (B,) probability that the first segment is preferred: 1.0, or 0.5 for a tie
            (from :func:`fkpd.prefs.teachers.to_winner_first`).
    """

    obs_w: torch.Tensor
    act_w: torch.Tensor
    mask_w: torch.Tensor
    obs_l: torch.Tensor
    act_l: torch.Tensor
    mask_l: torch.Tensor
    p: torch.Tensor

    def __len__(self) -> int:
        return self.obs_w.shape[0]

    @property
    def steps(self) -> int:
        """L, the padded segment length."""
        return self.obs_w.shape[1]

    def to(self, device) -> "PairBatch":
        return PairBatch(*(getattr(self, k).to(device) for k in
                           ("obs_w", "act_w", "mask_w", "obs_l", "act_l", "mask_l", "p")))


class DPOTerms(NamedTuple):
    """Per-pair quantities of the DPO term, each (B,).

    ``m_w``/``m_l``: m_θ of winner and loser; ``ref_w``/``ref_l``: m_ref; ``z``: the
    preference logit of DESIGN.md §2.
    """

    m_w: torch.Tensor
    m_l: torch.Tensor
    ref_w: torch.Tensor
    ref_l: torch.Tensor
    z: torch.Tensor


def shared_noise(policy, batch: int, steps: int, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One diffusion step and one ε per segment step, for a batch of pairs.

    The same draw is used for winner, loser and reference (DESIGN.md §2; Diffusion-DPO
    shares noise and timestep between the two images of a pair).

    Returns:
        ``t`` (B, L) int64 in ``[0, N)`` and ``noise`` (B, L, Ta, Da).
    """
    noise, t = policy.sample_noise_and_timesteps(batch * steps, generator)
    return t.view(batch, steps), noise.view(batch, steps, *noise.shape[1:])


def segment_errors(policy, obs: torch.Tensor, act: torch.Tensor, mask: torch.Tensor, t: torch.Tensor,
                   noise: torch.Tensor) -> torch.Tensor:
    """m(σ) = masked mean over steps of ‖ε − ε(x_t, s, t)‖² (DESIGN.md §2).

    Args:
        policy: a :class:`fkpd.policy.DiffusionPolicy` (θ or ref).
        obs: (B, L, To, Do); act: (B, L, Ta, Da); mask: (B, L); t: (B, L);
            noise: (B, L, Ta, Da).

    Returns:
        (B,) per-segment mean denoising error; lower means higher likelihood.
    """
    b, n = mask.shape
    err = policy.denoising_error(obs.flatten(0, 1), act.flatten(0, 1), t.flatten(), noise.flatten(0, 1))
    mask = mask.to(err.dtype)
    return (err.view(b, n) * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def dpo_terms(policy, reference, batch: PairBatch, beta: float, t: torch.Tensor | None = None,
              noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> DPOTerms:
    """m_θ, m_ref of both segments and z, with one shared (t, ε) per step.

    Winner and loser go through each network in one call (2B·L windows); the reference
    runs under ``torch.no_grad``.

    Args:
        policy: the policy being aligned (gradients flow into it).
        reference: the frozen reference policy.
        batch: B pairs, winner first.
        beta: β of the DPO term (> 0).
        t, noise: (B, L) and (B, L, Ta, Da); drawn with :func:`shared_noise` when None.
        generator: for that draw.
    """
    if t is None or noise is None:
        t, noise = shared_noise(policy, len(batch), batch.steps, generator)
    obs = torch.cat([batch.obs_w, batch.obs_l])
    act = torch.cat([batch.act_w, batch.act_l])
    mask = torch.cat([batch.mask_w, batch.mask_l])
    t2, noise2 = torch.cat([t, t]), torch.cat([noise, noise])
    m = segment_errors(policy, obs, act, mask, t2, noise2)
    with torch.no_grad():
        ref = segment_errors(reference, obs, act, mask, t2, noise2)
    b = len(batch)
    m_w, m_l, ref_w, ref_l = m[:b], m[b:], ref[:b], ref[b:]
    z = -0.5 * beta * ((m_w - ref_w) - (m_l - ref_l))
    return DPOTerms(m_w, m_l, ref_w, ref_l, z)


def dpo_metrics(terms: DPOTerms, p: torch.Tensor, beta: float) -> dict[str, float]:
    """Logged quantities of the DPO term (as in Diffusion-DPO's training script).

    * ``implicit_acc``: over strict pairs (p ≠ 0.5) the fraction with z > 0, counting
      z = 0 as one half (Diffusion-DPO's convention, so θ = ref reads 0.5); ties are
      excluded. NaN when the batch holds only ties.
    * ``reward_margin``: mean z over strict pairs, the implicit-reward margin
      r(σ_w) − r(σ_l) with r(σ) = −(β/2)(m_θ(σ) − m_ref(σ)), in nats of preference
      logit; ``reward_w``/``reward_l``: mean r of winners and losers (all pairs).
    * ``mse_w``/``mse_l``, ``ref_mse_w``/``ref_mse_l``: mean m_θ and m_ref of winners
      and losers (all pairs).
    * ``tie_abs_z``: mean |z| over ties (NaN without ties); ties push z to 0.
    * ``strict_pairs``: count of strict pairs in the batch.
    """
    with torch.no_grad():
        z = terms.z.detach()
        strict = p.detach() != 0.5
        n = int(strict.sum())
        zs = z[strict]
        acc = float(((zs > 0).float() + 0.5 * (zs == 0).float()).mean()) if n else float("nan")
        ties = z[~strict]
        return {
            "implicit_acc": acc,
            "reward_margin": float(zs.mean()) if n else float("nan"),
            "reward_w": float((-0.5 * beta * (terms.m_w - terms.ref_w)).mean()),
            "reward_l": float((-0.5 * beta * (terms.m_l - terms.ref_l)).mean()),
            "mse_w": float(terms.m_w.mean()),
            "mse_l": float(terms.m_l.mean()),
            "ref_mse_w": float(terms.ref_w.mean()),
            "ref_mse_l": float(terms.ref_l.mean()),
            "tie_abs_z": float(ties.abs().mean()) if len(ties) else float("nan"),
            "strict_pairs": n,
        }


def preference_nll(z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """−[p·log σ(z) + (1−p)·log σ(−z)] per pair, (B,); the soft-label form of DESIGN.md §2
    (−log σ(z) when p = 1)."""
    p = p.to(z.dtype)
    return -(p * F.logsigmoid(z) + (1 - p) * F.logsigmoid(-z))


def dpo_loss(policy, reference, batch: PairBatch, beta: float, t: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """The Diffusion-DPO term over segment pairs (DESIGN.md §2), averaged over pairs.

    L = −[p·log σ(z) + (1−p)·log σ(−z)], which is −log σ(z) for p = 1. A tie (p = 0.5)
    has zero gradient where z = 0, in particular at θ = ref and on identical segments.

    Args:
        policy, reference, batch, beta, t, noise, generator: as in :func:`dpo_terms`.

    Returns:
        ``(loss, metrics)``: scalar loss and :func:`dpo_metrics` plus ``dpo`` (the loss).
    """
    terms = dpo_terms(policy, reference, batch, beta, t, noise, generator)
    loss = preference_nll(terms.z, batch.p).mean()
    metrics = dpo_metrics(terms, batch.p, beta)
    metrics["dpo"] = float(loss.detach())
    return loss, metrics


def bc_loss(policy, obs: torch.Tensor, act: torch.Tensor, generator: torch.Generator | None = None
            ) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward-KL regulariser: L_BC = E ‖ε − ε_θ(x_t, s, t)‖² on dataset windows.

    Minimising KL(π_b ‖ π_θ) in θ is maximum likelihood on behaviour data, whose
    diffusion surrogate is the BC loss (DESIGN.md §2, "Forward KL regulariser").

    Args:
        policy: the policy being aligned.
        obs: (B, To, Do), act: (B, Ta, Da) normalised with the *reference's*
            normalisers (e.g. from :class:`fkpd.data.WindowSampler`).

    Returns:
        ``(loss, {"bc": loss})``.
    """
    loss = policy.compute_loss(obs, act, generator=generator)
    return loss, {"bc": float(loss.detach())}


@torch.no_grad()
def sample_chain(policy, obs: torch.Tensor, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's own DDIM sampling chain (η = 0), every intermediate x_t kept.

    Args:
        obs: (B, To, Do) normalised observation histories.

    Returns:
        ``xs`` (K, B, Ta, Da): the input x_t of each of the K DDIM steps (x_T ~ N(0, I)
        first), detached; ``ts`` (K,) the diffusion step of each.
    """
    b = obs.shape[0]
    x = torch.randn(b, policy.cfg.horizon, policy.cfg.action_dim, generator=generator,
                    device="cpu" if generator is not None else obs.device).to(obs.device)
    sched = policy.sample_scheduler
    xs, ts = [], []
    for t in sched.timesteps:
        t = int(t)
        xs.append(x)
        ts.append(t)
        eps = policy.net(x, obs, torch.full((b,), t, device=obs.device, dtype=torch.long))
        x = sched.step(eps, t, x, return_dict=False)[0]
    return torch.stack(xs), torch.tensor(ts, device=obs.device, dtype=torch.long)


def reverse_kl_loss(policy, reference, obs: torch.Tensor, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    """Reverse-KL regulariser (DPOK-style): Σ_k ‖ε_θ(x_k, s, t_k) − ε_ref(x_k, s, t_k)‖².

    KL(π_θ ‖ π_ref) is bounded by the sum over the sampling chain of per-step Gaussian
    KLs, each proportional to ‖ε_θ − ε_ref‖² (DESIGN.md §2, "Reverse KL"; DPOK's
    bound). The chain is sampled from the current θ and detached; ε_θ is then re-evaluated
    with gradients at every chain point, ε_ref under ``torch.no_grad``. The exact bound
    weighs step k by a schedule-dependent factor; here every step has unit weight, the
    ε-space form DESIGN.md §2 writes down. Each step's error is the mean over Ta·Da, summed over the K
    DDIM steps and averaged over the batch, so its scale is about K times an MSE.

    Args:
        policy: the policy being aligned; reference: the frozen reference.
        obs: (B, To, Do) normalised observation histories (states from the segments).
        generator: for the chain's initial noise.

    Returns:
        ``(loss, {"reverse_kl": loss})``; exactly 0 when θ = ref.
    """
    xs, ts = sample_chain(policy, obs, generator)
    k, b = xs.shape[:2]
    x = xs.flatten(0, 1)
    t = ts.repeat_interleave(b)
    o = obs.repeat(k, 1, 1)
    eps_theta = policy.net(x, o, t)
    with torch.no_grad():
        eps_ref = reference.net(x, o, t)
    per_step = (eps_theta - eps_ref).pow(2).mean(dim=(1, 2)).view(k, b)
    loss = per_step.sum(0).mean()
    return loss, {"reverse_kl": float(loss.detach())}


def alignment_loss(policy, reference, batch: PairBatch, beta: float, regularizer: str = "forward",
                   lam: float = 1.0, bc_batch: tuple[torch.Tensor, torch.Tensor] | None = None,
                   states: torch.Tensor | None = None, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """L = L_DPO + λ·R, R the chosen regulariser (DESIGN.md §2).

    Args:
        regularizer: ``forward`` (R = L_BC on ``bc_batch``, FKPD), ``reverse``
            (R = :func:`reverse_kl_loss` at ``states``) or ``none`` (plain Diffusion-DPO).
        lam: λ ≥ 0.
        bc_batch: ``(obs (B, To, Do), act (B, Ta, Da))`` dataset windows for ``forward``.
        states: (B, To, Do) observation histories for ``reverse``.

    Returns:
        ``(loss, metrics)``: :func:`dpo_loss` metrics plus ``reg`` (R) and ``loss``.

    Raises:
        ValueError: unknown regulariser, or its input missing.
    """
    if regularizer not in REGULARIZERS:
        raise ValueError(f"regularizer must be one of {REGULARIZERS}, got {regularizer!r}")
    loss, metrics = dpo_loss(policy, reference, batch, beta, generator=generator)
    reg = None
    if regularizer == "forward" and lam > 0:
        if bc_batch is None:
            raise ValueError("regularizer 'forward' needs bc_batch (dataset windows)")
        reg, m = bc_loss(policy, *bc_batch, generator=generator)
        metrics.update(m)
    elif regularizer == "reverse" and lam > 0:
        if states is None:
            raise ValueError("regularizer 'reverse' needs states (observation histories)")
        reg, m = reverse_kl_loss(policy, reference, states, generator=generator)
        metrics.update(m)
    if reg is not None:
        loss = loss + lam * reg
        metrics["reg"] = float(reg.detach())
    else:
        metrics["reg"] = 0.0
    metrics["loss"] = float(loss.detach())
    return loss, metrics
