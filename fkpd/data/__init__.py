"""Offline datasets in the D4RL HDF5 layout: reading, validation, generation, normalisation and windows."""

from fkpd.data.hdf5 import (  # noqa: F401
    REQUIRED_KEYS,
    BEHAVIOURS,
    DataRecipe,
    TASK_RECIPES,
    write_dataset,
    generate_dataset,
    OfflineDataset,
    names_a_dataset,
    load_dataset,
    validate_arrays,
    dataset_info,
    Normalizer,
    WindowSampler,
)

__all__ = ['REQUIRED_KEYS', 'BEHAVIOURS', 'DataRecipe', 'TASK_RECIPES', 'write_dataset', 'generate_dataset', 'OfflineDataset', 'names_a_dataset', 'load_dataset', 'validate_arrays', 'dataset_info', 'Normalizer', 'WindowSampler']
