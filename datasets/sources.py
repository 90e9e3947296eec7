"""Where images come from: torchvision's CIFAR and SVHN files, STL-10's binary files, a
labelled image-folder tree, or a folder of unlabeled images.

Every source gives an `ImageSet`: uint8 H x W x 3 images, integer labels and class names, and a
fingerprint of what was read (see `ImageSet.fingerprint`). The images are an array in memory
(torchvision's CIFAR and SVHN arrays: 150 MB for CIFAR's 50,000) or an `ImageRows` whose rows
stay in memory-mapped files (image files decoded through the cache of `datasets.image_cache`;
STL-10's arrays), read through the page cache as they are used. Image files are decoded by
`datasets.decoding` (every core, once; see `Reading`). Nothing here knows about training;
errors a user can cause are raised as `DataError` with one line to print.
"""
import hashlib
import os
import shutil
import warnings
from contextlib import closing
from dataclasses import dataclass, field

import numpy as np

from .decoding import Reading, ReadStats, header_sizes, read_files
from .errors import DataError
from .folders import (FolderError, describe_class_difference, images_inside, is_class_tree,
                      list_class_tree, list_images, subfolders)
from .image_cache import size_rule
from .image_rows import pixel_digest, take
from .images import (ImageNotes, UnreadableImage, failure_reason, shown)

TRAIN_STORE_RATIO = 8 / 7      # stored training side / crop side for resized folder data
TORCHVISION_FOLDERS = {'cifar10': 'cifar-10-batches-py', 'cifar100': 'cifar-100-python'}
ARCHIVES = {'cifar10': 'cifar-10-python.tar.gz', 'cifar100': 'cifar-100-python.tar.gz'}
NUM_CLASSES = {'cifar10': 10, 'cifar100': 100}
UNLABELED = -1                 # the target of every image of an unlabeled folder


def short_hash(data):
    """16 hex digits of SHA-1: enough to tell data sets apart, short enough to print."""
    return hashlib.sha1(data).hexdigest()[:16]


@dataclass
class ImageSet:
    images: np.ndarray      # N x H x W x 3 uint8: an array, or ImageRows (mapped files)
    targets: np.ndarray     # N int64, class numbers in sorted-class-name order (-1: unlabeled)
    classes: list           # class names, index = class number ([] when unlabeled)
    source: str             # where it was read from, for the log
    indexes: np.ndarray = None   # N positions in the full split (differ from 0..N-1 in subsets)
    paths: list = None      # N file paths relative to `root` (image folders only)
    root: str = None        # the folder `paths` are relative to
    file_hashes: list = field(default=None, repr=False)   # N digests of the encoded files
    skipped: list = field(default_factory=list)   # (path, reason) of unreadable files left out
    notes: list = field(default_factory=list)     # note lines on how the files were read
    read_stats: ReadStats = field(default=None, repr=False)   # what decoding them cost
    content: str = field(default=None, repr=False)   # the fingerprint's content, when known

    def __post_init__(self):
        if self.indexes is None:
            self.indexes = np.arange(len(self.targets))

    def __len__(self):
        return len(self.targets)

    @property
    def labelled(self):
        return len(self.classes) > 0

    @property
    def num_labelled(self):
        """How many images have a label: all of a labelled set, none of an unlabeled one, and
        in STL-10's training set the first 5,000 (its unlabeled 100,000 follow them)."""
        if not self.labelled:
            return 0
        known = self.targets >= 0
        count = int(known.sum())
        if not known[:count].all():
            raise ValueError('an ImageSet\'s labelled images must come before its unlabeled '
                             'ones (target -1)')
        return count

    def subset(self, indices):
        indices = np.asarray(indices, dtype=np.int64)
        pick = (lambda items: None if items is None else [items[i] for i in indices])
        return ImageSet(take(self.images, indices), self.targets[indices], self.classes,
                        self.source, self.indexes[indices], pick(self.paths), self.root,
                        pick(self.file_hashes), read_stats=self.read_stats)

    @property
    def fingerprint(self):
        """What a memory bank's rows belong to: the number of images, a hash of the labels in
        order, and a hash of the images in order (of the encoded files for image folders, of
        the pixels for arrays: read once, chunk by chunk, then kept). Independent of the
        decoder."""
        if self.content is None:
            if self.file_hashes is not None:
                self.content = 'files:' + short_hash(b''.join(self.file_hashes))
            else:
                self.content = 'pixels:' + pixel_digest(self.images).hexdigest()[:16]
        labels = short_hash(self.targets.astype(np.int64).tobytes()) if self.labelled else None
        return {'images': len(self), 'labels': labels, 'content': self.content}


