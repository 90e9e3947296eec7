"""Where images come from: torchvision's CIFAR files, or an image-folder tree.

Every source gives an `ImageSet`: all images decoded once into memory as uint8 H x W x 3
(CIFAR is 150 MB for 50,000 images), integer labels and class names. Nothing here knows
about training; errors a user can cause are raised as `DataError` with one line to print.
"""
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.ppm', '.pgm', '.tif', '.tiff', '.webp')

TRAIN_STORE_RATIO = 8 / 7      # stored training side / crop side for resized folder data
TORCHVISION_FOLDERS = {'cifar10': 'cifar-10-batches-py', 'cifar100': 'cifar-100-python'}
NUM_CLASSES = {'cifar10': 10, 'cifar100': 100}


class DataError(Exception):
    """Missing or malformed data: the message is one line that says what to do."""


@dataclass
class ImageSet:
    images: np.ndarray      # N x H x W x 3 uint8
    targets: np.ndarray     # N int64, class numbers in sorted-class-name order
    classes: list           # class names, index = class number
    source: str             # where it was read from, for the log
    indexes: np.ndarray = None   # N positions in the full split (differ from 0..N-1 in subsets)

    def __post_init__(self):
        if self.indexes is None:
            self.indexes = np.arange(len(self.targets))

    def __len__(self):
        return len(self.targets)

    def subset(self, indices):
        indices = np.asarray(indices)
        return ImageSet(self.images[indices], self.targets[indices], self.classes, self.source,
                        self.indexes[indices])


def find_image_folder(root, dataset):
    """The folder holding `train/` and `test/` class trees: `root` itself or `root/<dataset>`."""
    for candidate in (root, os.path.join(root, dataset)):
        if os.path.isdir(os.path.join(candidate, 'train')):
            return candidate
    return None


