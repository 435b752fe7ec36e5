"""Offline datasets in the D4RL HDF5 layout: the layout and its validation (hdf5), dataset
sources (sources: files, D4RL names, Minari), D4RL's files (d4rl), Minari (minari),
generation (generate), normalisation and training windows (windows)."""

from fkpd.data.hdf5 import (  # noqa: F401
    REQUIRED_KEYS,
    OfflineDataset,
    write_dataset,
    read_hdf5,
    validate_arrays,
    dataset_info,
)
from fkpd.data.generate import BEHAVIOURS, DataRecipe, TASK_RECIPES, generate_dataset  # noqa: F401
from fkpd.data.sources import names_a_dataset, load_dataset  # noqa: F401
from fkpd.data.windows import Normalizer, WindowSampler  # noqa: F401

__all__ = ['REQUIRED_KEYS', 'BEHAVIOURS', 'DataRecipe', 'TASK_RECIPES', 'write_dataset', 'generate_dataset',
           'OfflineDataset', 'names_a_dataset', 'load_dataset', 'read_hdf5', 'validate_arrays', 'dataset_info',
           'Normalizer', 'WindowSampler']
