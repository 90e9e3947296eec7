"""Embeddings of any folder of images with a trained checkpoint.

    python -m tools.embed --ckpt checkpoint/ckpt.t7 --images photos/ --out photos.npz

Every image under the folder, at any depth, goes through the checkpoint's test transform
(shorter side resized and centre-cropped to its image size, normalised with its mean and std)
and the network in eval mode, in float32 and in batches. The .npz holds `features` (N x D,
unit rows: the dot product of two rows is their cosine similarity), `paths` (relative to the
folder), and when the folder is a class tree (<class>/<image>) `labels` and `classes`; also
`root`, `image_size`, `mean`, `std`, `checkpoint`, `fingerprint` (of the folder's files),
`kept_fingerprint` (of the files embedded: `paths`) and `reader_version` (of the image reader,
datasets.READER_VERSION).
An unreadable file is named and skipped.
"""
import hashlib
import os
import sys
from contextlib import closing
from dataclasses import dataclass, field

if not __package__:     # run by its path, python3 tools/<name>.py: the project's packages
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = 'tools'

from lib import cli  # noqa: E402


def build_parser():
    p = cli.Parser(prog='python -m tools.embed',
                   description='Embed every image of a folder with a trained checkpoint.')
    cli.add_checkpoint_option(p)
    p.add_argument('--images', required=True, metavar='DIR',
                   help='folder of images (any depth); a class tree <class>/<image> gives '
                        'labels, and its images are those directly inside each class folder')
    p.add_argument('--out', required=True, type=cli.output_file('.npz'), metavar='FILE.npz',
                   help='the .npz file to write')
    cli.add_reading_options(p)
    cli.add_device_option(p)
    cli.add_quiet_option(p)
    return p


if __name__ == '__main__':
    cli.parse_first(lambda: build_parser().parse_args())

# The engine, imported once the flags are known to be right (importing torch takes seconds).
import numpy as np  # noqa: E402
import torch  # noqa: E402

import datasets  # noqa: E402
from datasets import shown  # noqa: E402

from datasets.decoding import read_files  # noqa: E402
from lib.analysis import load_network  # noqa: E402
from lib.build import image_reading, pick_device  # noqa: E402
from lib.checkpoint import checkpoint_digest, save_atomic  # noqa: E402
from lib.cli import plural  # noqa: E402
from lib.console import reading_line, skipped_lines  # noqa: E402
from lib.core.knn import embed  # noqa: E402
from lib.errors import UserError  # noqa: E402
from lib.progress import progress_bar  # noqa: E402
from lib.run_folder import remove_dead_temporaries  # noqa: E402

EMBED_BATCH = 256               # images per forward pass (memory only; results do not depend)
NORMALISATION_TOLERANCE = 0.03  # a folder's mean or std this far from the checkpoint's is said
# ... when it is measured on this many images at least: one photo's channel means differ from
# a dataset's by 0.1 or more as a rule (CIFAR-10's per-image means spread with a std of about
# 0.12 around the dataset's), so on a few queries the note would be noise. With 100 images
# that spread is 0.012 per channel, well inside the tolerance.
NORMALISATION_MIN_IMAGES = 100


@dataclass
class ImageList:
    """The images of a folder: paths relative to `root`, and labels when it is a class tree;
    `notes` say what the folder walk left out (links to files or folders already listed)."""
    root: str
    paths: list
    labels: np.ndarray = None
    classes: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    fingerprint: str = None     # file_fingerprint of `paths` as they were embedded


def list_folder(folder):
    """The ImageList of `folder` (datasets.folders: any depth, hidden entries ignored, each
    real file once), or a UserError if there is none or it holds no images (a DataError if
    it is a file)."""
    datasets.refuse_a_file(folder)
    if not os.path.isdir(folder):
        raise UserError(f'no folder at {shown(folder)}')
    if datasets.is_class_tree(folder):          # labels, read as runs read a class tree
        try:
            tree = datasets.list_class_tree(folder)
        except datasets.FolderError as err:
            raise UserError(str(err)) from None
        return ImageList(folder, tree.paths, np.asarray(tree.targets, dtype=np.int64),
                         tree.classes, tree.notes)
    listing = datasets.list_images(folder)
    if not listing.paths:
        raise UserError(listing.empty_text(folder))
    return ImageList(folder, listing.paths, notes=listing.notes(folder))


