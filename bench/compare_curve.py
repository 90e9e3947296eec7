"""Put a run's kNN curve next to the published run's (docs/ALGORITHM.md section 8).

    python bench/compare_curve.py MODEL_DIR_OR_LOG_JSONL [--round 0]

Reads the run's log.jsonl epoch records; prints a markdown table at the published epochs and
the seconds per epoch (the first epoch, a warm-up, and the median of the rest).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lib import cli  # noqa: E402
from lib.published import PUBLISHED_EPOCHS, PUBLISHED_TOP1  # noqa: E402
from lib.run_log import epoch_records, read_records  # noqa: E402


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
        rest = sorted(seconds[1:])
        steady = (f', median of the rest {rest[len(rest) // 2]:.2f} s (training + kNN)'
                  if rest else '')
        print(f'\n{cli.plural(len(seconds), "epoch")}, {sum(seconds):.0f} s in all; first '
              f'epoch {seconds[0]:.1f} s ({first_epoch_note(args.log, records[0])}){steady}')


def first_epoch_note(log, first):
    """What the first epoch's seconds hold: the warm-up (the augmentation's compilation, CUDA
    graphs recorded, caches filled); the step itself was compiled and checked before the epoch's
    clock started, in the seconds its invocation's start record gives."""
    starts = [r for r in read_records(log, note=lambda text: None) if r['type'] == 'start'
              and r.get('time', 0) <= first.get('time', float('inf'))]
    check = ((starts[-1] if starts else {}).get('compile') or {}).get('check')
    if isinstance(check, dict) and check.get('seconds') is not None:
        return f'warm-up; the step was compiled and checked in {check["seconds"]:.0f} s before it'
    return 'warm-up'


def main(argv=None):
    return cli.run(compare, argv)


if __name__ == '__main__':
    sys.exit(main())
