"""Frames from recorded physics states, rendered and encoded apart from the rollout.

A rollout that only records each step's physics state (``env.physics_state()``, see
:mod:`fkpd.envs._mujoco`; :func:`fkpd.policy.rollout.rollout_clips` with
``record="states"``) runs at the speed of the policy and the simulator; its frames are
made afterwards, here:

* :func:`render_states`: in this process, into an environment of the task reset with the
  clip's reset seed (the reset makes the model changes a family draws per episode:
  MetaWorld's object and goal placement, maze2d's goal disc), then one frame per state
  (``env.restore_physics_state(s)``, ``env.render()``). The frames equal those rendered
  inline during the rollout (``tests/test_render.py`` checks MetaWorld and maze2d), since
  ``render()`` draws the state itself (:func:`fkpd.envs._mujoco.refresh_kinematics`).
* :class:`ClipRenderer`: a pool of worker processes (``spawn``), each with its own
  environment and EGL context (``MUJOCO_GL=egl``), that render a clip's states at the
  displayed size and encode it as H.264 MP4 (:func:`write_video`, imageio-ffmpeg) into a
  file of the pool's scratch folder. Clips are taken in the order they were submitted,
  so with two workers the two clips of pair 1 are rendered side by side, then pair 2's,
  and so on.

Rendering is the costly part of a labelling batch on a CPU (about 40 ms per 224×224
MetaWorld frame with software OpenGL, against about 1 ms for a simulator step), so the
pool spreads it over the cores while the policy rolls out the next clips.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fkpd.envs.registry import get_task, make_env
from fkpd.envs.spec import DEFAULT_RENDER_SIZE
from fkpd.io import atomic_path


def write_video(frames: Sequence[np.ndarray] | np.ndarray, path: Path | str, fps: int = 30) -> Path:
    """Encode ``frames (T, H, W, 3) uint8`` as H.264 MP4 (yuv420p, plays in browsers).

    Written through ``imageio-ffmpeg`` to a temporary name, then renamed, so a
    half-written file never appears under ``path``.
    """
    import imageio.v2 as imageio

    path = Path(path)
    with atomic_path(path) as tmp:
        writer = imageio.get_writer(str(tmp), fps=fps, codec="libx264", pixelformat="yuv420p",
                                    macro_block_size=16, ffmpeg_log_level="error",
                                    output_params=["-movflags", "+faststart"])
        try:
            for frame in frames:
                writer.append_data(np.asarray(frame, np.uint8))
        finally:
            writer.close()
    return path


def render_states(env: Any, reset_seed: int, states: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """The frames of recorded physics states, rendered in ``env``.

    Args:
        env: an environment of the states' task from :func:`fkpd.envs.make_env` (its
            ``render_size`` and camera are the frames'); it is reset.
        reset_seed: the reset seed of the episode the states come from.
        states: (F, S) physics states (``env.physics_state()`` of that episode).

    Returns:
        (F, H, W, 3) uint8, upright (as ``env.render()``).

    Raises:
        ValueError: no states, or a state of another task's model.
    """
    if len(states) == 0:
        raise ValueError("no physics states to render: a clip has at least one frame")
    env.reset(seed=int(reset_seed))
    frames = []
    for state in states:
        env.restore_physics_state(state)
        frames.append(env.render())
    return np.asarray(frames, np.uint8)


# -- the worker processes ----------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


#: Seconds between a render process's checks that the process that made its pool lives.
PARENT_POLL_S = 1.0


def _exit_with_parent(parent: int) -> None:
    """Exit this render process once the process that made the pool is gone (killed
    without closing it, e.g. a worker SIGKILLed mid-batch): an orphan would render the
    rest of the queue for nobody, or wait on it forever, holding a core and its EGL
    context."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(0)


def _init_worker(task_id: str, render_size: tuple[int, int], camera: str | None, max_steps: int | None) -> None:
    """Build the worker's environment once (its EGL context is made by the first frame),
    and watch the parent (:func:`_exit_with_parent`)."""
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), name="fkpd-render-parent-watch",
                     daemon=True).start()
    os.environ.setdefault("MUJOCO_GL", "egl")
    _WORKER.clear()
    _WORKER["env"] = make_env(task_id, max_episode_steps=max_steps, render_size=render_size, camera=camera)


def _warm_up() -> int:
    """Render one frame, so the EGL context and textures exist before the first clip."""
    env = _WORKER["env"]
    env.reset(seed=0)
    env.render()
    return os.getpid()


def _render_clip(reset_seed: int, states: np.ndarray, path: str, fps: int) -> str:
    write_video(render_states(_WORKER["env"], reset_seed, states), path, fps=fps)
    return path


def _render_frames(reset_seed: int, states: np.ndarray) -> np.ndarray:
    return render_states(_WORKER["env"], reset_seed, states)


def default_render_workers() -> int:
    """Render processes of a :class:`ClipRenderer`: the CPU count, between 1 and 4."""
    return max(1, min(os.cpu_count() or 1, 4))


class ClipRenderer:
    """Worker processes that render recorded states into MP4 clips (see the module docstring).

    Args:
        task_id: the task of every clip.
        render_size: ``(height, width)`` of the frames in pixels (the size the clips are
            shown at).
        fps: playback rate of the clips (default: the task's).
        workers: processes (default :func:`default_render_workers`).
        camera: camera name (default: the task's).
        max_steps: the environments' horizon (only their reset depends on it).

    Use as a context manager, or call :meth:`close`: the scratch folder of rendered files
    not yet collected is removed with the pool.
    """

    def __init__(self, task_id: str, render_size: tuple[int, int] = DEFAULT_RENDER_SIZE, fps: int | None = None,
                 workers: int | None = None, camera: str | None = None, max_steps: int | None = None) -> None:
        spec = get_task(task_id)
        self.task_id = spec.task_id
        self.fps = int(fps or spec.fps)
        self.workers = max(1, int(workers or default_render_workers()))
        self._scratch = Path(tempfile.mkdtemp(prefix="fkpd-render-"))
        self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                         initargs=(self.task_id, tuple(render_size), camera, max_steps))
        # start every worker now: spawning, imports and the first frame overlap whatever the
        # caller does next (loading the policy, rolling out the first clips)
        self._warm = [self._pool.submit(_warm_up) for _ in range(self.workers)]

    def submit(self, reset_seed: int, states: np.ndarray) -> Future:
        """Render and encode one clip in a worker.

        Args:
            reset_seed: the reset seed of the episode the states come from.
            states: (F, S) physics states, one per frame.

        Returns:
            A future of the MP4's path in the pool's scratch folder; the caller moves or
            reads it (it is deleted with the pool). Its ``result()`` raises what the
            worker raised (e.g. ValueError for states of another task).
        """
        path = self._scratch / f"{uuid.uuid4().hex}.mp4"
        return self._pool.submit(_render_clip, int(reset_seed), np.asarray(states, np.float64), str(path), self.fps)

    def frames(self, reset_seed: int, states: np.ndarray) -> Future:
        """Render one clip's frames in a worker; a future of ``(F, H, W, 3) uint8``."""
        return self._pool.submit(_render_frames, int(reset_seed), np.asarray(states, np.float64))

    def close(self, cancel: bool = False) -> None:
        """Stop the workers (after the submitted clips, or dropping those not started when
        ``cancel``) and remove the scratch folder."""
        self._pool.shutdown(wait=True, cancel_futures=cancel)
        shutil.rmtree(self._scratch, ignore_errors=True)

    def __enter__(self) -> "ClipRenderer":
        return self

    def __exit__(self, exc_type, *_: Any) -> None:
        self.close(cancel=exc_type is not None)
