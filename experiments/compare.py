"""Rerun the paper's comparison on one machine: methods one after another, one table.

    python experiments/compare.py --data-root data                      # the short default
    python experiments/compare.py --data-root data --rounds 5 --runs super-and:cifar10:resnet18:1000
    python experiments/compare.py --runs super-and:cifar10:resnet18:40 and:cifar10:alexnet:40

Each run is `method:dataset:network:epochs`, epochs counting all rounds: methods with rounds
(super-and, and) split them over `--rounds` rounds, the others train one round of all of them,
so every method gets the same number of epochs. Each run is `main.py` in its own process
(its log and checkpoints under --work-dir); the table of final and best kNN top-1 and seconds
is printed and written to --out. The default, the four methods on CIFAR-10 for 20 epochs,
is sized for about 10 minutes of one H100.
"""
import argparse
import os
import re
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lib.recipes import RECIPES  # noqa: E402

DEFAULT_RUNS = [f'{m}:cifar10:resnet18:20' for m in ('lemniscate', 'isif', 'and', 'super-and')]
DONE = re.compile(r'done: best kNN top-1 ([\d.]+)% \(round (\d+) epoch (\d+).*final ([\d.]+)%')


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--runs', nargs='+', default=DEFAULT_RUNS, metavar='M:D:N:E',
                   help='method:dataset:network:epochs (default: the four methods, '
                        'CIFAR-10, ResNet18, 20 epochs)')
    p.add_argument('--rounds', type=int, default=2,
                   help='rounds of the methods that have rounds (default: %(default)s)')
    p.add_argument('--data-root', dest='data_root', default='./data')
    p.add_argument('--work-dir', dest='work_dir', default='checkpoint/compare',
                   help='logs and checkpoints, one folder per run (default: %(default)s)')
    p.add_argument('--out', default=None,
                   help='markdown table file (default: WORK_DIR/results.md)')
    p.add_argument('--extra', default='',
                   help='more main.py flags for every run, e.g. "--subset 5000 --device cpu"')
    return p.parse_args()


def schedule(method, epochs, rounds):
    """(rounds, epochs per round) giving `epochs` in all."""
    if RECIPES[method]['rounds'] > 1:
        rounds = max(1, min(rounds, epochs))
        return rounds, epochs // rounds
    return 1, epochs


def run_one(spec, args):
    method, dataset, network, epochs = spec.split(':')
    if method not in RECIPES:
        sys.exit(f'error: unknown method {method!r} in {spec!r}; choose from {sorted(RECIPES)}')
    rounds, per_round = schedule(method, int(epochs), args.rounds)
    folder = os.path.join(args.work_dir, spec.replace(':', '_'))
    os.makedirs(folder, exist_ok=True)
    command = [sys.executable, os.path.join(ROOT, 'main.py'), '--method', method,
               '--dataset', dataset, '--network', network, '--rounds', str(rounds),
               '--epochs', str(per_round), '--data-root', args.data_root,
               '--model_dir', folder, *shlex.split(args.extra)]
    print(f'== {spec}: {" ".join(command[1:])}', flush=True)
    start = time.time()
    with open(os.path.join(folder, 'log.txt'), 'w') as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=ROOT)
        done = None
        for line in proc.stdout:
            log.write(line)
            if '| lr ' in line or line.startswith(('done:', 'error')):
                print('   ' + line.rstrip(), flush=True)
            done = DONE.search(line) or done
        proc.wait()
    seconds = time.time() - start
    row = dict(method=method, dataset=dataset, network=network,
               schedule=f'{rounds} x {per_round}', seconds=seconds)
    if proc.returncode != 0 or done is None:
        row.update(final='failed', best=f'exit {proc.returncode}, see {folder}/log.txt')
    else:
        row.update(final=f'{float(done.group(4)):.2f}',
                   best=f'{float(done.group(1)):.2f} (r{done.group(2)} e{done.group(3)})')
    return row


def table(rows):
    lines = ['| method | dataset | network | rounds x epochs | final kNN top-1 % | '
             'best kNN top-1 % (when) | seconds |', '|---|---|---|---|---|---|---|']
    lines += [f"| {r['method']} | {r['dataset']} | {r['network']} | {r['schedule']} | "
              f"{r['final']} | {r['best']} | {r['seconds']:.0f} |" for r in rows]
    return '\n'.join(lines)


def main():
    args = parse_args()
    rows = [run_one(spec, args) for spec in args.runs]
    text = table(rows)
    out = args.out or os.path.join(args.work_dir, 'results.md')
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
    with open(out, 'w') as f:
        f.write(text + '\n')
    print('\n' + text + f'\n\n(written to {out}; "best" is the best of every epoch\'s test '
          'evaluation, as the paper reports; "final" is the last epoch\'s)')


if __name__ == '__main__':
    main()
