"""STL-10 (Coates, Lee and Ng, 2011) from its binary files: the data of the Super-AND paper's
retrieval and class-probability figures.

The distribution's folder `stl10_binary/` (torchvision's STL10 unpacks the same one) holds:

    train_X.bin      5,000 labelled images     } N x 3 x 96 x 96 uint8, each channel plane
    test_X.bin       8,000 labelled images     } stored column by column (column-major), so
    unlabeled_X.bin  100,000 unlabeled images  } a plane read row by row is the image turned
    train_y.bin, test_y.bin   one uint8 label per image, 1 to 10
    class_names.txt           the ten class names, one a line

They are read as they are: no checksum is asked for (a copy made without torchvision works
offline), and the images stay in the files, memory-mapped, so 105,000 training images cost no
memory until they are used. Training uses train + unlabeled (105,000 images, the labelled
5,000 first); the kNN votes with the 5,000 labelled ones and is scored on the 8,000 test
images. Images are 96 x 96, trained at 96 px with the ImageNet stem (models.default_stem).
"""
import os

import numpy as np

from .image_rows import ImageRows, MappedArray, concatenate, pixel_digest, take
from .images import shown
from .sources import (UNLABELED, DataError, ImageSet, refuse_download_among_images,
                      torchvision_fetch)

SIDE = 96
IMAGE_BYTES = 3 * SIDE * SIDE
FOLDER = 'stl10_binary'
OFFICIAL_COUNTS = (5000, 100000, 8000)     # labelled training, unlabeled, test images
CLASSES = ('airplane', 'bird', 'car', 'cat', 'deer', 'dog', 'horse', 'monkey', 'ship', 'truck')
# Stored axes of one image (channel, column, row) -> (row, column, channel).
STORED_ORDER = (2, 1, 0)


def find_folder(root):
    """`root/stl10_binary`, or `root` itself when it holds the files; None when neither does."""
    for candidate in (os.path.join(root, FOLDER), root):
        if os.path.isfile(os.path.join(candidate, 'train_X.bin')):
            return candidate
    return None


def image_file(folder, name):
    """The MappedArray of the images of `folder/name` (N x 96 x 96 x 3 when read), checked
    to hold whole images."""
    path = os.path.join(folder, name)
    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise DataError(f'cannot read STL-10 file {shown(path)}: {err.strerror}') from None
    if size == 0:
        raise DataError(f'STL-10 file {shown(path)} is empty (0 bytes): a copy that did not '
                        f'finish?')
    if size % IMAGE_BYTES:
        raise DataError(f'STL-10 file {shown(path)} has {size:,} bytes, not a whole number of '
                        f'{IMAGE_BYTES:,}-byte 96 x 96 images: a truncated copy?')
    return MappedArray(path, size // IMAGE_BYTES, (3, SIDE, SIDE), order=STORED_ORDER)


def label_file(folder, name, images):
    """The labels of `folder/name` as class numbers 0..9 (stored as 1..10), one per image of
    `images` (the MappedArray of their image file)."""
    path, count = os.path.join(folder, name), images.count
    try:
        stored = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise DataError(f'cannot read STL-10 file {shown(path)}: {err.strerror}') from None
    in_range = not len(stored) or (stored.min() >= 1 and stored.max() <= len(CLASSES))
    if len(stored) != count and in_range:       # (either file may be the one cut short)
        raise DataError(f'STL-10 files {shown(images.path)} and {shown(path)} disagree: '
                        f'{count:,} images and {len(stored):,} labels; one of them is cut short '
                        f'(a copy that did not finish?)')
    if len(stored) != count or (count and (stored.min() < 1 or stored.max() > len(CLASSES))):
        raise DataError(f'STL-10 file {shown(path)} should hold {count:,} labels from 1 to '
                        f'{len(CLASSES)}, one per image; it holds {len(stored):,} bytes'
                        + (f' from {stored.min()} to {stored.max()}' if len(stored) else ''))
    return stored.astype(np.int64) - 1


def class_names(folder):
    path = os.path.join(folder, 'class_names.txt')
    try:
        with open(path) as f:
            names = [line.strip() for line in f if line.strip()]
    except OSError:
        return list(CLASSES)
    return names if len(names) == len(CLASSES) else list(CLASSES)


def load_stl10(root, download=True, select=None, cache=None):
    """(train, test) ImageSets of STL-10 under `root` (its `stl10_binary/`, or the files in
    `root` itself), downloaded by torchvision when neither holds them. train: the 5,000
    labelled images then the 100,000 unlabeled ones (target -1); test: 8,000. `select(split,
    count)` picks index arrays; `cache` (an ImageCache) keeps the pixel digests of the files,
    so a second start does not read 2.9 GB to fingerprint them."""
    folder = find_folder(root)
    if folder is None:
        if download:
            refuse_download_among_images(root, 'STL-10')
        try:
            import torchvision
            torchvision_fetch(root, lambda: torchvision.datasets.STL10(
                root, split='train+unlabeled', download=download))
        except Exception as err:    # torchvision raises RuntimeError/URLError/OSError variously
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise DataError(f'no STL-10 data under {root!r}: looked for {root}/{FOLDER}/'
                            f'train_X.bin (the binary distribution), and the download failed '
                            f'({reason}); run once with network access, or unpack '
                            f'stl10_binary.tar.gz there') from None
        folder = find_folder(root)
    classes = class_names(folder)
    labelled = image_file(folder, 'train_X.bin')
    unlabeled = image_file(folder, 'unlabeled_X.bin')
    test = image_file(folder, 'test_X.bin')
    train_targets = np.concatenate([label_file(folder, 'train_y.bin', labelled),
                                    np.full(unlabeled.count, UNLABELED, dtype=np.int64)])
    sets = []
    for split, images, targets in (
            ('train', concatenate([labelled, unlabeled]), train_targets),
            ('test', ImageRows.of_block(test), label_file(folder, 'test_y.bin', test))):
        keep = select(split, len(targets)) if select else np.arange(len(targets))
        chosen = take(images, keep)
        files = [labelled, unlabeled] if split == 'train' else [test]
        sets.append(ImageSet(chosen, targets[keep], classes, folder, np.asarray(keep),
                             content=_content(files, keep, chosen, cache)))
    counts = (labelled.count, unlabeled.count, test.count)
    if counts != OFFICIAL_COUNTS:
        sets[0].notes.append(
            f'note: the STL-10 files in {shown(folder)} hold {counts[0]:,} labelled, '
            f'{counts[1]:,} unlabeled and {counts[2]:,} test images, not the '
            f'{OFFICIAL_COUNTS[0]:,}, {OFFICIAL_COUNTS[1]:,} and {OFFICIAL_COUNTS[2]:,} of the '
            f'official distribution (a copy cut short?)')
    return sets


def _content(files, keep, images, cache):
    """The fingerprint content of `images` ('pixels:' and 16 hex digits of the rows' SHA-1),
    kept in the cache under the files' identities and the rows chosen."""
    def compute():
        return 'pixels:' + pixel_digest(images).hexdigest()[:16]
    if cache is None:
        return compute()
    import hashlib
    key = hashlib.sha1(np.asarray(keep, dtype=np.int64).tobytes())
    for block in files:
        info = os.stat(block.path)
        key.update(repr((os.path.abspath(block.path), info.st_dev, info.st_ino, info.st_size,
                         info.st_mtime_ns, info.st_ctime_ns)).encode())
    return cache.memo('digests', key.hexdigest(), compute)
