"""Export embeddings for other tools.

    python -m lib.export --ckpt checkpoint/ckpt.t7 --split test --out test.npz

Writes `features` (N x D float32: the network's eval-mode embeddings with the test transform,
or with `--features bank` the memory bank, training split only), `labels` (N), `indexes` (N,
each image's position in the full split, so subsets map back to files) and `classes`.
"""
import argparse
import os
import sys

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog='python -m lib.export',
                                description='Write a split\'s embeddings to an .npz file.')
    p.add_argument('--ckpt', required=True, help='checkpoint file')
    p.add_argument('--split', default='test', choices=('train', 'test'),
                   help='(default: %(default)s)')
    p.add_argument('--out', required=True, help='.npz file to write')
    p.add_argument('--features', default='network', choices=('network', 'bank'),
                   help='recomputed by the network, or the memory bank (train only) '
                        '(default: %(default)s)')
    p.add_argument('--data-root', dest='data_root', default=None,
                   help='data location (default: the one the checkpoint was trained with)')
    p.add_argument('--subset', type=int, default=None, help='override the checkpoint\'s subset')
    p.add_argument('--device', default='auto', choices=('auto', 'cuda', 'cpu'))
    return p.parse_args(argv)


def main(argv=None):
    from datasets import DataError
    from lib.build import load_for_analysis
    from lib.errors import UserError
    args = parse_args(argv)
    try:
        trained = load_for_analysis(args.ckpt, args.data_root, args.subset, args.device)
        features, labels = trained.embeddings(args.split, args.features)
    except (UserError, DataError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    image_set = trained.train if args.split == 'train' else trained.test
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez(args.out, features=features.cpu().numpy().astype(np.float32),
             labels=labels.cpu().numpy().astype(np.int64),
             indexes=np.asarray(image_set.indexes, dtype=np.int64),
             classes=np.asarray(image_set.classes))
    print(f'wrote {args.out}: {features.shape[0]} x {features.shape[1]} {args.features} features '
          f'of the {args.split} split')
    return 0


if __name__ == '__main__':
    sys.exit(main())
