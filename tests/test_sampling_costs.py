"""Issue #15 points 4 and 5: the fused DDIM sampler gives the same actions as the
diffusers step it replaces, and the per-round costs that used to grow with every label
(implicit accuracy over all pairs, reference errors, whole-store loads) give the same
values as the full computations they stand in for."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from fkpd.data import Normalizer
from fkpd.policy import DiffusionPolicy, PolicyConfig, ddim_step, ddim_step_scaled, ddim_steps

# Actions of the policy below before the fused sampler (fkpd/policy/model.py at 6622443,
# net.forward + DDIMScheduler.step per step): rows 0..2 of the batch-3 chunk's first
# action, and the first two actions of the batch-1 chunk, for noise seed 9.
BEFORE_BATCH3_FIRST = np.array([[-0.861961, -0.726182, 0.091526],
                                [-0.30129, -0.874117, -0.364547],
                                [-0.816807, -0.762815, 0.094093]], np.float32)
BEFORE_BATCH1_FIRST2 = np.array([[-0.404439, -0.780776, 0.07319],
                                 [-0.886737, 0.265048, -0.465544]], np.float32)


def _policy(device="cpu") -> DiffusionPolicy:
    """A small policy with every weight random (FiLM included, which starts at zero)."""
    torch.manual_seed(11)
    cfg = PolicyConfig(obs_dim=6, action_dim=3, n_obs_steps=2, horizon=8, n_action_steps=4, hidden_dim=32, n_blocks=2)
    p = DiffusionPolicy(cfg, Normalizer(-np.ones(6) * 2, np.ones(6)), Normalizer(-np.ones(3), np.ones(3) * 0.5)).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for prm in p.net.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.3)
    return p.to(device)


def _hist(b: int) -> np.ndarray:
    return np.random.default_rng(1).uniform(-2, 1, (3, 2, 6)).astype(np.float32)[:b]


def _reference_chunk(p: DiffusionPolicy, hist: np.ndarray, seed: int) -> np.ndarray:
    """The textbook sampler: the whole network (``net.forward``) and ``DDIMScheduler.step``
    at every step, as the policy sampled before issue #15."""
    dev = p.device
    obs = p.obs_normalizer.normalize(torch.as_tensor(hist)).to(dev)
    x = torch.randn(len(hist), p.cfg.horizon, p.cfg.action_dim, generator=torch.Generator().manual_seed(seed)).to(dev)
    sched = p.sample_scheduler
    with torch.no_grad():
        for t in sched.timesteps:
            eps = p.net(x, obs, torch.full((len(hist),), int(t), device=dev, dtype=torch.long))
            x = sched.step(eps, int(t), x, return_dict=False)[0]
    return np.clip(p.action_normalizer.unnormalize(x.cpu()).numpy(), -1, 1)


@pytest.mark.parametrize("clip_sample", [True, False])
def test_fused_ddim_step_equals_diffusers_step(clip_sample):
    p = _policy()
    sched = DDIMScheduler.from_config(p.sample_scheduler.config, clip_sample=clip_sample)
    sched.set_timesteps(p.cfg.num_inference_steps)
    plan = ddim_steps(sched)
    assert [s.t for s in plan] == [int(t) for t in sched.timesteps]
    g = torch.Generator().manual_seed(0)
    clipped = 0
    for step in plan:
        x = torch.randn(64, 8, 3, generator=g) * 3  # large enough that x̂_0 is clipped at many entries
        eps = torch.randn(64, 8, 3, generator=g)
        x0 = (x - (1 - sched.alphas_cumprod[step.t]).sqrt() * eps) / sched.alphas_cumprod[step.t].sqrt()
        clipped += int((x0.abs() > 1).sum())
        want = sched.step(eps, step.t, x, return_dict=False)[0]
        x_before = x.clone()
        got = ddim_step(step, eps, x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert torch.equal(x, x_before)  # inputs untouched
        # the scaled form: x = 2.5·z gives x_prev = scale·z_prev
        z, scale = ddim_step_scaled(step, eps, x / 2.5, 2.5)
        torch.testing.assert_close(z * scale, want, rtol=1e-5, atol=1e-5)
    assert clipped > 0


def test_sampled_actions_unchanged_for_a_seed():
    p = _policy()
    for b in (3, 1):  # batch 1 takes the one-row path (FiLM as the LayerNorm's affine)
        got = p.predict_action_chunk(_hist(b), generator=torch.Generator().manual_seed(9))
        np.testing.assert_allclose(got, _reference_chunk(p, _hist(b), 9), rtol=0, atol=1e-5)
    np.testing.assert_allclose(p.predict_action_chunk(_hist(3), generator=torch.Generator().manual_seed(9))[:, 0],
                               BEFORE_BATCH3_FIRST, atol=2e-5)
    np.testing.assert_allclose(p.predict_action_chunk(_hist(1), generator=torch.Generator().manual_seed(9))[0, :2],
                               BEFORE_BATCH1_FIRST2, atol=2e-5)
    # another seed, another chunk; a scheduler the fused step does not cover falls back to diffusers' step
    other = p.predict_action_chunk(_hist(3), generator=torch.Generator().manual_seed(10))
    assert np.abs(other - _reference_chunk(p, _hist(3), 9)).max() > 1e-3
    p.sample_scheduler = DDIMScheduler.from_config(p.sample_scheduler.config, prediction_type="v_prediction")
    p.sample_scheduler.set_timesteps(p.cfg.num_inference_steps)
    assert ddim_steps(p.sample_scheduler) is None
    np.testing.assert_allclose(p.predict_action_chunk(_hist(3), generator=torch.Generator().manual_seed(9)),
                               _reference_chunk(p, _hist(3), 9), rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
def test_sampling_on_cuda_matches_cpu():
    cpu, gpu = _policy("cpu"), _policy("cuda")
    for b in (1, 3):
        a = cpu.predict_action_chunk(_hist(b), generator=torch.Generator().manual_seed(9))
        g = gpu.predict_action_chunk(_hist(b), generator=torch.Generator().manual_seed(9))
        np.testing.assert_allclose(g, a, atol=1e-3)
