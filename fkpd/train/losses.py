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
* :func:`in_sigmoid_loss` — the form of FKPD's released code (CPOD, ``finetune_loss``):
  the BC term inside the sigmoid,
  u = −(β/2)·[(m_θ(σ_w) − λ_l·m_θ(σ_l)) − (m_ref(σ_w) − λ_l·m_ref(σ_l)) + c_bc·L_BC],
  L = −log σ(u) (DESIGN.md §2, "Two forms of the objective");
* :func:`filtered_bc_loss` — the simplest use of labels, a baseline: behaviour cloning on
  the preferred segments only;
* :func:`alignment_loss` — the objective the trainer optimises: ``additive``
  (L_DPO + λ·regulariser, the paper's equation), ``in_sigmoid`` or ``filtered_bc``.

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
#: ``additive``: L_DPO + λ·R (the paper's equation); ``in_sigmoid``: the released code's
#: form (:func:`in_sigmoid_loss`); ``filtered_bc``: BC on preferred segments (baseline).
OBJECTIVES = ("additive", "in_sigmoid", "filtered_bc")
#: Where the in-sigmoid form's L_BC comes from: offline-dataset windows (CPOD's
#: ``finetune_loss_with_nolabel_data``) or the pair's own segments (``finetune_loss``).
BC_SOURCES = ("dataset", "pairs")


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


def pair_errors(policy, reference, batch: PairBatch, t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None, with_reference: bool = True,
                reference_errors: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """m_θ and m_ref of the winner and loser of every pair, with one shared (t, ε) per step.

    Winner and loser go through each network in one call (2B·L windows); the reference
    runs under ``torch.no_grad`` (and not at all without ``with_reference``: its terms
    are then 0).

    Args:
        reference_errors: ``(ref_w, ref_l)``, each (B,), returned by an earlier call on
            the same pairs with the same (t, ε) draw: the reference is frozen, so they
            are what it would give again, and it is not run. The draw is made (and the
            generator advanced) exactly as without them.

    Returns:
        ``(m_w, m_l, ref_w, ref_l)``, each (B,).
    """
    if t is None or noise is None:
        t, noise = shared_noise(policy, len(batch), batch.steps, generator)
    obs = torch.cat([batch.obs_w, batch.obs_l])
    act = torch.cat([batch.act_w, batch.act_l])
    mask = torch.cat([batch.mask_w, batch.mask_l])
    t2, noise2 = torch.cat([t, t]), torch.cat([noise, noise])
    m = segment_errors(policy, obs, act, mask, t2, noise2)
    b = len(batch)
    if reference_errors is not None:
        ref_w, ref_l = reference_errors
        return m[:b], m[b:], ref_w.to(m.device), ref_l.to(m.device)
    if not with_reference:
        zeros = torch.zeros_like(m[:b])
        return m[:b], m[b:], zeros, zeros
    with torch.no_grad():
        ref = segment_errors(reference, obs, act, mask, t2, noise2)
    return m[:b], m[b:], ref[:b], ref[b:]


def dpo_terms(policy, reference, batch: PairBatch, beta: float, t: torch.Tensor | None = None,
              noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
              reference_errors: tuple[torch.Tensor, torch.Tensor] | None = None) -> DPOTerms:
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
        reference_errors: cached m_ref of these pairs for this draw (:func:`pair_errors`).
    """
    m_w, m_l, ref_w, ref_l = pair_errors(policy, reference, batch, t, noise, generator,
                                         reference_errors=reference_errors)
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


def in_sigmoid_loss(policy, reference, batch: PairBatch, beta: float, c_bc: float = 1.0, loser_weight: float = 1.0,
                    with_reference: bool = True, bc: torch.Tensor | None = None, t: torch.Tensor | None = None,
                    noise: torch.Tensor | None = None, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    """The objective of the code released with the FKPD paper (github.com/brotherzhao2019/CPOD,
    ``diffusor/models/diffusor.py``, ``finetune_loss`` and ``finetune_loss_with_nolabel_data``),
    written from its description (DESIGN.md §2, "Two forms of the objective"):

        z = −(β/2)·[(m_θ(σ_w) − λ_l·m_θ(σ_l)) − (m_ref(σ_w) − λ_l·m_ref(σ_l))]
        u = z − (β/2)·c_bc·L_BC,     L = −log σ(u)  for a strict preference.

    The BC term sits inside the sigmoid, so it is weighted by the same σ(−u)·β/2 as the
    preference term and fades as the pair is fitted. Same conventions as
    :func:`dpo_loss`: winner and loser share (t, ε), the reference runs under
    ``torch.no_grad``; a tie (p = 0.5) uses the soft-label form on z alone,
    −½[log σ(z) + log σ(−z)], so it has zero gradient where z = 0 (at θ = ref with the
    reference terms and λ_l = 1) and the BC term acts through strict pairs only.

    Args:
        policy, reference, batch, beta, t, noise, generator: as in :func:`dpo_terms`.
        c_bc: weight of L_BC inside the sigmoid (≥ 0; CPOD's MetaWorld config: 1).
        loser_weight: λ_l, weight of the loser's terms (CPOD: 1).
        with_reference: include the reference terms m_ref (CPOD's MetaWorld config runs
            without them, ``with_ref_model = False``); without, they are 0 and the
            reference network is not run.
        bc: a scalar L_BC (e.g. :func:`bc_loss` on offline-dataset windows, CPOD's
            ``nolabel`` variant); None: the pair's own segments, (m_θ(σ_w) + m_θ(σ_l))/2
            per pair with the shared noise draw (CPOD's ``finetune_loss``).

    Returns:
        ``(loss, metrics)``: :func:`dpo_metrics` of z (implicit accuracy and margin of
        this objective's preference logit), ``dpo`` (the loss), ``bc`` (mean L_BC) and
        ``u_margin`` (mean u over strict pairs).
    """
    m_w, m_l, ref_w, ref_l = pair_errors(policy, reference, batch, t, noise, generator, with_reference)
    z = -0.5 * beta * ((m_w - loser_weight * m_l) - (ref_w - loser_weight * ref_l))
    bc_term = 0.5 * (m_w + m_l) if bc is None else bc.expand_as(z)
    u = z - 0.5 * beta * c_bc * bc_term
    p = batch.p.to(z.dtype)
    strict = p != 0.5
    per_pair = torch.where(strict, -F.logsigmoid(u), preference_nll(z, p))
    loss = per_pair.mean()
    metrics = dpo_metrics(DPOTerms(m_w, m_l, ref_w, ref_l, z), p, beta)
    metrics.update(dpo=float(loss.detach()), bc=float(bc_term.detach().mean()),
                   u_margin=float(u.detach()[strict].mean()) if bool(strict.any()) else float("nan"))
    return loss, metrics


def filtered_bc_loss(policy, reference, batch: PairBatch, beta: float, t: torch.Tensor | None = None,
                     noise: torch.Tensor | None = None, generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, dict[str, float]]:
    """Filtered behaviour cloning, the simplest use of labels (a baseline): the denoising
    loss on the preferred segment of every strict pair, L = mean_w m_θ(σ_w); ties and
    the dispreferred segments are not trained on (a batch of ties only gives 0).

    The DPO quantities are computed too (with the same (t, ε), the reference under
    ``torch.no_grad``), only for the metrics, so runs of every objective log the same
    implicit accuracy.

    Returns:
        ``(loss, metrics)``: :func:`dpo_metrics` plus ``dpo`` (the DPO loss, not
        optimised here) and ``filtered_bc`` (the loss).
    """
    terms = dpo_terms(policy, reference, batch, beta, t, noise, generator)
    strict = (batch.p != 0.5).to(terms.m_w.dtype)
    loss = (terms.m_w * strict).sum() / strict.sum().clamp_min(1.0)
    metrics = dpo_metrics(terms, batch.p, beta)
    metrics.update(dpo=float(preference_nll(terms.z.detach(), batch.p).mean()), filtered_bc=float(loss.detach()))
    return loss, metrics


def alignment_loss(policy, reference, batch: PairBatch, beta: float, regularizer: str = "forward",
                   lam: float = 1.0, bc_batch: tuple[torch.Tensor, torch.Tensor] | None = None,
                   states: torch.Tensor | None = None, generator: torch.Generator | None = None,
                   objective: str = "additive", c_bc: float = 1.0, loser_weight: float = 1.0,
                   with_reference: bool = True, bc_source: str = "dataset"
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """The objective the trainer optimises (DESIGN.md §2).

    * ``additive`` (the paper's equation): L = L_DPO + λ·R, R the chosen regulariser;
    * ``in_sigmoid`` (the released code's form, :func:`in_sigmoid_loss`): its own BC term
      inside the sigmoid, from ``bc_batch`` (``bc_source="dataset"``) or the pair's own
      segments (``"pairs"``); ``regularizer`` and ``lam`` do not apply;
    * ``filtered_bc`` (baseline, :func:`filtered_bc_loss`): BC on preferred segments.

    Args:
        regularizer: for ``additive``: ``forward`` (R = L_BC on ``bc_batch``, FKPD),
            ``reverse`` (R = :func:`reverse_kl_loss` at ``states``) or ``none`` (plain
            Diffusion-DPO).
        lam: λ ≥ 0.
        bc_batch: ``(obs (B, To, Do), act (B, Ta, Da))`` dataset windows for ``forward``
            and for ``in_sigmoid`` with ``bc_source="dataset"``.
        states: (B, To, Do) observation histories for ``reverse``.
        objective, c_bc, loser_weight, with_reference, bc_source: see above and
            :func:`in_sigmoid_loss`.

    Returns:
        ``(loss, metrics)``: the objective's metrics plus ``reg`` (R, or the in-sigmoid
        L_BC; 0 otherwise) and ``loss``.

    Raises:
        ValueError: unknown objective, regulariser or BC source, or an input missing.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if regularizer not in REGULARIZERS:
        raise ValueError(f"regularizer must be one of {REGULARIZERS}, got {regularizer!r}")
    if objective == "in_sigmoid":
        if bc_source not in BC_SOURCES:
            raise ValueError(f"bc_source must be one of {BC_SOURCES}, got {bc_source!r}")
        bc = None
        if bc_source == "dataset" and c_bc > 0:
            if bc_batch is None:
                raise ValueError("objective 'in_sigmoid' with bc_source 'dataset' needs bc_batch (dataset windows)")
            bc, _ = bc_loss(policy, *bc_batch, generator=generator)
        elif bc_source == "dataset":
            bc = torch.zeros((), device=batch.p.device)
        loss, metrics = in_sigmoid_loss(policy, reference, batch, beta, c_bc, loser_weight, with_reference, bc,
                                        generator=generator)
        metrics["reg"] = metrics["bc"]
        metrics["loss"] = float(loss.detach())
        return loss, metrics
    if objective == "filtered_bc":
        loss, metrics = filtered_bc_loss(policy, reference, batch, beta, generator=generator)
        metrics["reg"] = 0.0
        metrics["loss"] = float(loss.detach())
        return loss, metrics
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