def describe_fingerprint(fingerprint):
    """One phrase for messages: '300 images, labels 1a2b..., content files:3c4d...'."""
    labels = fingerprint.get('labels') or 'none'
    return (f"{fingerprint.get('images')} images, labels {labels}, content "
            f"{fingerprint.get('content')}")


def find_image_folder(root, dataset):
    """The folder holding `train/` and `test/` class trees: `root` itself or `root/<dataset>`."""
    for candidate in (root, os.path.join(root, dataset)):
        if os.path.isdir(os.path.join(candidate, 'train')):
            return candidate
    return None


def list_image_folder_split(folder, split, classes=None):
    """The ClassTree of `folder/split` (datasets.folders), checked against the training
    `classes` when given: a test split must have exactly the training classes, as class
    numbers follow the sorted names."""
    split_dir = os.path.join(folder, split)
    if not os.path.isdir(split_dir):
        raise DataError(f'image folder {shown(folder)} has no {split}/ directory (expected '
                        f'{shown(folder)}/train/<class>/* and {shown(folder)}/test/<class>/*)')
    try:
        tree = list_class_tree(split_dir)
    except FolderError as err:
        raise DataError(str(err)) from None
    if classes is not None and tree.classes != classes:
        raise DataError(f'the classes of {shown(split_dir)} differ from the training classes: '
                        f'{describe_class_difference(tree.classes, classes)}; test and training '
                        f'splits need the same class folders')
    return tree


def decode_images(paths, size=None, skip_unreadable=False, notes=None, reading=None,
                  stats=None):
    """(images, N file digests, kept, skipped) of the image files at `paths`: as they are (then
    they must share one size), or each fitted to a `size` x `size` square; read by
    datasets.images (upright, 8 bits) through `reading` (datasets.decoding: every core, the
    cache; default: this process, no cache), with what was noticed added to `notes` and what
    it cost to `stats` (a ReadStats). `images` is N x H x W x 3 uint8: ImageRows of the
    cache's files with a cache, else an array in memory.

    An unreadable file raises DataError, or with `skip_unreadable` is left out: `kept` lists
    the positions of the images decoded, `skipped` the (path, reason) of the others."""
    reading = reading or Reading()
    arrays, keys, digests, kept, skipped, shape = None, [], [], [], [], None
    with closing(read_files(paths, size, reading, notes, stats)) as reads:
        for read in reads:
            if read.reason is not None:
                if not skip_unreadable:
                    raise DataError(f'cannot read image {shown(read.path)}: {read.reason}')
                skipped.append((read.path, read.reason))
                continue
            if shape is None:
                shape = read.shape
            elif read.shape != shape:
                raise DataError(f'images differ in size ({shown(read.path)} is '
                                f'{read.shape[1]}x{read.shape[0]}, {shown(paths[kept[0]])} is '
                                f'{shape[1]}x{shape[0]}); resize them to one size or use '
                                f'--dataset folder --image-size')
            if reading.cache is None:       # filled in place: no second copy to stack
                if arrays is None:          # (pages of rows never filled are never used)
                    arrays = np.empty((len(paths), *shape), dtype=np.uint8)
                arrays[len(keys)] = read.pixels()
            keys.append(read.digest)
            digests.append(read.digest[:8])
            kept.append(read.position)
    if reading.cache is not None and keys:
        packs = reading.cache.packs(size_rule(size))
        images = packs.rows([packs.where[key] for key in keys])
    elif keys:
        images = arrays[:len(keys)]
    else:
        images = np.zeros((0, size or 1, size or 1, 3), np.uint8)
    return images, digests, kept, skipped


def stored_train_size(image_size):
    """Training images are kept a little larger than the crops taken from them (as 256 is to
    224 on ImageNet), so RandomResizedCrop still sees most of each image."""
    return int(round(image_size * TRAIN_STORE_RATIO))


