"""Put a run's kNN curve next to the published run's (docs/ALGORITHM.md section 8).

    python bench/compare_curve.py MODEL_DIR_OR_LOG_JSONL [--round 0]

Reads the run's log.jsonl epoch records; prints a markdown table at the published epochs and
the seconds per epoch (the first epoch, which compiles when the run does, and the median of
the rest).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lib import cli  # noqa: E402
from lib.published import PUBLISHED_EPOCHS, PUBLISHED_TOP1  # noqa: E402
from lib.run_log import epoch_records, last_of, read_records  # noqa: E402


def compare(argv):
    p = cli.Parser(description=__doc__.split('\n')[0])
    p.add_argument('log', help='a model dir holding log.jsonl, or the file')
    p.add_argument('--round', type=cli.NON_NEGATIVE_INT, default=0,
                   help='round to compare (default: %(default)s)')
    args = p.parse_args(argv)
    records = [r for r in epoch_records(args.log) if r['round'] == args.round]
    ours = {r['epoch']: r.get('knn_top1') for r in records}
    seconds = [r['seconds'] for r in records]
    print(f'| round {args.round} epoch | published kNN % | ours | difference |')
    print('|---|---|---|---|')
    for epoch, published in zip(PUBLISHED_EPOCHS, PUBLISHED_TOP1[args.round]):
        if ours.get(epoch) is not None:
            print(f'| {epoch} | {published:.2f} | {ours[epoch]:.2f} | '
                  f'{ours[epoch] - published:+.2f} |')
    if seconds:
        start = last_of(read_records(args.log, note=lambda text: None), 'start') or {}
        compiled = ((start.get('compile') or {}).get('used') or 'none') != 'none'
        rest = sorted(seconds[1:])
        steady = (f', median of the rest {rest[len(rest) // 2]:.2f} s (training + kNN)'
                  if rest else '')
        print(f'\n{cli.plural(len(seconds), "epoch")}, {sum(seconds):.0f} s in all; first '
              f'epoch {seconds[0]:.1f} s ({"with compilation" if compiled else "set-up"})'
              f'{steady}')


def main(argv=None):
    return cli.run(compare, argv)


if __name__ == '__main__':
    sys.exit(main())
