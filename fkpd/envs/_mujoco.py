"""Helpers every simulator family shares: headless MuJoCo, quiet imports, plain scenes.

Importing this module sets ``MUJOCO_GL=egl`` when no rendering backend was chosen, so
frames render headless; every env module imports it before MuJoCo is loaded.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from typing import Any, Iterator

os.environ.setdefault("MUJOCO_GL", "egl")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence what old packages print to stderr on import (gym's and Gymnasium-Robotics'
    deprecation notices, d4rl's "failed to import" lines) and their warnings."""
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def plain_scene(mujoco_renderer: Any, shadows: bool) -> None:
    """Turn off shadows and reflections of a Gymnasium ``MujocoRenderer``'s rgb_array viewer
    (creating the viewer), unless ``shadows`` is True. With software OpenGL (Mesa
    llvmpipe) they cost ~3x the frame time and add nothing an annotator needs."""
    if shadows:
        return
    import mujoco

    viewer = mujoco_renderer._get_viewer("rgb_array")
    viewer.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
    viewer.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
