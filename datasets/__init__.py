"""Data sources and transforms. Nothing here knows about training.

The transforms (torch, torchvision) are imported on first use, so that the dataset names and
DataError can be read without torch: the command lines parse their flags before importing it
(seconds).
"""
import hashlib
import importlib
import importlib.metadata
import os
import shutil

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
    together, and why. A torchvision built for another torch release, or another build of the
    same release (CPU against CUDA), fails at import with a 30-line traceback ending in
    `operator torchvision::nms does not exist`. The command lines call this right after parsing
    their flags, before anything else imports torchvision (transforms.py imports it through
    here too)."""
    try:
        import torchvision
    except ModuleNotFoundError as err:
        raise DataError(f'{err.name} is not installed: pip install -r requirements.txt') \
            from None
    except Exception as err:    # RuntimeError, ImportError, OSError: whatever the pair raises
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise DataError(mismatch_message(torch_build(), torchvision_build(), reason,
                                         nvidia_gpu())) from None
    return torchvision


# torchvision 0.N comes with torch 2.(N - 15): 0.26 with 2.11, 0.29 with 2.14.
TORCHVISION_MINOR_OFFSET = 15
CPU_INDEX = 'https://download.pytorch.org/whl/cpu'


def torch_build():
    """torch's version with its build ('2.13.0+cpu'; '2.14.1' is the default build, CUDA on
    Linux), read by importing it (torch itself imports; only the pair fails)."""
    try:
        import torch
        return torch.__version__
    except Exception:           # noqa: BLE001 (then the installed metadata says what it can)
        return installed('torch')


def torchvision_build():
    """torchvision's version with its build ('0.28.0+cu128'), from its version.py, without
    importing it (the import is what fails)."""
    import importlib.util
    try:
        spec = importlib.util.find_spec('torchvision')
        folder = (spec.submodule_search_locations or [None])[0]
        with open(os.path.join(folder, 'version.py')) as f:
            for line in f:
                if line.startswith('__version__'):
                    return line.split('=', 1)[1].strip().strip('\'"')
    except (AttributeError, TypeError, OSError, ValueError):
        pass
    return installed('torchvision')


def installed(package):
    """The installed version of `package` from its metadata, without importing it ('unknown'
    when none is found)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return 'unknown'


def nvidia_gpu():
    """Whether this machine has an NVIDIA GPU (its driver is loaded)."""
    return os.path.isdir('/proc/driver/nvidia') or shutil.which('nvidia-smi') is not None


def _release_and_build(version):
    release, _, build = version.partition('+')
    return release, build


def _build_words(build):
    if build == 'cpu':
        return 'a CPU build'
    if build.startswith('cu'):
        return f'a CUDA {build[2:-1]}.{build[-1]} build'
    if build.startswith('rocm'):
        return 'a ROCm build'
    return 'the default build'


def mismatch_message(torch_version, vision_version, reason, gpu):
    """Why torch `torch_version` and torchvision `vision_version` ('2.13.0+cpu', '0.28.0+cu128')
    do not work together, and the pip command that fits this machine (`gpu`: an NVIDIA GPU is
    present): one release of torchvision for another of torch, or one release in two builds."""
    torch_release, torch_kind = _release_and_build(torch_version)
    vision_release, vision_kind = _release_and_build(vision_version)
    try:
        _, minor, patch = (int(v) for v in (torch_release.split('.') + ['0'])[:3])
        wanted_vision = f'0.{minor + TORCHVISION_MINOR_OFFSET}'
    except ValueError:
        wanted_vision = None
    machine = 'this machine has an NVIDIA GPU' if gpu else 'this machine has no NVIDIA GPU'
    # (uninstalled first: pip takes an installed 2.13.0+cpu for ==2.13.0 and changes nothing)
    if wanted_vision is None:
        fix = 'pip install --upgrade torch torchvision'
    elif gpu:
        fix = (f'pip uninstall -y torch torchvision && pip install torch=={torch_release} '
               f'torchvision=={wanted_vision}.{patch}')
    else:
        fix = (f'pip uninstall -y torch torchvision && pip install torch=={torch_release}+cpu '
               f'torchvision=={wanted_vision}.{patch}+cpu --index-url {CPU_INDEX}')
    if wanted_vision is None and not gpu:
        fix += f' --index-url {CPU_INDEX}'
    if wanted_vision and not vision_release.startswith(wanted_vision + '.'):
        cause = (f'torch {torch_version} and torchvision {vision_version} are from different '
                 f'releases (torch {torch_release} goes with torchvision {wanted_vision})')
    elif torch_kind != vision_kind:
        cause = (f'torch {torch_version} ({_build_words(torch_kind)}) and torchvision '
                 f'{vision_version} ({_build_words(vision_kind)}) are one release in two '
                 f'builds')
    else:
        cause = f'torch {torch_version} and torchvision {vision_version} do not load together'
    return f'{cause} ({reason}); {machine}: {fix}'


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
    def seeded_subset(split, count):
        # (modulo: torch takes seeds below 2**64, and the largest --seed is 2**64 - 1)
        return random_subset_indices(count, subset, (seed + (split == 'test')) % 2 ** 64)
    select = None if subset is None else seeded_subset
    refuse_a_file(root, '--data-root')
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


def refuse_a_file(path, flag=None):
    """DataError when `path`, given (by `flag`) as the folder that holds the images, is a
    file: the message names the folder the file is in."""
    if os.path.isfile(path):
        named = f'{flag} {shown(path)}' if flag else shown(path)
        raise DataError(f'{named} is a file, not a folder: give the folder that holds the '
                        f'images (such as {shown(os.path.dirname(path) or ".")})')


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
