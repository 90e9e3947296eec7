"""Data sources and transforms. Nothing here knows about training.

The transforms (torch, torchvision) are imported on first use, so that the dataset names and
DataError can be read without torch: the command lines parse their flags before importing it
(seconds).
"""
import hashlib
import importlib
import importlib.metadata

import numpy as np

from .decoding import DecodingError, Reading, ReadStats, cpu_count
from .file_kind import describe_bytes, describe_file
from .folders import FolderError, is_class_tree, list_class_tree, list_images
from .image_cache import ImageCache, default_folder as default_cache_folder
from .image_rows import ImageRows, channel_statistics
from .images import (IMAGE_EXTENSIONS, READER_VERSION, ImageNotes, UnreadableImage,
                     decode_image, failure_reason, fit_square, open_image, shown, to_rgb)
from .sources import (UNLABELED, DataError, ImageSet, describe_fingerprint, folder_layout,
                      load_cifar, load_folder, load_svhn, stored_train_size)

__all__ = ['DATASETS', 'FIXED_SIZE', 'UNLABELED', 'DataError', 'ImageSet', 'load_dataset',
           'DecodingError', 'Reading', 'ReadStats', 'cpu_count', 'ImageCache',
           'default_cache_folder', 'ImageRows', 'channel_statistics',
           'import_torchvision', 'mean_std', 'random_subset_indices', 'IMAGE_EXTENSIONS',
           'READER_VERSION', 'ImageNotes', 'UnreadableImage', 'decode_image', 'describe_bytes',
           'describe_file', 'failure_reason', 'describe_fingerprint', 'fit_square', 'open_image',
           'shown', 'to_rgb', 'folder_layout', 'FolderError', 'is_class_tree',
           'list_class_tree', 'list_images', 'stored_train_size',
           'CROP_RATIO', 'CROP_SCALE', 'FLIP_P', 'GRAYSCALE_P', 'JITTER', 'MEAN_STD',
           'AugmentedViews', 'Plain', 'image_transform', 'test_transform', 'train_transform']

DATASETS = ('cifar10', 'cifar100', 'svhn', 'stl10', 'folder')
FIXED_SIZE = {'cifar10': 32, 'cifar100': 32, 'svhn': 32, 'stl10': 96}   # their image sides
TRANSFORMS = ('CROP_RATIO', 'CROP_SCALE', 'FLIP_P', 'GRAYSCALE_P', 'JITTER', 'MEAN_STD',
              'AugmentedViews', 'Plain', 'image_transform', 'test_transform', 'train_transform')


def __getattr__(name):
    """The names of datasets/transforms.py (torch, torchvision), imported when first asked for."""
    if name in TRANSFORMS:
        return getattr(importlib.import_module('.transforms', __name__), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def import_torchvision():
    """torchvision (and torch), or a DataError saying in one line that the two cannot work
    together. A torchvision built for another torch release fails at import with a 30-line
    traceback ending in `operator torchvision::nms does not exist`. The command lines call this
    right after parsing their flags, before anything else imports torchvision (transforms.py
    imports it through here too)."""
    try:
        import torchvision
    except ModuleNotFoundError as err:
        raise DataError(f'{err.name} is not installed: pip install -r requirements.txt') \
            from None
    except Exception as err:    # RuntimeError, ImportError, OSError: whatever the pair raises
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise DataError(f'torch {installed("torch")} and torchvision {installed("torchvision")} '
                        f'do not match ({reason}): install a matching pair, e.g. pip install '
                        f'--upgrade torch torchvision (on a machine without a GPU add '
                        f'--index-url https://download.pytorch.org/whl/cpu)') from None
    return torchvision


def installed(package):
    """The installed version of `package`, read without importing it."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return 'unknown'


def load_dataset(name, root, download=True, subset=None, seed=0, image_size=None,
                 reading=None):
    """(train, test) ImageSets of dataset `name` found under `root` (see datasets.sources);
    test is None for an unlabeled folder (`--dataset folder` on a folder without train/).

    `subset`: keep a seeded random `subset` images of each split (seed for train, seed + 1
    for test), in dataset order; only those are decoded. `image_size` matters for `folder`
    only (the other datasets have their FIXED_SIZE; None: that size, 32 for folder).
    `reading` (a Reading): how image files are decoded (processes, the cache); default: in
    this process, without a cache.
    """
    select = None
    if subset is not None:
        def select(split, count):
            return random_subset_indices(count, subset, seed + (split == 'test'))
    if name in FIXED_SIZE and image_size not in (None, FIXED_SIZE[name]):
        raise DataError(f'{name} images are {FIXED_SIZE[name]} px; --image-size '
                        f'{image_size} is for --dataset folder')
    if name in ('cifar10', 'cifar100'):
        return load_cifar(name, root, download, select, reading)
    if name == 'svhn':
        return load_svhn(root, download, select)
    if name == 'stl10':
        from .stl10 import load_stl10
        return load_stl10(root, download, select, reading.cache if reading else None)
    if name == 'folder':
        return load_folder(root, image_size or 32, select, reading)
    raise DataError(f'unknown dataset {name!r}; choose from {", ".join(DATASETS)}')


def mean_std(name, train_set, cache=None):
    """The normalisation of dataset `name`: the released constants, or for `folder` and
    `stl10` computed from the training images with the convention of those constants
    (per-channel mean over all pixels; std = the mean over images of each image's per-channel
    standard deviation), read chunk by chunk; kept in `cache` (an ImageCache) under the
    images' fingerprint, so a second start does not read them all again."""
    from .transforms import MEAN_STD
    if name in MEAN_STD:
        return MEAN_STD[name]

    def compute():
        mean, std = channel_statistics(train_set.images)
        return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]
    if cache is None:
        mean, std = compute()
    else:
        key = hashlib.sha1(repr((train_set.fingerprint['content'], len(train_set),
                                 tuple(train_set.images.shape[1:]))).encode()).hexdigest()
        mean, std = cache.memo('statistics', key, compute)
    return tuple(mean), tuple(std)


def random_subset_indices(count, size, seed):
    """A seeded random choice of `size` of `count` indexes, sorted (all if size >= count)."""
    if size >= count:
        return np.arange(count)
    import torch
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(count, generator=generator)[:size].sort().values.numpy()
