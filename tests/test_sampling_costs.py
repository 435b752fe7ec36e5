"""Issue #15 points 4 and 5: the fused DDIM sampler gives the same actions as the
diffusers step it replaces, and the per-round costs that used to grow with every label
(implicit accuracy over all pairs, reference errors, whole-store loads) give the same
values as the full computations they stand in for."""

import dataclasses

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


# -- flat round costs: sampled implicit accuracy, cached reference errors, streamed segments ---------
from conftest_store import artifact_dir, db_url, store  # noqa: E402,F401  (fixtures are used by name)

from fkpd.prefs.segments import Segment  # noqa: E402
from fkpd.train.align import PairWindows, SegmentRef, evaluate_pairs  # noqa: E402
from fkpd.train.losses import dpo_terms, preference_nll  # noqa: E402

SMALL = dict(obs_dim=5, action_dim=2, n_obs_steps=2, horizon=4, n_action_steps=2, hidden_dim=16, n_blocks=1)


@pytest.fixture(scope="module")
def ref_and_policy():
    torch.manual_seed(0)
    cfg = PolicyConfig(**SMALL)
    ref = DiffusionPolicy(cfg, Normalizer(-np.ones(5), np.ones(5)), Normalizer(-np.ones(2), np.ones(2))).eval()
    pol = DiffusionPolicy(cfg, Normalizer(-np.ones(5), np.ones(5)), Normalizer(-np.ones(2), np.ones(2))).eval()
    pol.net.load_state_dict(ref.net.state_dict())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for prm in pol.net.parameters():
            prm.add_(torch.randn(prm.shape, generator=g) * 0.2)
    return ref, pol


def _pairs(n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)

    def seg(length):
        return Segment(rng.uniform(-1, 1, (length, 5)), rng.uniform(-1, 1, (length, 2)), rng.uniform(0, 1, length),
                       np.zeros(length, bool))

    return [(seg(int(rng.integers(2, 7))), seg(6), float(rng.choice([1.0, 1.0, 0.5]))) for _ in range(n)]


def test_sampled_implicit_accuracy_equals_full_and_its_interval_covers_it(ref_and_policy):
    ref, pol = ref_and_policy
    small = PairWindows(_pairs(40), ref)
    full = evaluate_pairs(pol, ref, small, 500.0, seed=3)
    assert full["pairs_evaluated"] == full["pairs"] == 40
    for sample in (40, 1000):  # a sample that covers every pair is the full evaluation, draw for draw
        assert evaluate_pairs(pol, ref, small, 500.0, seed=3, sample=sample) == full
    assert full["implicit_acc_low"] <= full["implicit_acc"] <= full["implicit_acc_high"]

    big = PairWindows(_pairs(300, seed=1), ref)
    exact = evaluate_pairs(pol, ref, big, 500.0, seed=5)["implicit_acc"]
    for seed in (5, 6, 7):
        est = evaluate_pairs(pol, ref, big, 500.0, seed=seed, sample=64)
        assert est["pairs_evaluated"] == 64 and est["pairs"] == 300
        assert est["implicit_acc_low"] <= exact <= est["implicit_acc_high"], (seed, est, exact)
        assert est["implicit_acc_high"] - est["implicit_acc_low"] < 0.3


class _Frozen:
    """A reference that must not run (its errors come from the cache)."""

    def __getattr__(self, name):
        raise AssertionError(f"the reference was used ({name}) although its errors were given")


def test_reference_error_cache_gives_the_same_loss_as_recomputing(ref_and_policy):
    ref, pol = ref_and_policy
    windows = PairWindows(_pairs(12), ref)
    batch = windows.batch(torch.arange(12))
    first = dpo_terms(pol, ref, batch, 500.0, generator=torch.Generator().manual_seed(2))
    again = dpo_terms(pol, _Frozen(), batch, 500.0, generator=torch.Generator().manual_seed(2),
                      reference_errors=(first.ref_w, first.ref_l))
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(preference_nll(first.z, batch.p), preference_nll(again.z, batch.p), rtol=0, atol=0)
    # before/after a round: the second evaluation reuses m_ref and equals a fresh one at the new θ
    cache: dict = {}
    before = evaluate_pairs(ref, ref, windows, 500.0, seed=4, sample=8, reference_cache=cache)
    assert before["implicit_acc"] == 0.5 and len(cache["errors"]) == 1
    after = evaluate_pairs(pol, _Frozen(), windows, 500.0, seed=4, sample=8, reference_cache=cache)
    assert after == evaluate_pairs(pol, ref, windows, 500.0, seed=4, sample=8)


def test_stored_segments_stream_through_a_bounded_cache(store, ref_and_policy):
    from fkpd.studio.batches import StoreLabeller

    ref, pol = ref_and_policy
    pairs = _pairs(10, seed=2)
    project = store.create_project("p", "metaworld/door-open-v3", "Which is better?")
    ann = store.get_or_create_annotator("ada")
    clips = []
    for i, (w, l, _) in enumerate(pairs):
        for side, seg in (("w", w), ("l", l)):
            rel, sha = store.artifacts.save_segment(f"s/{i}{side}.npz", seg.observations, seg.actions, seg.rewards)
            clips.append({"segment_path": rel, "segment_sha256": sha, "length": len(seg), "fps": 30.0})
    outcomes = ["left" if p == 1.0 else "equal" for _, _, p in pairs]
    store.add_imported_labels(project.id, ann.id, clips, [(2 * i, 2 * i + 1) for i in range(10)], outcomes)
    labels = StoreLabeller(store, project).labels()
    assert all(isinstance(s, SegmentRef) for l, r, _ in labels for s in (l, r))
    loads = []
    for l, r, _ in labels:
        for s in (l, r):
            inner = s._load
            s._load = (lambda inner=inner, key=s.key: loads.append(key) or inner())
    streamed = PairWindows([(l, r, 1.0 if p == 1.0 else 0.5) for l, r, p in labels], ref, cache_steps=12)
    assert loads == [] and len(streamed) == 10  # nothing read until a batch needs it
    memory = PairWindows(pairs, ref)
    for idx in (torch.tensor([0, 3, 9]), torch.tensor([3, 4]), torch.arange(10)):
        got, want = streamed.batch(idx), memory.batch(idx)
        for f in dataclasses.fields(got):
            torch.testing.assert_close(getattr(got, f.name), getattr(want, f.name), rtol=0, atol=0)
        assert streamed._cached_steps <= 12 or len(streamed._cache) == 1
    torch.testing.assert_close(streamed.states(30, torch.Generator().manual_seed(1)),
                               memory.states(30, torch.Generator().manual_seed(1)), rtol=0, atol=0)
    assert evaluate_pairs(pol, ref, streamed, 500.0, seed=1) == evaluate_pairs(pol, ref, memory, 500.0, seed=1)
    assert len(loads) > 20  # re-read after eviction: the cache stays bounded
