"""Put a main.py log's kNN curve next to the published run's (SPEC section 8).

    python bench/compare_curve.py run.log [--round 0]
"""
import argparse
import re

# SPEC 8: kNN top-1 % of the released run (CIFAR-10, ResNet18) by (round, epoch-in-round).
PUBLISHED_EPOCHS = (0, 4, 9, 19, 39, 79, 119, 159, 199)
PUBLISHED = {
    0: (25.80, 42.07, 48.73, 62.79, 69.64, 77.12, 79.68, 83.55, 84.54),
    1: (81.44, 81.40, 81.78, 80.39, 80.38, 82.85, 82.82, 86.78, 87.15),
    2: (84.10, 83.40, 84.29, 84.50, 84.08, 82.92, 84.72, 87.55, 88.26),
    3: (83.62, 85.59, 85.36, 85.64, 84.70, 85.54, 84.20, 87.97, 88.83),
    4: (84.94, 85.98, 85.29, 85.19, 86.14, 86.57, 86.27, 88.64, 89.03),
}
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
    for epoch, published in zip(PUBLISHED_EPOCHS, PUBLISHED[args.round]):
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
