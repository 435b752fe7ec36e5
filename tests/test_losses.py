"""The sign conventions and invariants of the alignment losses (DESIGN.md §2)."""

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fkpd.data import Normalizer
from fkpd.train.losses import (PairBatch, alignment_loss, bc_loss, dpo_loss, dpo_terms, reverse_kl_loss, sample_chain,
                         segment_errors, shared_noise)
from fkpd.policy import DiffusionPolicy, PolicyConfig

DO, DA, L = 5, 2, 6


def _policy(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = PolicyConfig(obs_dim=DO, action_dim=DA, hidden_dim=32, n_blocks=1, horizon=4, n_action_steps=2,
                       num_train_timesteps=20, num_inference_steps=5, **kw)
    return DiffusionPolicy(cfg, Normalizer(-np.ones(DO), np.ones(DO)), Normalizer(-np.ones(DA), np.ones(DA)))


def _perturb(policy, scale=0.05, seed=1):
    """A copy of ``policy`` whose weights are moved off the reference."""
    g = torch.Generator().manual_seed(seed)
    p = copy.deepcopy(policy)
    with torch.no_grad():
        for w in p.parameters():
            w.add_(scale * torch.randn(w.shape, generator=g))
    return p


def _batch(b=3, seed=0, p=1.0, to=2, ta=4):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.rand(*s, generator=g) * 2 - 1  # noqa: E731
    mask = torch.ones(b, L)
    return PairBatch(r(b, L, to, DO), r(b, L, ta, DA), mask, r(b, L, to, DO), r(b, L, ta, DA), mask.clone(),
                     torch.full((b,), float(p)))


def _swap(batch):
    return PairBatch(batch.obs_l, batch.act_l, batch.mask_l, batch.obs_w, batch.act_w, batch.mask_w, batch.p)


def _grad(policy, loss):
    policy.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in policy.parameters()])


def test_segment_errors_is_masked_mean_of_denoising_error():
    pol = _policy()
    batch = _batch(b=2)
    t, noise = shared_noise(pol, 2, L, torch.Generator().manual_seed(0))
    assert t.shape == (2, L) and noise.shape == (2, L, 4, DA)
    mask = torch.ones(2, L)
    mask[1, 4:] = 0
    m = segment_errors(pol, batch.obs_w, batch.act_w, mask, t, noise)
    per = torch.stack([pol.denoising_error(batch.obs_w[i], batch.act_w[i], t[i], noise[i]) for i in range(2)])
    torch.testing.assert_close(m[0], per[0].mean())
    torch.testing.assert_close(m[1], per[1, :4].mean())


def test_dpo_loss_matches_design_formula_and_reference_gets_no_grad():
    ref = _policy()
    pol = _perturb(ref)
    batch = _batch()
    g = torch.Generator().manual_seed(5)
    t, noise = shared_noise(pol, len(batch), L, g)
    loss, metrics = dpo_loss(pol, ref, batch, beta=100.0, t=t, noise=noise)
    with torch.no_grad():
        m_w = segment_errors(pol, batch.obs_w, batch.act_w, batch.mask_w, t, noise)
        m_l = segment_errors(pol, batch.obs_l, batch.act_l, batch.mask_l, t, noise)
        r_w = segment_errors(ref, batch.obs_w, batch.act_w, batch.mask_w, t, noise)
        r_l = segment_errors(ref, batch.obs_l, batch.act_l, batch.mask_l, t, noise)
    z = -(100.0 / 2) * ((m_w - r_w) - (m_l - r_l))
    torch.testing.assert_close(loss, -F.logsigmoid(z).mean())
    assert metrics["mse_w"] == pytest.approx(float(m_w.mean()), rel=1e-5)
    assert metrics["ref_mse_l"] == pytest.approx(float(r_l.mean()), rel=1e-5)
    assert metrics["reward_margin"] == pytest.approx(float(z.mean()), rel=1e-4, abs=1e-5)
    assert metrics["implicit_acc"] == pytest.approx(float((z > 0).float().mean()))
    loss.backward()
    assert all(p.grad is None for p in ref.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pol.parameters())


