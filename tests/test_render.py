"""Rendering apart from rolling out (physics states -> frames in worker processes) and
progressive batches (a batch is labelable pair by pair as its clips land)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from conftest_store import artifact_dir, db_url, store, wait_for  # noqa: F401  (fixtures are used by name)
from fkpd.data import Normalizer
from fkpd.envs import get_task, make_env
from fkpd.envs.render import ClipRenderer, render_states
from fkpd.policy import DiffusionPolicy, PolicyConfig
from fkpd.policy.rollout import ClipRequest, Episode, rollout_clips
from fkpd.prefs.pairs import PairPlan, RolledClip, rollout_pairs
from fkpd.prefs.segments import Segment

MW, MAZE = "metaworld/door-open-v3", "d4rl/maze2d-umaze"
SIZE = (48, 48)


def tiny_policy(task: str) -> DiffusionPolicy:
    spec = get_task(task)
    torch.manual_seed(0)
    cfg = PolicyConfig(obs_dim=spec.obs_dim, action_dim=spec.action_dim, hidden_dim=32, n_blocks=1, horizon=4,
                       n_action_steps=2, num_train_timesteps=20, num_inference_steps=4)
    return DiffusionPolicy(cfg, Normalizer(-np.ones(spec.obs_dim), np.ones(spec.obs_dim)),
                           Normalizer(-np.ones(spec.action_dim), np.ones(spec.action_dim)), task_id=task)


def assert_same_frames(a: np.ndarray, b: np.ndarray) -> None:
    """Equal frames, up to a tight tolerance: at most 0.1% of the pixel values differ, by
    at most 2 levels (a GL driver may round differently; here they are bit-equal)."""
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= 2 and (diff > 0).mean() <= 1e-3, (diff.max(), (diff > 0).mean())


@pytest.fixture(scope="module", params=[MW, MAZE])
def rolled(request):
    """One task's clips rolled out twice in lock step from the same requests: frames
    rendered inline, and physics states recorded instead."""
    task = request.param
    policy = tiny_policy(task)
    envs = [make_env(task, max_episode_steps=12, render_size=SIZE) for _ in range(2)]
    reqs = [ClipRequest(reset_seed=7, noise_seed=1, max_steps=10, render_from=3),
            ClipRequest(reset_seed=8, noise_seed=2, max_steps=10, render_from=0)]
    inline = rollout_clips(policy, envs, reqs)
    states = rollout_clips(policy, envs, reqs, record="states")
    yield task, reqs, inline, states, envs[0]
    for env in envs:
        env.close()


def test_frames_from_states_equal_frames_rendered_inline(rolled):
    task, reqs, inline, recorded, env = rolled
    for req, a, b in zip(reqs, inline, recorded):
        np.testing.assert_array_equal(a.actions, b.actions)  # recording states changes nothing in the rollout
        np.testing.assert_array_equal(a.observations, b.observations)
        assert b.frames is None and a.states is None
        assert len(b.states) == len(a.frames) == 10 - req.render_from + 1  # initial frame included
        assert a.frames.std() > 0
        assert_same_frames(render_states(env, req.reset_seed, b.states), a.frames)
    with pytest.raises(ValueError, match="no physics states"):
        render_states(env, 7, np.zeros((0, 3)))


@pytest.mark.parametrize("task", [MW, MAZE])
def test_plain_scene_drops_shadows_reflections_and_multisampling_unless_asked(task):
    """The default look renders without shadows, reflections and MSAA (the costly parts in
    software OpenGL); ``shadows=True`` keeps the model's own settings."""
    import mujoco

    def viewer_of(env):
        inner = env._env.point_env if task == MAZE else env._env
        return inner.mujoco_renderer, inner.model

    plain, full = make_env(task, render_size=SIZE), make_env(task, render_size=SIZE, shadows=True)
    try:
        (rp, mp), (rf, mf) = viewer_of(plain), viewer_of(full)
        model_samples = int(mf.vis.quality.offsamples)  # the model's own, before any render
        frames = []
        for env in (plain, full):
            env.reset(seed=3)
            frames.append(env.render())
        vp, vf = rp._get_viewer("rgb_array"), rf._get_viewer("rgb_array")
        assert int(mp.vis.quality.offsamples) == 0 and int(mf.vis.quality.offsamples) == model_samples > 0
        for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION):
            assert vp.scn.flags[flag] == 0 and vf.scn.flags[flag] == 1
        assert frames[0].shape == frames[1].shape == (*SIZE, 3) and frames[0].std() > 0
    finally:
        plain.close()
        full.close()


