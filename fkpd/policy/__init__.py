"""The diffusion policy: configuration, network, checkpoints and rollouts."""

from fkpd.policy.model import (  # noqa: F401
    CHECKPOINT_FORMAT,
    WEIGHTS_FILE,
    CONFIG_FILE,
    pick_device,
    PolicyConfig,
    NoiseNet,
    make_schedulers,
    DDIMStep,
    ddim_steps,
    ddim_step,
    ddim_step_scaled,
    DiffusionPolicy,
    checkpoint_dir,
    read_checkpoint_meta,
)

__all__ = ['CHECKPOINT_FORMAT', 'WEIGHTS_FILE', 'CONFIG_FILE', 'pick_device', 'PolicyConfig', 'NoiseNet', 'make_schedulers', 'DDIMStep', 'ddim_steps', 'ddim_step', 'ddim_step_scaled', 'DiffusionPolicy', 'checkpoint_dir', 'read_checkpoint_meta']