def list_image_folder_split(folder, split, classes=None):
    """Paths and labels of `folder/split/<class>/*`, classes and files in sorted order."""
    split_dir = os.path.join(folder, split)
    if not os.path.isdir(split_dir):
        raise DataError(f'image folder {folder} has no {split}/ directory '
                        f'(expected {folder}/train/<class>/* and {folder}/test/<class>/*)')
    found = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    if not found:
        raise DataError(f'{split_dir} holds no class directories (expected {split_dir}/<class>/*)')
    if classes is not None and found != classes:
        raise DataError(f'{split_dir} classes {found[:5]}... differ from the training classes '
                        f'{classes[:5]}...')
    paths, targets = [], []
    for label, name in enumerate(found):
        class_dir = os.path.join(split_dir, name)
        files = sorted(f for f in os.listdir(class_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise DataError(f'class directory {class_dir} holds no images '
                            f'({", ".join(IMAGE_EXTENSIONS)})')
        paths += [os.path.join(class_dir, f) for f in files]
        targets += [label] * len(files)
    return paths, np.asarray(targets, dtype=np.int64), found


def fit_square(img, size):
    """Resize the shorter side to `size` (bilinear, antialiased), then centre-crop size x size:
    torchvision's Resize(size) + CenterCrop(size), done once at load time."""
    if img.size == (size, size):
        return img
    import torchvision.transforms.functional as F
    return F.center_crop(F.resize(img, size), size)


def decode_images(paths, size=None):
    """N x H x W x 3 uint8 of the images at `paths`: as they are (then they must share one
    size), or each fitted to a `size` x `size` square."""
    images, shape = [], None
    for path in paths:
        try:
            with Image.open(path) as img:
                if size is not None:
                    img.draft('RGB', (size, size))    # JPEG: decode at a reduced scale >= size
                    img = fit_square(img.convert('RGB'), size)
                array = np.asarray(img.convert('RGB'))
        except (OSError, ValueError) as err:
            raise DataError(f'cannot read image {path}: {err}') from None
        if shape is None:
            shape = array.shape
        elif array.shape != shape:
            raise DataError(f'images differ in size ({path} is {array.shape[1]}x'
                            f'{array.shape[0]}, {paths[0]} is {shape[1]}x{shape[0]}); '
                            f'resize them to one size or use --dataset folder --image-size')
        images.append(array)
    return np.stack(images)


def stored_train_size(image_size):
    """Training images are kept a little larger than the crops taken from them (as 256 is to
    224 on ImageNet), so RandomResizedCrop still sees most of each image."""
    return int(round(image_size * TRAIN_STORE_RATIO))


def read_image_folder(folder, select=None, image_size=None):
    """(train, test) ImageSets of an image-folder tree; only the images that
    `select(split, count)` picks (index arrays) are decoded.

    image_size None: images are kept as they are (they must share one size, as CIFAR's do).
    Otherwise test images become Resize(image_size) + CenterCrop(image_size), the test
    transform, and training images squares of `stored_train_size(image_size)` to crop from;
    images already image_size x image_size are kept as they are.
    """
    sets, classes = [], None
    for split in ('train', 'test'):
        paths, targets, classes = list_image_folder_split(folder, split, classes)
        keep = select(split, len(paths)) if select else np.arange(len(paths))
        size = None
        if image_size is not None:
            size = stored_train_size(image_size) if split == 'train' else image_size
            if split == 'train' and _all_square(paths, keep, image_size):
                size = image_size
        images = decode_images([paths[i] for i in keep], size)
        sets.append(ImageSet(images, targets[keep], classes, os.path.join(folder, split),
                             np.asarray(keep)))
    return sets


def _all_square(paths, keep, size):
    """Whether every chosen image is already size x size (read from headers, not decoded)."""
    for i in keep:
        try:
            with Image.open(paths[i]) as img:
                if img.size != (size, size):
                    return False
        except (OSError, ValueError) as err:
            raise DataError(f'cannot read image {paths[i]}: {err}') from None
    return True


def load_folder(root, image_size, select=None):
    """Any image-folder tree `root/train/<class>/*`, `root/test/<class>/*`."""
    if not os.path.isdir(os.path.join(root, 'train')):
        raise DataError(f'no image folder at {root!r}: --dataset folder needs '
                        f'{root}/train/<class>/* and {root}/test/<class>/*')
    return read_image_folder(root, select, image_size)


def load_svhn(root, download=True, select=None):
    """SVHN's torchvision files `train_32x32.mat` and `test_32x32.mat` (under `root` or
    `root/svhn`), downloaded there by torchvision when missing. Label 10 means the digit 0."""
    sets = []
    for split in ('train', 'test'):
        name = f'{split}_32x32.mat'
        found = [d for d in (root, os.path.join(root, 'svhn'))
                 if os.path.isfile(os.path.join(d, name))]
        if not found:
            try:
                import torchvision
                torchvision.datasets.SVHN(root, split=split, download=download)
            except Exception as err:
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise DataError(f'no SVHN data under {root!r}: looked for {root}/{name} '
                                f'(torchvision\'s file), and the download failed ({reason}); run '
                                f'once with network access or copy the .mat files there') from None
            found = [root]
        path = os.path.join(found[0], name)
        try:
            from scipy.io import loadmat
            mat = loadmat(path)
            images = np.ascontiguousarray(np.transpose(mat['X'], (3, 0, 1, 2)), dtype=np.uint8)
            targets = mat['y'].reshape(-1).astype(np.int64) % 10
        except Exception as err:
            raise DataError(f'cannot read SVHN file {path}: {err}') from None
        image_set = ImageSet(images, targets, [str(d) for d in range(10)], path)
        sets.append(image_set.subset(select(split, len(image_set))) if select else image_set)
    return sets


def read_torchvision_cifar(dataset, root, download):
    import torchvision
    cls = torchvision.datasets.CIFAR10 if dataset == 'cifar10' else torchvision.datasets.CIFAR100
    splits = []
    for train in (True, False):
        ds = cls(root=root, train=train, download=download)
        splits.append(ImageSet(np.asarray(ds.data), np.asarray(ds.targets, dtype=np.int64),
                               list(ds.classes), os.path.join(root, TORCHVISION_FOLDERS[dataset])))
    return splits


def load_cifar(dataset, root, download=True, select=None):
    """CIFAR-10/100 from an image-folder tree or torchvision's files under `root`.

    Looked for, in order: `root/train` + `root/test` (or `root/<dataset>/...`) class folders;
    torchvision's extracted files; a torchvision download into `root`.
    """
    folder = find_image_folder(root, dataset)
    if folder is not None:
        train, test = read_image_folder(folder, select)
        if len(train.classes) != NUM_CLASSES[dataset]:
            raise DataError(f'{folder}/train has {len(train.classes)} classes, but {dataset} has '
                            f'{NUM_CLASSES[dataset]}: wrong --data-root or --dataset?')
        return train, test
    if os.path.isdir(os.path.join(root, TORCHVISION_FOLDERS[dataset])):
        download = False
    try:
        sets = read_torchvision_cifar(dataset, root, download)
    except Exception as err:  # torchvision raises RuntimeError/URLError/OSError variously
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f'no {dataset} data under {root!r}: looked for {root}/train/<class>/* + '
            f'{root}/test/<class>/* image folders and torchvision\'s '
            f'{root}/{TORCHVISION_FOLDERS[dataset]}, and the download failed ({reason}); '
            f'run once with network access, or point --data-root at an image-folder copy') from None
    if select is None:
        return sets
    return [s.subset(select(split, len(s))) for split, s in zip(('train', 'test'), sets)]
