"""Export a checkpoint's embeddings of its own data for other tools.

    python -m tools.export --ckpt checkpoint/ckpt.t7 --split test --out test.npz

Writes `features` (N x D float32: the network's eval-mode embeddings with the test transform,
or with `--features bank` the memory bank, training split only), `labels` (N), `indexes` (N,
each image's position in the full split, so subsets map back to files) and `classes`. For any
folder of images, `python -m tools.embed` does the same.
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

from lib.analysis import load_for_analysis  # noqa: E402
from tools.embed import write_npz  # noqa: E402


def export(argv):
    args = build_parser().parse_args(argv)
    trained = load_for_analysis(args.ckpt, args.data_root, args.subset, args.device)
    features, labels = trained.embeddings(args.split, args.knn_features)
    image_set = trained.train if args.split == 'train' else trained.test
    write_npz(args.out, features=features.cpu().numpy().astype(np.float32),
              labels=labels.cpu().numpy().astype(np.int64),
              indexes=np.asarray(image_set.indexes, dtype=np.int64),
              classes=np.asarray(image_set.classes))
    print(f'wrote {args.out}: {features.shape[0]} x {features.shape[1]} {args.knn_features} '
          f'features of the {args.split} split')


def main(argv=None):
    return cli.run(export, argv)


if __name__ == '__main__':
    sys.exit(main())