def test_clip_renderer_processes_render_and_encode_the_same_frames(rolled, tmp_path):
    import imageio.v2 as imageio

    task, reqs, inline, recorded, _ = rolled
    if task != MAZE:
        pytest.skip("one task is enough for the worker processes (MetaWorld's frames: the test above)")
    with ClipRenderer(task, SIZE, workers=1) as renderer:
        frames = renderer.frames(reqs[1].reset_seed, recorded[1].states)
        video = renderer.submit(reqs[1].reset_seed, recorded[1].states)
        wrong = renderer.frames(7, np.zeros((2, 99)))  # a state of another model
        assert_same_frames(frames.result(timeout=120), inline[1].frames)
        decoded = [f for f in imageio.get_reader(video.result(timeout=120))]  # (list() asks len: inf)
        assert len(decoded) == len(inline[1].frames) and decoded[0].shape == (*SIZE, 3)
        with pytest.raises(ValueError, match="another task"):
            wrong.result(timeout=120)


# --------------------------------------------------------------------------- progressive batches


def tiny_clip(k: int, side: int, frames: bool = True) -> RolledClip:
    rng = np.random.default_rng(k * 2 + side)
    obs, act, rew = rng.normal(size=(4, 3)), rng.uniform(-1, 1, size=(4, 2)), rng.normal(size=4)
    success = np.zeros(4, bool)
    episode = Episode(reset_seed=k, observations=obs, actions=act, rewards=rew, success=success,
                      frames=rng.integers(0, 255, size=(5, 16, 16, 3), dtype=np.uint8) if frames else None)
    request = ClipRequest(reset_seed=k, noise_seed=100 + side, max_steps=4, render_from=0)
    segment = Segment(observations=obs, actions=act, rewards=rew, success=success, reset_seed=k)
    return RolledClip(pair=k, side=side, request=request, episode=episode, segment=segment)


def project_of(store, task: str):
    project = store.create_project("prog", task, "Pick one.", {"labels_per_pair": 1}, exist_ok=True)
    return project, store.add_policy_version(project.id, round=0)


def offered_pairs_are_whole(store, project, annotator) -> list[int]:
    """Lease what an annotator is offered; check both videos of each are on disk with the
    sha256 their clip rows record (the Label page plays them). Returns the pair ids."""
    ids = []
    for pair in store.lease_pairs(project.id, annotator, 2):
        for view in (pair.left, pair.right):
            clip = store.get_clip(view.id)
            store.artifacts.verify(clip.video_path, clip.video_sha256)  # raises when missing or partial
            store.artifacts.verify(clip.segment_path, clip.segment_sha256)
        store.release(pair.id, annotator)
        ids.append(pair.id)
    return ids


def test_a_batch_is_labelable_pair_by_pair_and_never_offers_half_a_pair(store):
    from fkpd.studio.batches import StoreLabeller

    project, version = project_of(store, MW)
    ada = store.get_or_create_annotator("ada")
    labeller = StoreLabeller(store, project)
    write = labeller.clip_writer(version, 1, 6)
    write(tiny_clip(0, 0))
    write(tiny_clip(0, 1))
    # the first pair is labelable while pairs 1 and 2 are not even rolled out yet
    first = wait_for(lambda: offered_pairs_are_whole(store, project, ada), what="the batch's first pair")
    assert len(first) == 1 and store.next_pair(project.id, ada).round == 1
    store.release(first[0], ada)
    write(tiny_clip(1, 1))  # half of pair 1: never offered, its files not even written
    write(tiny_clip(2, 0))
    write(tiny_clip(2, 1))  # pair 2 is whole, but waits for pair 1: pairs come in batch order
    time.sleep(0.5)
    assert offered_pairs_are_whole(store, project, ada) == first
    assert not list(store.artifact_dir.glob("projects/*/batches/*/p001_*"))
    write(tiny_clip(1, 0))
    labeller.request(1, [None] * 3)
    ids = labeller.pair_ids.pop(1)
    assert ids[0] == first[0] and ids == sorted(ids) and store.batch_progress(project.id, 1) == (0, 3)
    offered = store.lease_pairs(project.id, ada, 3)  # oldest first: the batch's order
    assert [store.get_clip(pair.left.id).meta["pair"] for pair in offered] == [0, 1, 2]
    # a retried job registers only the pairs it has not: the batch indices it wrote are known
    assert store.batch_pair_indices(project.id, 1, None) == {0, 1, 2}
    labeller.skip[1] = {0, 1}
    write = labeller.clip_writer(version, 1, 6)
    for k in range(3):
        write(tiny_clip(k, 0))
        write(tiny_clip(k, 1))
    labeller.request(1, [None] * 3)
    assert len(labeller.pair_ids.pop(1)) == 1 and store.batch_progress(project.id, 1) == (0, 4)
    with pytest.raises(ValueError, match="neither frames nor physics states"):
        labeller.clip_writer(version, 2, 2)(tiny_clip(0, 0, frames=False))
    labeller.abort(2)