def file_fingerprint(root, paths, cache=None):
    """A digest of the files' names and bytes, in order: what a cached gallery is keyed by.
    A file that cannot be opened (a broken link) counts by its name; embedding skips it. The
    image cache's file index (`cache`) gives the SHA-1 of the files it knows unchanged."""
    digest = hashlib.sha1()
    for path in paths:
        content, full = None, os.path.join(root, path)
        if cache is not None:
            try:
                _, known = cache.identify(full)
                content = known[0] if known else None
            except OSError:
                pass
        if content is None:
            try:
                with open(full, 'rb') as f:
                    content = hashlib.sha1(f.read()).digest()
            except OSError:
                content = b'unreadable'
        digest.update(os.fsencode(path) + b'\0' + content)   # any name the OS allows
    return digest.hexdigest()[:16]


@dataclass
class Embedded:
    features: torch.Tensor      # N x D float32, unit rows
    kept: list                  # positions (in the list given) of the images embedded
    skipped: list               # (path, reason) of the files that could not be read
    notes: list                 # what differed from the checkpoint's training images
    stats: object = None        # datasets.ReadStats: what reading the files cost
    fingerprint: str = None     # file_fingerprint of the bytes read
    kept_fingerprint: str = None    # of the files embedded only (the unreadable left out)


class ImageReader:
    """Notes how a folder's images differ from the checkpoint's training images (size,
    normalisation) and how they were read (bit depth, orientation, ...: datasets.ImageNotes),
    each said once, and normalises their pixels."""

    def __init__(self, image_size, mean, std):
        self.image_size = image_size
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.resized = 0
        self.channel_sums = np.zeros(3)
        self.std_sums = np.zeros(3)
        self.count = 0
        self.read_notes = datasets.ImageNotes()

    def read(self, path):
        """The tensor (see `tensor`) of the image file at `path`, read in this process without
        the cache; raises datasets.UnreadableImage (an unreadable or missing file)."""
        (found,) = read_files([path], self.image_size, datasets.Reading(), self.read_notes)
        if found.reason is not None:
            raise datasets.UnreadableImage(found.reason)
        return self.tensor(found)

    def tensor(self, read):
        """3 x S x S float32 normalised tensor of a file read (datasets.decoding.FileRead,
        fitted to S x S as the run decoded its own test images, so a training folder embeds
        here as its kNN evaluation saw it)."""
        if read.header != (self.image_size, self.image_size):
            self.resized += 1
        pixels = read.pixels().astype(np.float32) / 255.0
        self.count += 1
        self.channel_sums += pixels.mean(axis=(0, 1))
        self.std_sums += pixels.std(axis=(0, 1))
        return torch.from_numpy(((pixels - self.mean) / self.std).transpose(2, 0, 1).copy())

    def notes(self):
        """What differed from the checkpoint's input, said once each (the checkpoint's size and
        normalisation are used all the same)."""
        found = self.read_notes.lines()
        size = self.image_size
        if self.resized:
            verb = 'is' if self.count == 1 else 'are'
            found.append(f'note: {self.resized} of {plural(self.count, "image")} {verb} not '
                         f'{size} x {size} px: each is resized (shorter side) and centre-cropped '
                         f'to {size} px, the checkpoint\'s image size')
        if self.count >= NORMALISATION_MIN_IMAGES:
            mean, std = self.channel_sums / self.count, self.std_sums / self.count
            if np.abs(mean - self.mean).max() > NORMALISATION_TOLERANCE or \
                    np.abs(std - self.std).max() > NORMALISATION_TOLERANCE:
                found.append(f'note: these images have mean {_three(mean)} std {_three(std)}, '
                             f'the checkpoint\'s training images {_three(self.mean)} '
                             f'{_three(self.std)}: the checkpoint\'s normalisation is used')
        return found