def read_image_folder(folder, select=None, image_size=None, reading=None):
    """(train, test) ImageSets of an image-folder tree; only the images that
    `select(split, count)` picks (index arrays) are decoded, through `reading` (see
    decode_images). What was noticed while reading both splits (links, bit depths,
    orientation, ...) is the training set's `notes`, and what reading both cost its
    `read_stats`.

    image_size None: images are kept as they are (they must share one size, as CIFAR's do).
    Otherwise test images become Resize(image_size) + CenterCrop(image_size), the test
    transform, and training images squares of `stored_train_size(image_size)` to crop from;
    images already image_size x image_size are kept as they are.
    """
    reading = reading or Reading()
    sets, classes, notes, listed, trees, stats = [], None, ImageNotes(), [], [], ReadStats()
    for split in ('train', 'test'):
        tree = list_image_folder_split(folder, split, classes)
        classes, listed = tree.classes, listed + tree.notes
        trees.append(tree)
        split_dir = os.path.join(folder, split)
        paths = [os.path.join(split_dir, path) for path in tree.paths]
        targets = np.asarray(tree.targets, dtype=np.int64)
        keep = select(split, len(paths)) if select else np.arange(len(paths))
        size = None
        if image_size is not None:
            size = stored_train_size(image_size) if split == 'train' else image_size
            if split == 'train' and _all_square([paths[i] for i in keep], image_size, reading):
                size = image_size
        images, digests, _, _ = decode_images([paths[i] for i in keep], size, notes=notes,
                                              reading=reading, stats=stats)
        sets.append(ImageSet(images, targets[keep], classes, split_dir, np.asarray(keep),
                             [tree.paths[i] for i in keep], split_dir, digests))
    sets[0].notes = listed + shared_files_note(folder, *trees) + notes.lines() + \
        _cache_notes(reading)
    sets[0].read_stats = stats
    return sets


def _cache_notes(reading):
    return reading.cache.take_notes() if reading.cache is not None else []


def shared_files_note(folder, train, test):
    """A note when some test images are training images too (links to the same files)."""
    training = {identity for identity in train.identities if identity is not None}
    shared = sum(identity in training for identity in test.identities if identity is not None)
    if not shared:
        return []
    return [f'note: {shared} of the {len(test.paths)} test images under {shown(folder)} are '
            f'training images too (links to the same files), so the test accuracy is not on '
            f'unseen images']


def read_unlabeled_folder(folder, image_size, select=None, skip_unreadable=True,
                          reading=None):
    """The ImageSet of every image under `folder` (any depth, sorted by relative path, each
    file once), fitted as training images (squares of `stored_train_size(image_size)`, or kept
    when all are already image_size x image_size), decoded through `reading`. Unreadable files
    are left out and listed in its `skipped` as (path, reason)."""
    reading = reading or Reading()
    listing = list_images(folder)
    relative = listing.paths
    if not relative:
        raise DataError(listing.empty_text(folder))
    keep = select('train', len(relative)) if select else np.arange(len(relative))
    paths = [os.path.join(folder, relative[i]) for i in keep]
    size = image_size if _all_square(paths, image_size, reading, quiet=True) \
        else stored_train_size(image_size)
    notes, stats = ImageNotes(), ReadStats()
    images, digests, kept, skipped = decode_images(paths, size, skip_unreadable, notes,
                                                   reading, stats)
    if not kept:
        unread = f'{len(skipped)} files' if len(skipped) > 1 else 'its 1 file'
        raise DataError(f'{shown(folder)} holds no readable image ({unread} could not be read, '
                        f'e.g. {shown(skipped[0][0])}: {skipped[0][1]})')
    chosen = np.asarray(keep)[kept]
    return ImageSet(images, np.full(len(kept), UNLABELED, dtype=np.int64), [], folder, chosen,
                    [relative[i] for i in chosen], folder, digests, skipped,
                    listing.notes(folder) + notes.lines() + _cache_notes(reading), stats)


def _all_square(paths, size, reading, quiet=False):
    """Whether every image is already size x size (read from the cache's file index or the
    file headers, not decoded). `quiet`: an unreadable file answers False (it is reported
    when decoded)."""
    sizes = header_sizes(paths, reading)
    for path in paths:
        try:
            with warnings.catch_warnings():     # said once, when the image is decoded
                warnings.simplefilter('ignore')
                if next(sizes) != (size, size):
                    return False
        except (OSError, UnreadableImage) as err:
            if quiet:
                return False
            raise DataError(f'cannot read image {shown(path)}: {failure_reason(err)}') from None
    return True


def folder_layout(root):
    """'labelled' for a tree with train/ and test/ (of class folders), else 'unlabeled' (images
    directly in `root` or in any sub-folders, a lone train/ among them, no classes)."""
    if not os.path.isdir(root):
        raise DataError(f'no image folder at {root!r}: --dataset folder needs a folder of '
                        f'images, or a {root}/train/<class>/*, {root}/test/<class>/* tree')
    split = (os.path.isdir(os.path.join(root, 'train')) and
             os.path.isdir(os.path.join(root, 'test')))
    return 'labelled' if split else 'unlabeled'


