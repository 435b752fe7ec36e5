"""Training windows over an offline dataset: per-dimension normalisation and (observation
history, action chunk) windows for the diffusion policy."""

from __future__ import annotations

import numpy as np
import torch

from fkpd.data.hdf5 import OfflineDataset


class Normalizer:
    """Affine map of each dimension to ``[-1, 1]`` from the data's min and max.

    Dimensions with (almost) no range map to 0 and back to their constant. Statistics are
    stored in checkpoints (DESIGN.md §3), so a policy carries its own normaliser.

    Args:
        low, high: (D,) per-dimension minimum and maximum.
    """

    def __init__(self, low: np.ndarray, high: np.ndarray, eps: float = 1e-4) -> None:
        self.low = np.asarray(low, np.float32)
        self.high = np.asarray(high, np.float32)
        if self.low.shape != self.high.shape:
            raise ValueError(f"low and high shapes differ: {self.low.shape} vs {self.high.shape}")
        span = self.high - self.low
        self.scale = np.where(span > eps, 2.0 / np.maximum(span, eps), 0.0).astype(np.float32)
        self.center = ((self.high + self.low) / 2).astype(np.float32)
        # Inverse scale, 0 for constant dimensions (which map back to their constant).
        self.inv_scale = np.divide(1.0, self.scale, out=np.zeros_like(self.scale), where=self.scale > 0)

    @classmethod
    def fit(cls, x: np.ndarray) -> "Normalizer":
        """Fit on ``x`` of shape (N, D)."""
        return cls(x.min(axis=0), x.max(axis=0))

    def normalize(self, x):
        """(..., D) raw -> (..., D) in [-1, 1]; numpy arrays or torch tensors."""
        if isinstance(x, torch.Tensor):
            return (x - torch.as_tensor(self.center, device=x.device)) * torch.as_tensor(self.scale, device=x.device)
        return (x - self.center) * self.scale

    def unnormalize(self, y):
        """(..., D) in [-1, 1] -> (..., D) raw; constant dimensions return their constant."""
        if isinstance(y, torch.Tensor):
            return y * torch.as_tensor(self.inv_scale, device=y.device) + torch.as_tensor(self.center, device=y.device)
        return y * self.inv_scale + self.center

    def state_dict(self) -> dict[str, list[float]]:
        """``{"low": [...], "high": [...]}``, JSON-serialisable (stored in checkpoints)."""
        return {"low": self.low.tolist(), "high": self.high.tolist()}

    @classmethod
    def from_state_dict(cls, d: dict[str, list[float]]) -> "Normalizer":
        """The normaliser of a :meth:`state_dict`."""
        return cls(np.asarray(d["low"], np.float32), np.asarray(d["high"], np.float32))


class WindowSampler:
    """(observation history, action chunk) windows over an :class:`OfflineDataset`.

    For every step t of every episode the window holds observations t-To+1..t (the
    first observation repeated before the episode start) and actions t..t+Ta-1 (the last
    action repeated after the episode end), as in Chi et al.'s diffusion_policy
    ``SequenceSampler`` with edge padding. Both are normalised to ``[-1, 1]``.
    Whole normalised arrays are kept as tensors and windows are gathered by index, so a
    batch costs one indexing op.

    Args:
        ds: the dataset.
        n_obs_steps: To.
        horizon: Ta, length of the predicted action chunk.
        obs_normalizer, action_normalizer: fitted on ``ds`` when not given.
    """

    def __init__(self, ds: OfflineDataset, n_obs_steps: int, horizon: int,
                 obs_normalizer: Normalizer | None = None,
                 action_normalizer: Normalizer | None = None) -> None:
        self.obs_normalizer = obs_normalizer or Normalizer.fit(ds.observations)
        self.action_normalizer = action_normalizer or Normalizer.fit(ds.actions)
        self.obs = torch.from_numpy(self.obs_normalizer.normalize(ds.observations).astype(np.float32))
        self.act = torch.from_numpy(self.action_normalizer.normalize(ds.actions).astype(np.float32))
        obs_idx, act_idx = [], []
        for s in ds.episodes():
            t = np.arange(s.start, s.stop)
            obs_idx.append(np.clip(t[:, None] + np.arange(-n_obs_steps + 1, 1)[None], s.start, s.stop - 1))
            act_idx.append(np.clip(t[:, None] + np.arange(horizon)[None], s.start, s.stop - 1))
        self.obs_index = torch.from_numpy(np.concatenate(obs_idx))  # (W, To)
        self.act_index = torch.from_numpy(np.concatenate(act_idx))  # (W, Ta)

    def __len__(self) -> int:
        return len(self.obs_index)

    def get(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows ``idx`` (B,) -> (obs (B, To, Do), actions (B, Ta, Da)), normalised."""
        return self.obs[self.obs_index[idx]], self.act[self.act_index[idx]]

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A uniformly random batch of windows (with replacement)."""
        idx = torch.randint(0, len(self), (batch_size,), generator=generator)
        return self.get(idx)
