"""Export a checkpoint's embeddings of its own data for other tools.

    python -m tools.export --ckpt checkpoint/ckpt.t7 --split test --out test.npz

Writes `features` (N x D float32: the network's eval-mode embeddings with the test transform,
or with `--features bank` the memory bank, training split only), `indexes` (N, each image's
position in the full split, so subsets map back to files), for image folders `paths` (N,
relative to `root`), and for labelled data `labels` (N) and `classes`; and what made them, as
tools.embed does (`checkpoint`, `checkpoint_digest`, `reader_version`, `image_size`, `mean`,
`std`) with `features_of` (network or bank), so that tools.retrieve takes the file of an image
folder (which has `paths`) as a gallery.

`python -m tools.embed` embeds any folder the same way, with one difference for a folder's
training split at a size other than its files': a run keeps its training images 8/7 larger (to
crop from) and evaluates them resized from that, as export does, while embed resizes each file
straight to the size; the two embeddings of one image then differ slightly (cosine about
0.998). Test splits, and images already at the size, give the same features either way.
"""
import os
import sys

if not __package__:     # run by its path, python3 tools/<name>.py: the project's packages
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = 'tools'

from lib import cli  # noqa: E402


def build_parser():
    p = cli.Parser(prog='python -m tools.export',
                   description='Write a split\'s embeddings to an .npz file.')
    cli.add_checkpoint_option(p)
    p.add_argument('--split', default='test', choices=('train', 'test'),
                   help='which split of the checkpoint\'s data (default: %(default)s)')
    p.add_argument('--out', required=True, type=cli.output_file('.npz'), metavar='FILE.npz',
                   help='the .npz file to write')
    cli.add_features_option(p, '--features', default='network',
                            help='what is written: the network\'s eval-mode embeddings of the '
                                 'split\'s images (test transform), or the memory bank\'s rows '
                                 '(training split of a run with a bank only)')
    cli.add_data_options(p)
    return p


if __name__ == '__main__':
    cli.parse_first(lambda: build_parser().parse_args())

# The engine, imported once the flags are known to be right (importing torch takes seconds).
import numpy as np  # noqa: E402

import datasets  # noqa: E402

from lib.analysis import labels_of, load_for_analysis, unlabeled_text  # noqa: E402
from lib.checkpoint import checkpoint_digest  # noqa: E402
from lib.errors import UserError  # noqa: E402
from tools.embed import write_npz  # noqa: E402


def export(argv):
    args = build_parser().parse_args(argv)
    if args.split == 'test' and not labels_of(args.ckpt, args.data_root):   # before the data
        raise UserError(f'{unlabeled_text(args.ckpt, args.data_root)}: there is no test split '
                        f'to export; --split train exports the training images')
    trained = load_for_analysis(args.ckpt, args.data_root, args.subset, args.device)
    features, labels = trained.embeddings(args.split, args.knn_features)
    image_set = trained.train if args.split == 'train' else trained.test
    extra = {}
    if image_set.paths is not None:             # image folders: rows map back to files
        extra.update(paths=np.asarray(image_set.paths), root=os.path.abspath(image_set.root))
    if image_set.labelled:
        extra.update(labels=labels.cpu().numpy().astype(np.int64),
                     classes=np.asarray(image_set.classes))
    if args.split == 'train' and args.knn_features == 'network' and \
            image_set.images.shape[1] != trained.config.image_size:
        print(f'note: these are the run\'s view of its training images, kept '
              f'{image_set.images.shape[1]} px and resized to {trained.config.image_size}; '
              f'python -m tools.embed resizes the files straight to '
              f'{trained.config.image_size} px, which moves each embedding slightly (cosine '
              f'about 0.998)')
    # What retrieve --gallery checks: which checkpoint, reader and image geometry made them.
    extra.update(checkpoint=os.path.abspath(args.ckpt),
                 checkpoint_digest=checkpoint_digest(args.ckpt),
                 reader_version=datasets.READER_VERSION, features_of=args.knn_features,
                 image_size=trained.config.image_size, mean=np.asarray(trained.mean),
                 std=np.asarray(trained.std))
    wrote = cli.wrote_or_replaced(args.out)
    write_npz(args.out, features=features.cpu().numpy().astype(np.float32),
              indexes=np.asarray(image_set.indexes, dtype=np.int64), **extra)
    print(f'{wrote} {args.out}: {features.shape[0]} x '
          f'{features.shape[1]} {args.knn_features} features of the {args.split} split')


def main(argv=None):
    return cli.run(export, argv)


if __name__ == '__main__':
    cli.exit_program(main())
