"""Embeddings of any folder of images with a trained checkpoint.

    python -m tools.embed --ckpt checkpoint/ckpt.t7 --images photos/ --out photos.npz

Every image under the folder, at any depth, goes through the checkpoint's test transform
(shorter side resized and centre-cropped to its image size, normalised with its mean and std)
and the network in eval mode, in float32 and in batches. The .npz holds `features` (N x D,
unit rows: the dot product of two rows is their cosine similarity), `paths` (relative to the
folder), and when the folder is a class tree (<class>/<image>) `labels` and `classes`; also
`root`, `image_size`, `mean`, `std`, `checkpoint`, `fingerprint` (of the folder's files) and
`reader_version` (of the image reader, datasets.READER_VERSION).
An unreadable file is named and skipped.
"""
import hashlib
import os
import sys
from dataclasses import dataclass, field

from lib import cli


def build_parser():
    p = cli.Parser(prog='python -m tools.embed',
                   description='Embed every image of a folder with a trained checkpoint.')
    cli.add_checkpoint_option(p)
    p.add_argument('--images', required=True, metavar='DIR',
                   help='folder of images (any depth); a class tree <class>/<image> also gives '
                        'labels')
    p.add_argument('--out', required=True, type=cli.output_file('.npz'), metavar='FILE.npz',
                   help='the .npz file to write')
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

from lib.analysis import load_network  # noqa: E402
from lib.build import pick_device  # noqa: E402
from lib.core.knn import embed  # noqa: E402
from lib.errors import UserError  # noqa: E402
from lib.progress import progress_bar  # noqa: E402

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


def list_folder(folder):
    """The ImageList of `folder` (datasets.folders: any depth, hidden entries ignored, each
    real file once), or a UserError if there is none or it holds no images."""
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
        raise UserError(f'{shown(folder)} holds no images '
                        f'({", ".join(datasets.IMAGE_EXTENSIONS)}), at any depth')
    return ImageList(folder, listing.paths, notes=listing.notes(folder))


def checkpoint_digest(path):
    """A digest of a checkpoint file: embeddings compare only with those of the same weights."""
    digest = hashlib.sha1()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()[:16]


def file_fingerprint(root, paths):
    """A digest of the files' names and bytes, in order: what a cached gallery is keyed by.
    A file that cannot be opened (a broken link) counts by its name; embedding skips it."""
    digest = hashlib.sha1()
    for path in paths:
        try:
            with open(os.path.join(root, path), 'rb') as f:
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


class ImageReader:
    """Reads image files as the checkpoint's test transform sees them, and notes how they
    differ from its training images (size, normalisation) and how they were read (bit depth,
    orientation, ...: datasets.ImageNotes), each said once."""

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
        """3 x S x S float32 normalised tensor of the image at `path` (raises OSError or
        datasets.UnreadableImage when it cannot be read)."""
        with open(path, 'rb') as f:
            data = f.read()
        # Decoded as the run decoded its own test images, so a training folder embeds here as
        # its kNN evaluation saw it.
        with datasets.open_image(data, self.read_notes, path) as img:
            if img.size != (self.image_size, self.image_size):
                self.resized += 1
            rgb = datasets.to_rgb(img, self.image_size, self.read_notes, path)
        pixels = np.asarray(rgb).astype(np.float32) / 255.0
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
            found.append(f'note: {self.resized} of {self.count} images are not {size} x {size} '
                         f'px: each is resized (shorter side) and centre-cropped to {size} px, '
                         f'the checkpoint\'s image size')
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
                batch_size=EMBED_BATCH):
    """Embed the images at `paths` (relative to `root`); unreadable files are skipped."""
    reader = ImageReader(image_size, mean, std)
    skipped = []

    def batches():
        images, positions = [], []
        for position, path in enumerate(paths):
            try:
                images.append(reader.read(os.path.join(root, path)))
                positions.append(position)
            except (OSError, datasets.UnreadableImage) as err:
                skipped.append((path, datasets.failure_reason(err)))
            if len(images) == batch_size or (position == len(paths) - 1 and images):
                yield torch.stack(images).to(device), torch.tensor(positions)
                images, positions = [], []
    steps = -(-len(paths) // batch_size)
    features, kept = embed(net, progress_bar(batches(), total=steps, desc='embed', enabled=show,
                                         unit='batch'))
    return Embedded(features, kept.tolist(), skipped, reader.notes())


def report_skipped(skipped, say=print):
    """Each unreadable file named, then the count."""
    for path, reason in skipped:
        say(f'skipped {shown(path)}: cannot read it ({reason})')
    if skipped:
        noun = 'file' if len(skipped) == 1 else 'files'
        say(f'skipped {len(skipped)} unreadable {noun}')


def embed_folder(loaded, images, device, show=False, say=print):
    """(ImageList of the images embedded, N x D features) of an ImageList, with the skipped
    files and the notes said."""
    for note in images.notes:
        say(note)
    done = embed_files(loaded.net, images.root, images.paths, loaded.image_size, loaded.mean,
                       loaded.std, device, show)
    report_skipped(done.skipped, say)
    if not done.kept:
        raise UserError(f'{shown(images.root)} holds no readable image ({len(done.skipped)} '
                        f'files could not be read)')
    for note in done.notes:
        say(note)
    kept = ImageList(images.root, [images.paths[i] for i in done.kept],
                     images.labels[done.kept] if images.labels is not None else None,
                     images.classes)
    return kept, done.features


def write_npz(out, **arrays):
    """`arrays` into the .npz file `out`, under exactly that name, its folder made."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, 'wb') as f:     # a file object: np.savez would add .npz to other names
        np.savez(f, **arrays)


def save_embeddings(out, images, features, loaded, checkpoint, **extra):
    """The .npz of embedded images (see the module's docstring); `extra` arrays are added."""
    if images.labels is not None:
        extra.update(labels=images.labels, classes=np.asarray(images.classes))
    write_npz(out, features=features.cpu().numpy().astype(np.float32),
              paths=np.asarray(images.paths), root=os.path.abspath(images.root),
              image_size=loaded.image_size, mean=np.asarray(loaded.mean),
              std=np.asarray(loaded.std), checkpoint=os.path.abspath(checkpoint),
              reader_version=datasets.READER_VERSION, **extra)


def embed_command(argv):
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    loaded = load_network(args.ckpt, device)
    listed = list_folder(args.images)
    if not args.quiet:
        print(f'embedding {len(listed.paths)} image files of {args.images} with {args.ckpt} '
              f'({device.type})', flush=True)
    fingerprint = file_fingerprint(args.images, listed.paths)
    images, features = embed_folder(loaded, listed, device, show=not args.quiet)
    save_embeddings(args.out, images, features, loaded, args.ckpt, fingerprint=fingerprint,
                    checkpoint_digest=checkpoint_digest(args.ckpt))
    labels = (f', labels of {len(images.classes)} classes' if images.labels is not None
              else '')
    print(f'wrote {shown(args.out)}: {features.shape[0]} x {features.shape[1]} unit-length '
          f'features, paths relative to {shown(args.images)}{labels}')


def main(argv=None):
    return cli.run(embed_command, argv)


if __name__ == '__main__':
    sys.exit(main())
