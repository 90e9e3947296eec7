"""Data sources and transforms. Nothing here knows about training."""
import numpy as np
import torch

from .sources import DataError, ImageSet, load_cifar
from .transforms import (CROP_RATIO, CROP_SCALE, FLIP_P, GRAYSCALE_P, JITTER, MEAN_STD,
                         AugmentedViews, Plain, test_transform, train_transform)

__all__ = ['DATASETS', 'DataError', 'ImageSet', 'load_dataset', 'random_subset_indices',
           'CROP_RATIO', 'CROP_SCALE', 'FLIP_P', 'GRAYSCALE_P', 'JITTER', 'MEAN_STD',
           'AugmentedViews', 'Plain', 'test_transform', 'train_transform']

DATASETS = ('cifar10', 'cifar100')


def load_dataset(name, root, download=True, subset=None, seed=0):
    """(train, test) ImageSets of dataset `name` found under `root` (see datasets.sources).

    `subset`: keep a seeded random `subset` images of each split (seed for train, seed + 1
    for test), in dataset order; only those are decoded.
    """
    select = None
    if subset is not None:
        def select(split, count):
            return random_subset_indices(count, subset, seed + (split == 'test'))
    if name in ('cifar10', 'cifar100'):
        return load_cifar(name, root, download, select)
    raise DataError(f'unknown dataset {name!r}; choose from {", ".join(DATASETS)}')


def random_subset_indices(count, size, seed):
    """A seeded random choice of `size` of `count` indexes, sorted (all if size >= count)."""
    if size >= count:
        return np.arange(count)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(count, generator=generator)[:size].sort().values.numpy()