def test_clips_recorded_as_states_are_rendered_in_processes_and_registered_as_they_land(store):
    """The app's path on maze2d: lock-step rollout recording states, a render process,
    pairs registered one by one; an annotator polling all along is only ever offered pairs
    whose two videos are whole."""
    from fkpd.studio.batches import StoreLabeller

    project, version = project_of(store, MAZE)
    ada = store.get_or_create_annotator("ada")
    policy = tiny_policy(MAZE)
    envs = [make_env(MAZE, max_episode_steps=12, render_size=SIZE) for _ in range(2)]
    plan = PairPlan.for_round(0, 1, 3, 12, 6)
    labeller = StoreLabeller(store, project, render_size=SIZE, render_workers=1)
    seen: list[tuple[int, ...]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def annotator() -> None:
        while not stop.is_set():
            try:
                seen.append(tuple(offered_pairs_are_whole(store, project, ada)))
            except BaseException as exc:  # noqa: BLE001 (a missing or partial video: the test fails below)
                errors.append(exc)
            stop.wait(0.05)

    poller = threading.Thread(target=annotator)
    poller.start()
    try:
        pairs = rollout_pairs(policy, envs, plan, render=True, task_id=MAZE, record="states",
                              on_clip=labeller.clip_writer(version, 1, 6))
        labeller.request(1, pairs)
    finally:
        stop.set()
        poller.join()
        for env in envs:
            env.close()
    ids = labeller.pair_ids.pop(1)
    assert len(ids) == 3 and store.batch_progress(project.id, 1) == (0, 3)
    clip = store.get_clip(store.lease_pairs(project.id, ada, 1)[0].left.id)
    assert clip.meta["pair"] == 0 and clip.reset_seed == plan.reset_seeds[0] and clip.length == 6
    import imageio.v2 as imageio

    assert sum(1 for _ in imageio.get_reader(store.resolve(clip.video_path))) == 7  # L + 1 frames
    assert not errors and len(seen) > 1 and seen[-1] == tuple(ids[:2])


def test_top_ups_wait_until_the_job_adding_the_batch_pair_by_pair_has_ended(store):
    """A top-up continues the round's pair index after the pairs it has: while the job that
    registered the served version still adds its batch, that index is not final."""
    from conftest_store import make_clips

    from fkpd.studio.topup import maybe_top_up, top_up_state

    project = store.create_project("proj", MW, "", exist_ok=True)
    job = store.jobs.enqueue(project.id, "bootstrap", {})
    ckpt, _ = store.write_artifact_atomic("ckpt/model.safetensors", b"weights")
    version = store.add_policy_version(project.id, ckpt, round=0, metrics={"job_id": job.id})
    store.add_pairs(project.id, [tuple(make_clips(store, version.id, 0))], round=1)  # the batch's first pair
    assert store.jobs.claim("w").id == job.id
    state = top_up_state(store, project)
    assert (state.round_pairs, state.rendering, state.batch_ready) == (1, True, False)
    assert maybe_top_up(store, project) is None
    store.jobs.finish(job.id, {}, worker_id="w")
    state = top_up_state(store, project)
    assert (state.rendering, state.batch_ready) == (False, True) and maybe_top_up(store, project) is not None


def test_render_processes_exit_when_their_parent_is_killed(tmp_path):
    """A worker killed mid-batch (SIGKILL: no cleanup) must not leave its render
    processes behind, rendering for nobody (seen after a benchmark stopped its app)."""
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "parent.py"
    script.write_text(
        "import time\n"
        "from fkpd.envs.render import ClipRenderer\n"
        "if __name__ == '__main__':\n"
        "    r = ClipRenderer('metaworld/door-open-v3', render_size=(32, 32), workers=1)\n"
        "    print(r._warm[0].result(timeout=120), flush=True)\n"
        "    time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "MUJOCO_GL": "egl"})
    try:
        child = int(parent.stdout.readline())
        os.kill(child, 0)  # the render process runs
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)

        def gone() -> bool:  # no such process, or a zombie (exited, not yet reaped by init)
            try:
                with open(f"/proc/{child}/stat") as fh:
                    return fh.read().rsplit(") ", 1)[1].startswith("Z")
            except FileNotFoundError:
                return True

        wait_for(gone, 15, what="the orphaned render process to exit")
    finally:
        parent.kill()
