"""Helpers every simulator family shares: headless MuJoCo, quiet imports, plain scenes,
physics states.

Importing this module sets ``MUJOCO_GL=egl`` when no rendering backend was chosen, so
frames render headless; every env module imports it before MuJoCo is loaded.

Physics states (:func:`physics_state`, :func:`restore_physics_state`) let a rollout record
what each frame shows and another process render the frames later
(:mod:`fkpd.envs.render`): MuJoCo's full physics state plus the mocap poses
(``mj_getState``: time, ``qpos``, ``qvel``, actuator activations,
plugin state, mocap positions and orientations). Everything a frame shows besides the model follows from it through the
position stage of the pipeline (:func:`refresh_kinematics`); what a family changes in the
*model* at reset (MetaWorld's object and goal placement, maze2d's goal disc) is made again
by resetting a second environment with the same seed.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from typing import Any, Iterator

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence what old packages print to stderr on import (gym's and Gymnasium-Robotics'
    deprecation notices, d4rl's "failed to import" lines) and their warnings."""
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def plain_scene(mujoco_renderer: Any, shadows: bool) -> None:
    """Turn off shadows, reflections and multisample anti-aliasing of a Gymnasium
    ``MujocoRenderer``'s rgb_array viewer (creating the viewer), unless ``shadows`` is True.

    With software OpenGL (Mesa llvmpipe) they add nothing an annotator needs and cost most
    of the frame: shadows and reflections ~3x the frame time; MuJoCo's default 4x
    multisampling (``model.vis.quality.offsamples``, read when the viewer's context is
    made, so it is set first) ~2.3x on a 224x224 MetaWorld frame (27 vs 12 ms per frame,
    one run beside other work; edges are a little jaggier, the mean pixel differs by 1/255).
    ``python bench/bench_policy.py`` prints the render figures.
    """
    if shadows:
        return
    import mujoco

    mujoco_renderer.model.vis.quality.offsamples = 0
    viewer = mujoco_renderer._get_viewer("rgb_array")
    viewer.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
    viewer.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0


def _state_spec() -> int:
    """The parts of a recorded state: ``mjSTATE_FULLPHYSICS | mjSTATE_MOCAP_POS | mjSTATE_MOCAP_QUAT``
    (MetaWorld moves its hand through a mocap body)."""
    import mujoco

    s = mujoco.mjtState
    return int(s.mjSTATE_FULLPHYSICS | s.mjSTATE_MOCAP_POS | s.mjSTATE_MOCAP_QUAT)


def physics_state(model: Any, data: Any) -> np.ndarray:
    """The physics state of ``data``: ``(S,) float64`` from MuJoCo's ``mj_getState`` with
    ``mjSTATE_FULLPHYSICS | mjSTATE_MOCAP_POS | mjSTATE_MOCAP_QUAT`` (S = ``mj_stateSize``
    of the model for that selection)."""
    import mujoco

    spec = _state_spec()
    state = np.empty(mujoco.mj_stateSize(model, spec), np.float64)
    mujoco.mj_getState(model, data, state, spec)
    return state


def restore_physics_state(model: Any, data: Any, state: np.ndarray) -> None:
    """Set ``data`` to a state from :func:`physics_state` (``mj_setState``) and recompute
    everything that follows from it (``mj_forward``).

    Raises:
        ValueError: ``state`` does not have the model's state size (a state of another
            task or model).
    """
    import mujoco

    spec = _state_spec()
    state = np.ascontiguousarray(state, np.float64)
    size = mujoco.mj_stateSize(model, spec)
    if state.shape != (size,):
        raise ValueError(f"a physics state of this model has {size} numbers, got shape {state.shape}: "
                         "was it recorded in another task's environment?")
    mujoco.mj_setState(model, data, state, spec)
    mujoco.mj_forward(model, data)


def refresh_kinematics(model: Any, data: Any) -> None:
    """Recompute what a frame draws from the current positions: body, geom and site poses,
    cameras and lights, tendons and flexes (the position stage of ``mj_forward``:
    ``mj_kinematics``, ``mj_comPos``, ``mj_camlight``, ``mj_flex``, ``mj_tendon``).

    ``mj_step`` leaves these one substep behind ``qpos`` (it integrates after computing
    them), so a frame rendered right after a step would show the state before the step's
    last substep; renderers call this first, so a frame shows the state itself, the
    same whether rendered inline or from a recorded state. It changes no dynamics: the
    next ``mj_step`` recomputes all of it from ``qpos``.
    """
    import mujoco

    mujoco.mj_kinematics(model, data)
    mujoco.mj_comPos(model, data)
    mujoco.mj_camlight(model, data)
    mujoco.mj_flex(model, data)
    mujoco.mj_tendon(model, data)
