"""Put a main.py log's kNN curve next to the published run's (SPEC section 8).

    python bench/compare_curve.py run.log [--round 0]
"""
import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lib.config import PUBLISHED_EPOCHS, PUBLISHED_TOP1  # noqa: E402

LINE = re.compile(r'round (\d+) epoch\s+(\d+)/\d+ .*kNN top-1 ([\d.]+)% .*\| ([\d.]+) s$')


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('log')
    p.add_argument('--round', type=int, default=0)
    args = p.parse_args()
    ours, seconds = {}, []
    with open(args.log) as f:
        for line in f:
            m = LINE.search(line.strip())
            if m and int(m.group(1)) == args.round:
                ours[int(m.group(2))] = float(m.group(3))
                seconds.append(float(m.group(4)))
    print(f'| round {args.round} epoch | published kNN % | ours | difference |')
    print('|---|---|---|---|')
    for epoch, published in zip(PUBLISHED_EPOCHS, PUBLISHED_TOP1[args.round]):
        if epoch in ours:
            print(f'| {epoch} | {published:.2f} | {ours[epoch]:.2f} | '
                  f'{ours[epoch] - published:+.2f} |')
    if seconds:
        steady = sorted(seconds[1:])[len(seconds[1:]) // 2] if len(seconds) > 1 else seconds[0]
        print(f'\n{len(seconds)} epochs, {sum(seconds):.0f} s in all; '
              f'first epoch {seconds[0]:.1f} s '
              f'(compilation), median of the rest {steady:.2f} s (training + kNN)')


if __name__ == '__main__':
    main()