def load_folder(root, image_size, select=None, reading=None):
    """A labelled tree `root/train/<class>/*`, `root/test/<class>/*`: (train, test). Anything
    else with images under it is one unlabeled training set: (train, None)."""
    if folder_layout(root) == 'labelled':
        return read_image_folder(root, select, image_size, reading)
    return read_unlabeled_folder(root, image_size, select, reading=reading), None


def first_missing_folder(path):
    """The outermost folder of `path` that does not exist yet (None if `path` exists)."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
    return missing


def refuse_download_among_images(root, name):
    """A DataError where `root` holds image files itself or in its sub-folders (one level: a
    photo library by year), or is the train/ or test/ split of a labelled copy: a folder of
    one's own images given without --dataset folder must not receive a download of dataset
    `name` (and a run on it). An image-folder copy of another dataset beside (data/train/
    <class>/*) is two levels down, and no reason to refuse."""
    if not os.path.isdir(root):
        return
    parent, split = os.path.split(os.path.normpath(os.path.abspath(root)))
    if split in ('train', 'test') and folder_layout(parent) == 'labelled' and \
            is_class_tree(root):
        raise DataError(f'{shown(root)} is the {split}/ split of an image-folder copy: give the '
                        f'folder that holds train/ and test/, --data-root {shown(parent)}')
    for folder in [root] + [os.path.join(root, sub) for sub in subfolders(root)]:
        images = images_inside(folder)
        if images:
            image = os.path.join(folder, images[0])
            raise DataError(f'{shown(root)} holds images ({shown(image)}, '
                            f'...) but no {name} files: for images of your own, give --dataset '
                            f'folder; to download {name}, give it a folder of its own (a '
                            f'download of {name} into this one was not started)')


def torchvision_fetch(root, fetch):
    """`fetch()`, a torchvision reader that may download into `root`. When it fails, the
    folders it created are removed again: a mistyped --data-root leaves no empty folder."""
    created = first_missing_folder(root)
    try:
        return fetch()
    except Exception:
        if created is not None and os.path.isdir(created):
            shutil.rmtree(created, ignore_errors=True)
        raise


def load_svhn(root, download=True, select=None):
    """SVHN's torchvision files `train_32x32.mat` and `test_32x32.mat` (under `root` or
    `root/svhn`), downloaded there by torchvision when missing. Label 10 means the digit 0."""
    sets = []
    for split in ('train', 'test'):
        name = f'{split}_32x32.mat'
        found = [d for d in (root, os.path.join(root, 'svhn'))
                 if os.path.isfile(os.path.join(d, name))]
        if not found:
            if download:
                refuse_download_among_images(root, 'SVHN')
            try:
                import torchvision
                torchvision_fetch(root, lambda: torchvision.datasets.SVHN(root, split=split,
                                                                          download=download))
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


def load_cifar(dataset, root, download=True, select=None, reading=None):
    """CIFAR-10/100 from an image-folder tree or torchvision's files under `root`.

    Looked for, in order: `root/train` + `root/test` (or `root/<dataset>/...`) class folders;
    torchvision's extracted files; a torchvision download into `root`.
    """
    folder = find_image_folder(root, dataset)
    if folder is not None:
        train, test = read_image_folder(folder, select, reading=reading)
        if len(train.classes) != NUM_CLASSES[dataset]:
            count = f'{len(train.classes)} class' + ('' if len(train.classes) == 1 else 'es')
            raise DataError(f'{folder}/train has {count}, but {dataset} has '
                            f'{NUM_CLASSES[dataset]}: wrong --data-root or --dataset?')
        return train, test
    extracted = os.path.join(root, TORCHVISION_FOLDERS[dataset])
    if os.path.isdir(extracted):
        download = False
    if download:
        refuse_download_among_images(root, dataset)
    try:
        sets = torchvision_fetch(root, lambda: read_torchvision_cifar(dataset, root, download))
    except Exception as err:  # torchvision raises RuntimeError/URLError/OSError variously
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if not download:        # (torchvision's words advise download=True, nothing typed)
            raise DataError(f'{shown(extracted)} is incomplete or damaged (torchvision could not '
                            f'read it: {reason}; no download was tried): delete it, or unpack '
                            f'{ARCHIVES[dataset]} there again') from None
        raise DataError(
            f'no {dataset} data under {root!r}: looked for {root}/train/<class>/* + '
            f'{root}/test/<class>/* image folders and torchvision\'s '
            f'{root}/{TORCHVISION_FOLDERS[dataset]}, and the download failed ({reason}); '
            f'run once with network access, or point --data-root at an image-folder copy') from None
    if select is None:
        return sets
    return [s.subset(select(split, len(s))) for split, s in zip(('train', 'test'), sets)]