def _three(values):
    return '(' + ', '.join(f'{v:.3f}' for v in values) + ')'


def embed_files(net, root, paths, image_size, mean, std, device, show=False,
                batch_size=EMBED_BATCH, reading=None, rows=None):
    """Embed the images at `paths` (relative to `root`), read through `reading` (a
    datasets.Reading: processes and the image cache; default: this process, no cache) and
    streamed: a batch of images at a time is held, never the folder. Unreadable files are
    skipped. With `rows` (a FeatureRows) each batch's B x D features go to disk as they are
    made and the features returned are that file's, mapped; else they are kept in memory.
    The Embedded's `fingerprint` is `file_fingerprint` of the bytes that were read."""
    reader = ImageReader(image_size, mean, std)
    reading = reading or datasets.Reading()
    skipped, stats, digest, kept_digest = [], datasets.ReadStats(), hashlib.sha1(), \
        hashlib.sha1()
    reads = read_files([os.path.join(root, path) for path in paths], image_size, reading,
                       reader.read_notes, stats)

    def batches():
        images, positions = [], []
        with closing(reads):
            for read in reads:
                digest.update(os.fsencode(paths[read.position]) + b'\0'
                              + (read.digest or b'unreadable'))
                if read.reason is not None:
                    skipped.append((paths[read.position], read.reason))
                else:
                    kept_digest.update(os.fsencode(paths[read.position]) + b'\0' + read.digest)
                    images.append(reader.tensor(read))
                    positions.append(read.position)
                if len(images) == batch_size:
                    yield torch.stack(images).to(device), torch.tensor(positions)
                    images, positions = [], []
        if images:
            yield torch.stack(images).to(device), torch.tensor(positions)

    features, kept = [], []
    for images, positions in progress_bar(batches(), total=-(-len(paths) // batch_size),
                                          desc='embed', enabled=show, unit='batch'):
        batch_features, _ = embed(net, [(images, positions)])
        if rows is not None:
            rows(batch_features)
        else:
            features.append(batch_features)
        kept += positions.tolist()
    if rows is not None:
        features = torch.from_numpy(rows.written())
    else:
        features = torch.cat(features) if features else torch.zeros(0, 0, device=device)
    notes = reader.notes() + (reading.cache.take_notes() if reading.cache is not None else [])
    return Embedded(features, kept, skipped, notes, stats, digest.hexdigest()[:16],
                    kept_digest.hexdigest()[:16])


def report_skipped(skipped, say=print):
    """Each unreadable file named, then the count (as main.py says them)."""
    for line in skipped_lines(skipped):
        say(line)


def embed_folder(loaded, images, device, show=False, say=print, reading=None, rows=None):
    """(ImageList of the images embedded, N x D features, the fingerprint of the files read)
    of an ImageList, with the skipped files, the notes and what reading cost said (see
    embed_files for `reading` and `rows`)."""
    for note in images.notes:
        say(note)
    done = embed_files(loaded.net, images.root, images.paths, loaded.image_size, loaded.mean,
                       loaded.std, device, show, reading=reading, rows=rows)
    report_skipped(done.skipped, say)
    if not done.kept:
        raise UserError(f'{shown(images.root)} holds no readable image '
                        f'({plural(len(done.skipped), "file")} could not be read)')
    for note in done.notes:
        say(note)
    if show:
        say(reading_line(done.stats))
    kept = ImageList(images.root, [images.paths[i] for i in done.kept],
                     images.labels[done.kept] if images.labels is not None else None,
                     images.classes, fingerprint=done.kept_fingerprint)
    return kept, done.features, done.fingerprint


def write_npz(out, **arrays):
    """`arrays` into the .npz file `out`, under exactly that name, its folder made, whole or
    not at all (a kill mid-write leaves the file as it was: retrieve reads its gallery cache
    back). An array may be a memory-mapped .npy file's: it is copied into the archive a chunk
    at a time."""
    target = os.path.realpath(out)      # (a link: its target is written, the link kept)
    with cli.writing(out):
        os.makedirs(os.path.dirname(target), exist_ok=True)     # (a link's target's folder)
        remove_dead_temporaries(os.path.dirname(target))        # of writes killed before
        # A file object: np.savez would add .npz to other names.
        save_atomic(arrays, target, write=lambda arrays, f: np.savez(f, **arrays))


class FeatureRows:
    """Features written to disk as they are made: a .npy file beside the output (`<out>.rows
    .npy`), N x D float32 for at most `count` images, mapped rather than held, so the memory
    of an embedding does not grow with the folder. `close()` removes it."""

    def __init__(self, out, count):
        self.out, self.path = out, out + '.rows.npy'
        self.count, self.filled, self.array = count, 0, None

    def __call__(self, features):
        if self.array is None:
            with cli.writing(self.out):     # (the file named: this one is beside it)
                self.array = np.lib.format.open_memmap(self.path, mode='w+', dtype=np.float32,
                                                       shape=(self.count, features.shape[1]))
        self.array[self.filled:self.filled + len(features)] = features.cpu().numpy()
        self.filled += len(features)

    def written(self):
        """The rows written so far (a view of the mapped file)."""
        if self.array is None:
            return np.zeros((0, 0), dtype=np.float32)
        return self.array[:self.filled]

    def close(self):
        self.array = None
        if os.path.exists(self.path):
            os.remove(self.path)


def save_embeddings(out, images, features, loaded, checkpoint, **extra):
    """The .npz of embedded images (see the module's docstring); `extra` arrays are added.
    `features`: N x D, a tensor or an array (a mapped one is copied a chunk at a time)."""
    if images.labels is not None:
        extra.update(labels=images.labels, classes=np.asarray(images.classes))
    if isinstance(features, torch.Tensor):
        features = features.cpu().numpy().astype(np.float32)
    write_npz(out, features=features, paths=np.asarray(images.paths),
              root=os.path.abspath(images.root), image_size=loaded.image_size,
              mean=np.asarray(loaded.mean), std=np.asarray(loaded.std),
              checkpoint=os.path.abspath(checkpoint),
              kept_fingerprint=str(images.fingerprint),
              reader_version=datasets.READER_VERSION, **extra)


def embed_command(argv):
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    loaded = load_network(args.ckpt, device)
    listed = list_folder(args.images)
    if not args.quiet:
        print(f'embedding {plural(len(listed.paths), "image file")} of {args.images} with '
              f'{args.ckpt} ({device.type})', flush=True)
    rows = FeatureRows(args.out, len(listed.paths))
    wrote = cli.wrote_or_replaced(args.out)
    try:
        images, features, fingerprint = embed_folder(
            loaded, listed, device, show=not args.quiet, reading=image_reading(args, print),
            rows=rows)
        save_embeddings(args.out, images, features.numpy(), loaded, args.ckpt,
                        fingerprint=fingerprint, checkpoint_digest=checkpoint_digest(args.ckpt))
    finally:
        rows.close()
    labels = (f', labels of {plural(len(images.classes), "class", "classes")}'
              if images.labels is not None else '')
    skipped = len(listed.paths) - features.shape[0]
    left_out = f' ({plural(skipped, "unreadable file")} left out, named above)' if skipped \
        else ''
    print(f'{wrote} {shown(args.out)}: {features.shape[0]} x '
          f'{features.shape[1]} unit-length features, paths relative to {shown(args.images)}'
          f'{labels}{left_out}')


def main(argv=None):
    return cli.run(embed_command, argv)


if __name__ == '__main__':
    cli.exit_program(main())