def test_at_reference_z_is_zero_loss_is_log2_and_accuracy_half():
    ref = _policy()
    pol = copy.deepcopy(ref)
    loss, m = dpo_loss(pol, ref, _batch(), beta=500.0, generator=torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert m["implicit_acc"] == 0.5 and m["reward_margin"] == 0.0


def test_one_step_raises_winner_likelihood_relative_to_loser():
    """One optimiser step on one pair: m_θ(w) − m_θ(l) falls relative to the reference,
    measured with the same t and ε, so z becomes positive."""
    ref = _policy()
    pol = copy.deepcopy(ref)
    batch = _batch(b=1, seed=3)
    t, noise = shared_noise(pol, 1, L, torch.Generator().manual_seed(11))
    before = dpo_terms(pol, ref, batch, 1000.0, t, noise)
    opt = torch.optim.SGD(pol.parameters(), lr=1e-4)
    loss, _ = dpo_loss(pol, ref, batch, 1000.0, t=t, noise=noise)
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = dpo_terms(pol, ref, batch, 1000.0, t, noise)
    gap_before = float(((before.m_w - before.ref_w) - (before.m_l - before.ref_l)).detach())
    gap_after = float(((after.m_w - after.ref_w) - (after.m_l - after.ref_l)).detach())
    assert gap_before == 0.0
    assert gap_after < 0 and float(after.z.detach()) > 0
    assert float((after.m_w - after.m_l).detach()) < float((before.m_w - before.m_l).detach())
    loss_after, _ = dpo_loss(pol, ref, batch, 1000.0, t=t, noise=noise)
    assert loss_after.item() < loss.item()


@pytest.mark.parametrize("at_reference", [True, False])
def test_swapping_winner_and_loser_flips_the_gradient(at_reference):
    """g(w,l) = −σ(−z)∇z and g(l,w) = σ(z)∇z: opposite directions (equal size at θ = ref)."""
    ref = _policy()
    pol = copy.deepcopy(ref) if at_reference else _perturb(ref)
    batch = _batch(b=1, seed=4)
    t, noise = shared_noise(pol, 1, L, torch.Generator().manual_seed(2))
    loss_a, ma = dpo_loss(pol, ref, batch, 200.0, t=t, noise=noise)
    g_a = _grad(pol, loss_a)
    loss_b, _ = dpo_loss(pol, ref, _swap(batch), 200.0, t=t, noise=noise)
    g_b = _grad(pol, loss_b)
    assert g_a.norm() > 0
    assert F.cosine_similarity(g_a, g_b, dim=0).item() == pytest.approx(-1.0, abs=1e-5)
    z = ma["reward_margin"]
    ratio = (g_a.norm() / g_b.norm()).item()
    assert ratio == pytest.approx(math.exp(-z), rel=1e-3)  # σ(−z)/σ(z) = e^{−z}
    if at_reference:
        torch.testing.assert_close(g_a, -g_b)


def test_tie_on_identical_segments_gives_zero_gradient():
    """Zero up to float rounding: |g| is ~1e-6 of the gradient of a real pair."""
    ref = _policy()
    pol = _perturb(ref)  # away from the reference, so only the tie makes the gradient vanish
    b = _batch(b=2, p=0.5)
    scale = _grad(pol, dpo_loss(pol, ref, dataclasses.replace(b, p=torch.ones(2)), 500.0,
                                generator=torch.Generator().manual_seed(0))[0]).norm().item()
    assert scale > 1e-2
    tie = PairBatch(b.obs_w, b.act_w, b.mask_w, b.obs_w.clone(), b.act_w.clone(), b.mask_w, b.p)
    loss, m = dpo_loss(pol, ref, tie, 500.0, generator=torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert _grad(pol, loss).norm().item() < 1e-5 * scale
    assert math.isnan(m["implicit_acc"]) and m["strict_pairs"] == 0 and m["tie_abs_z"] < 1e-4
    # identical segments with a strict label: also no signal (z ≡ 0 whatever θ)
    strict = dataclasses.replace(tie, p=torch.ones(2))
    loss, _ = dpo_loss(pol, ref, strict, 500.0, generator=torch.Generator().manual_seed(0))
    assert _grad(pol, loss).norm().item() < 1e-5 * scale


def test_soft_label_loss_and_its_zero_gradient_at_reference():
    ref = _policy()
    batch = _batch(b=2, p=0.5)
    pol = _perturb(ref)
    t, noise = shared_noise(pol, 2, L, torch.Generator().manual_seed(9))
    loss, _ = dpo_loss(pol, ref, batch, 300.0, t=t, noise=noise)
    z = dpo_terms(pol, ref, batch, 300.0, t, noise).z.detach()
    expected = -(0.5 * F.logsigmoid(z) + 0.5 * F.logsigmoid(-z)).mean()
    torch.testing.assert_close(loss.detach(), expected)
    at_ref = copy.deepcopy(ref)
    loss, _ = dpo_loss(at_ref, ref, batch, 300.0, t=t, noise=noise)
    assert _grad(at_ref, loss).norm().item() < 1e-6


def test_reverse_kl_is_zero_at_reference_and_positive_away_from_it():
    ref = _policy()
    obs = torch.rand(8, 2, DO) * 2 - 1
    xs, ts = sample_chain(ref, obs, torch.Generator().manual_seed(0))
    assert xs.shape == (5, 8, 4, DA) and ts.tolist() == sorted(ts.tolist(), reverse=True)
    assert not xs.requires_grad
    same = copy.deepcopy(ref)
    loss, m = reverse_kl_loss(same, ref, obs, torch.Generator().manual_seed(0))
    assert loss.item() == 0.0 and m["reverse_kl"] == 0.0
    pol = _perturb(ref)
    loss, _ = reverse_kl_loss(pol, ref, obs, torch.Generator().manual_seed(0))
    assert loss.item() > 0
    loss.backward()
    assert all(p.grad is None for p in ref.parameters())
    # one gradient step reduces it (same chain noise)
    opt = torch.optim.SGD(pol.parameters(), lr=1e-3)
    opt.step()
    after, _ = reverse_kl_loss(pol, ref, obs, torch.Generator().manual_seed(0))
    assert after.item() < loss.item()


def test_alignment_loss_combines_terms_and_validates():
    ref = _policy()
    pol = _perturb(ref)
    batch = _batch()
    bc = (torch.rand(16, 2, DO) * 2 - 1, torch.rand(16, 4, DA) * 2 - 1)
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    total, m = alignment_loss(pol, ref, batch, 100.0, "forward", lam=2.0, bc_batch=bc, generator=g())
    d, _ = dpo_loss(pol, ref, batch, 100.0, generator=g())
    assert m["loss"] == pytest.approx(m["dpo"] + 2.0 * m["bc"], rel=1e-5)
    assert m["dpo"] == pytest.approx(d.item(), rel=1e-6)
    none, m0 = alignment_loss(pol, ref, batch, 100.0, "none", generator=g())
    assert m0["reg"] == 0.0 and none.item() == pytest.approx(d.item(), rel=1e-6)
    _, mr = alignment_loss(pol, ref, batch, 100.0, "reverse", lam=1.0, states=batch.obs_w[:, 0], generator=g())
    assert mr["reverse_kl"] > 0 and mr["loss"] == pytest.approx(mr["dpo"] + mr["reverse_kl"], rel=1e-5)
    with pytest.raises(ValueError, match="needs bc_batch"):
        alignment_loss(pol, ref, batch, 100.0, "forward")
    with pytest.raises(ValueError, match="regularizer must be one of"):
        alignment_loss(pol, ref, batch, 100.0, "sideways")


def test_bc_loss_is_the_policy_denoising_loss():
    pol = _policy()
    obs, act = torch.rand(16, 2, DO), torch.rand(16, 4, DA)
    loss, m = bc_loss(pol, obs, act, torch.Generator().manual_seed(3))
    assert loss.item() == pytest.approx(pol.compute_loss(obs, act, torch.Generator().manual_seed(3)).item())
    assert m == {"bc": pytest.approx(loss.item())}


@pytest.mark.slow
def test_large_forward_kl_weight_keeps_actions_close_to_bc():
    """BC on a toy task, then DPO on pairs that push far from it: with λ = 100 the
    sampled chunks (same generator) stay much closer to BC's than with λ = 0."""
    torch.manual_seed(0)
    ref = _policy()
    g = torch.Generator().manual_seed(0)

    def data(n):
        obs = torch.rand(n, 2, DO, generator=g) * 2 - 1
        act = (0.5 * obs[:, -1, :DA])[:, None].expand(n, 4, DA).contiguous()
        return obs, act

    opt = torch.optim.Adam(ref.parameters(), 3e-3)
    for _ in range(150):
        loss = ref.compute_loss(*data(64), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ref.requires_grad_(False)
    # preferences: winners act at −0.5·obs (the opposite of the data), losers like the data
    obs, act = data(4 * L)
    obs = obs.view(4, L, 2, DO)
    good = -act.view(4, L, 4, DA)
    pairs = PairBatch(obs, good, torch.ones(4, L), obs, act.view(4, L, 4, DA), torch.ones(4, L), torch.ones(4))
    test_obs = data(64)[0]

    def aligned(lam):
        pol = copy.deepcopy(ref).requires_grad_(True)
        o = torch.optim.Adam(pol.parameters(), 1e-3)
        gen = torch.Generator().manual_seed(1)
        for _ in range(60):
            loss, _ = alignment_loss(pol, ref, pairs, 2000.0, "forward", lam=lam, bc_batch=data(64), generator=gen)
            o.zero_grad()
            loss.backward()
            o.step()
        return pol

    def chunks(p):
        return p.sample_normalized(test_obs, generator=torch.Generator().manual_seed(7))

    base = chunks(ref)
    far = (chunks(aligned(0.0)) - base).pow(2).mean().sqrt().item()
    near = (chunks(aligned(100.0)) - base).pow(2).mean().sqrt().item()
    print(f"rms distance to BC chunks: lam=0 {far:.3f}, lam=100 {near:.3f}")
    assert near < 0.5 * far, (near, far)


# -- the in-sigmoid form (FKPD's released code) and filtered BC ------------------------------
from fkpd.train.losses import filtered_bc_loss, in_sigmoid_loss  # noqa: E402


def test_in_sigmoid_loss_matches_its_formula():
    ref = _policy()
    pol = _perturb(ref)
    batch = _batch()
    t, noise = shared_noise(pol, len(batch), L, torch.Generator().manual_seed(5))
    loss, m = in_sigmoid_loss(pol, ref, batch, 100.0, c_bc=0.7, loser_weight=0.8, t=t, noise=noise)
    with torch.no_grad():
        m_w = segment_errors(pol, batch.obs_w, batch.act_w, batch.mask_w, t, noise)
        m_l = segment_errors(pol, batch.obs_l, batch.act_l, batch.mask_l, t, noise)
        r_w = segment_errors(ref, batch.obs_w, batch.act_w, batch.mask_w, t, noise)
        r_l = segment_errors(ref, batch.obs_l, batch.act_l, batch.mask_l, t, noise)
    z = -50.0 * ((m_w - 0.8 * m_l) - (r_w - 0.8 * r_l))
    u = z - 50.0 * 0.7 * 0.5 * (m_w + m_l)
    torch.testing.assert_close(loss.detach(), -F.logsigmoid(u).mean())
    assert m["bc"] == pytest.approx(float((0.5 * (m_w + m_l)).mean()), rel=1e-5)
    # a dataset L_BC is one scalar inside every pair's sigmoid; without the reference, m_ref = 0
    bc = torch.tensor(0.3)
    loss2, m2 = in_sigmoid_loss(pol, ref, batch, 100.0, c_bc=2.0, with_reference=False, bc=bc, t=t, noise=noise)
    torch.testing.assert_close(loss2.detach(), -F.logsigmoid(-50.0 * (m_w - m_l) - 50.0 * 2.0 * 0.3).mean())
    assert m2["ref_mse_w"] == 0.0 and m2["bc"] == pytest.approx(0.3)


@pytest.mark.parametrize("with_reference", [True, False])
def test_in_sigmoid_step_raises_winner_relative_to_loser_and_reference_gets_no_grad(with_reference):
    ref = _policy()
    pol = copy.deepcopy(ref)
    batch = _batch(b=1, seed=3)
    t, noise = shared_noise(pol, 1, L, torch.Generator().manual_seed(11))
    before = dpo_terms(pol, ref, batch, 1000.0, t, noise)
    opt = torch.optim.SGD(pol.parameters(), lr=1e-4)
    loss, _ = in_sigmoid_loss(pol, ref, batch, 1000.0, c_bc=1.0, with_reference=with_reference, t=t, noise=noise)
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in ref.parameters())
    opt.step()
    after = dpo_terms(pol, ref, batch, 1000.0, t, noise)
    assert float((after.m_w - after.m_l).detach()) < float((before.m_w - before.m_l).detach())
    assert float(after.z.detach()) > 0, "the winner's likelihood rose relative to the loser's"


def test_in_sigmoid_swapping_flips_the_preference_gradient():
    ref = _policy()
    pol = _perturb(ref, scale=0.0)  # θ = ref, so σ(−u) is the same both ways
    batch = _batch(b=2, seed=4)
    t, noise = shared_noise(pol, 2, L, torch.Generator().manual_seed(2))
    g = _grad(pol, in_sigmoid_loss(pol, ref, batch, 300.0, c_bc=0.0, t=t, noise=noise)[0])
    g_swap = _grad(pol, in_sigmoid_loss(pol, ref, _swap(batch), 300.0, c_bc=0.0, t=t, noise=noise)[0])
    assert g.abs().sum() > 0
    torch.testing.assert_close(g_swap, -g)
    # with the BC term, the preference part flips and the BC part (symmetric in w, l) does not:
    # g(w, l) + g(l, w) = 2·σ(−u)·(β/2)·c_bc·∇L_BC
    gb = _grad(pol, in_sigmoid_loss(pol, ref, batch, 300.0, c_bc=0.5, t=t, noise=noise)[0])
    gb_swap = _grad(pol, in_sigmoid_loss(pol, ref, _swap(batch), 300.0, c_bc=0.5, t=t, noise=noise)[0])
    obs = torch.cat([batch.obs_w, batch.obs_l])
    act = torch.cat([batch.act_w, batch.act_l])
    mask = torch.cat([batch.mask_w, batch.mask_l])
    m = segment_errors(pol, obs, act, mask, torch.cat([t, t]), torch.cat([noise, noise]))
    bc_pair = 0.5 * (m[:2] + m[2:])
    weight = torch.sigmoid(150.0 * 0.5 * bc_pair.detach())  # σ(−u) with z = 0 at θ = ref
    g_bc = _grad(pol, (weight * 150.0 * 0.5 * bc_pair).mean())
    torch.testing.assert_close(gb + gb_swap, 2 * g_bc, rtol=1e-4, atol=1e-6)


def test_in_sigmoid_tie_at_reference_has_zero_gradient():
    ref = _policy()
    pol = copy.deepcopy(ref)
    loss, m = in_sigmoid_loss(pol, ref, _batch(p=0.5), 500.0, c_bc=1.0, generator=torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and math.isnan(m["u_margin"])
    assert _grad(pol, loss).abs().max() == 0


def test_filtered_bc_trains_only_the_preferred_segments():
    ref = _policy()
    pol = _perturb(ref)
    batch = _batch(b=4)
    batch = dataclasses.replace(batch, p=torch.tensor([1.0, 0.5, 1.0, 0.5]))
    t, noise = shared_noise(pol, 4, L, torch.Generator().manual_seed(1))
    loss, m = filtered_bc_loss(pol, ref, batch, 100.0, t=t, noise=noise)
    with torch.no_grad():
        m_w = segment_errors(pol, batch.obs_w, batch.act_w, batch.mask_w, t, noise)
    torch.testing.assert_close(loss.detach(), m_w[[0, 2]].mean())
    assert m["strict_pairs"] == 2 and m["filtered_bc"] == pytest.approx(loss.item())
    # the loser never enters: changing it leaves the gradient as it is
    other = dataclasses.replace(batch, act_l=torch.zeros_like(batch.act_l))
    torch.testing.assert_close(_grad(pol, filtered_bc_loss(pol, ref, other, 100.0, t=t, noise=noise)[0]),
                               _grad(pol, filtered_bc_loss(pol, ref, batch, 100.0, t=t, noise=noise)[0]))
    ties = dataclasses.replace(batch, p=torch.full((4,), 0.5))
    assert filtered_bc_loss(pol, ref, ties, 100.0, t=t, noise=noise)[0].item() == 0.0


def test_alignment_loss_dispatches_objectives():
    ref = _policy()
    pol = _perturb(ref)
    batch = _batch()
    bc_batch = (torch.rand(8, 2, DO) * 2 - 1, torch.rand(8, 4, DA) * 2 - 1)
    for objective in ("in_sigmoid", "filtered_bc"):
        loss, m = alignment_loss(pol, ref, batch, 100.0, objective=objective, bc_batch=bc_batch,
                                 generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(loss) and m["loss"] == pytest.approx(loss.item())
    _, m = alignment_loss(pol, ref, batch, 100.0, objective="in_sigmoid", bc_source="pairs",
                          generator=torch.Generator().manual_seed(0))
    assert m["reg"] == m["bc"] > 0
    with pytest.raises(ValueError, match="needs bc_batch"):
        alignment_loss(pol, ref, batch, 100.0, objective="in_sigmoid")
    with pytest.raises(ValueError, match="objective must be one of"):
        alignment_loss(pol, ref, batch, 100.0, objective="sideways")
