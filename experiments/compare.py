"""Rerun the paper's comparison on one machine: methods one after another, one table.

    python experiments/compare.py --data-root data                      # the short default
    python experiments/compare.py --data-root data --rounds 5 --runs super-and:cifar10:resnet18:1000
    python experiments/compare.py --runs super-and:cifar10:resnet18:40 and:cifar10:alexnet:40

Each run is `method:dataset:network:epochs`, epochs counting all rounds: methods with rounds
(super-and, and) split them over `--rounds` rounds, the others train one round of all of them,
so every method gets the same number of epochs. Each run is `main.py` in its own process
(its log.jsonl and checkpoints under --work-dir); the table of final and best kNN top-1 and
seconds is made from each run's log records and printed and written to --out. The default, the
four methods on CIFAR-10 for 20 epochs, is sized for about 10 minutes of one H100.
"""
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lib import cli, run_folder  # noqa: E402
from lib.config import OPTIONS  # noqa: E402
from lib.errors import UserError  # noqa: E402
from lib.core.recipes import RECIPES  # noqa: E402
from lib.run_log import last_of, read_records  # noqa: E402

DEFAULT_RUNS = [f'{m}:cifar10:resnet18:20' for m in ('lemniscate', 'isif', 'and', 'super-and')]


def build_parser():
    p = cli.Parser(description=__doc__.split('\n')[0])
    p.add_argument('--runs', nargs='+', default=DEFAULT_RUNS, metavar='M:D:N:E',
                   help='method:dataset:network:epochs (default: the four methods, '
                        'CIFAR-10, ResNet18, 20 epochs)')
    p.add_argument('--rounds', type=cli.POSITIVE_INT, default=2,
                   help='rounds of the methods that have rounds (default: %(default)s)')
    p.add_argument(*cli.spellings('--data-root'), dest='data_root', default='./data',
                   help='the data of every run, as main.py\'s --data-root (default: '
                        '%(default)s)')
    p.add_argument(*cli.spellings('--work-dir'), dest='work_dir', default='checkpoint/compare',
                   help='logs and checkpoints, one folder per run (default: %(default)s)')
    p.add_argument('--out', default=None, type=cli.OUTPUT_FILE,
                   help='markdown table file (default: WORK_DIR/results.md)')
    p.add_argument('--extra', default='',
                   help='more main.py flags for every run, e.g. "--subset 5000 --device cpu"')
    return p


def schedule(method, epochs, rounds, spec=None):
    """(rounds, epochs per round) giving `epochs` in all.

    Raises:
        UserError: `epochs` that do not split evenly into the rounds (the run would train
            fewer epochs than its row says).
    """
    if RECIPES[method]['rounds'] > 1:
        rounds = max(1, min(rounds, epochs))
        if epochs % rounds:
            raise UserError(f'run {spec or method}: {epochs} epochs do not split into '
                            f'--rounds {rounds} rounds of equal length; give a multiple of '
                            f'{rounds}, e.g. {epochs - epochs % rounds} or '
                            f'{epochs - epochs % rounds + rounds}')
        return rounds, epochs // rounds
    return 1, epochs


def parse_spec(spec):
    """(method, dataset, network, epochs) of `method:dataset:network:epochs`."""
    parts = spec.split(':')
    if len(parts) != 4 or not parts[3].isdigit() or int(parts[3]) < 1:
        raise UserError(f'run {spec!r} is not method:dataset:network:epochs (epochs >= 1)')
    if parts[0] not in RECIPES:
        raise UserError(f'unknown method {parts[0]!r} in {spec!r}; choose from '
                        f'{", ".join(sorted(RECIPES))}')
    return parts[0], parts[1], parts[2], int(parts[3])


def summary(folder):
    """(final, best, where) kNN top-1 % of a finished run, from its log.jsonl records."""
    try:
        end = last_of(read_records(folder), 'end')
    except UserError:            # no log at all: the run failed before its first record
        return None
    if end is None or end.get('final_top1') is None:
        return None
    return end['final_top1'], end['best_top1'], (end['best_round'], end['best_epoch'])


def run_one(spec, args):
    method, dataset, network, epochs = parse_spec(spec)
    rounds, per_round = schedule(method, epochs, args.rounds, spec)
    folder = os.path.join(args.work_dir, spec.replace(':', '_'))
    os.makedirs(folder, exist_ok=True)
    command = [sys.executable, os.path.join(ROOT, 'main.py'), '--method', method,
               '--dataset', dataset, '--network', network, '--rounds', str(rounds),
               '--epochs', str(per_round), '--data-root', args.data_root,
               '--model_dir', folder, *shlex.split(args.extra)]
    print(f'== {spec}: {" ".join(command[1:])}', flush=True)
    start = time.time()
    # The spec's new run replaces its last one, records included (main.py refuses a folder
    # that holds a run, so its files go first), unless that run is live: its lock refuses.
    with run_folder.acquire(folder):
        for name in ('log.jsonl', 'last.t7', 'ckpt.t7'):
            if os.path.exists(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))
    # The console is shown as it comes and kept for reading; the table uses the records.
    # (Run from here: paths in --extra are too. Leaving the `with` closes the pipe and waits.)
    with open(os.path.join(folder, 'console.txt'), 'w') as console, \
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) as proc:
        for line in proc.stdout:
            console.write(line)
            print('   ' + line.rstrip(), flush=True)
    seconds = time.time() - start
    row = dict(method=method, dataset=dataset, network=network,
               schedule=f'{rounds} x {per_round}', seconds=seconds)
    result = summary(folder) if proc.returncode == 0 else None
    if result is None:
        row.update(final='failed', best=f'exit {proc.returncode}, see {folder}/console.txt')
    else:
        final, best, (best_round, best_epoch) = result
        row.update(final=f'{final:.2f}', best=f'{best:.2f} (r{best_round} e{best_epoch})')
    return row


def table(rows):
    lines = ['| method | dataset | network | rounds x epochs | final kNN top-1 % | '
             'best kNN top-1 % (when) | seconds |', '|---|---|---|---|---|---|---|']
    lines += [f"| {r['method']} | {r['dataset']} | {r['network']} | {r['schedule']} | "
              f"{r['final']} | {r['best']} | {r['seconds']:.0f} |" for r in rows]
    return '\n'.join(lines)


# What each run's spec and compare's own flags set, and what would make a run other than a
# fresh one: --extra may not set them (the table would name what did not run).
SET_BY_COMPARE = ('method', 'dataset', 'network', 'rounds', 'epochs', 'data_root', 'model_dir')
NOT_FRESH = ('resume', 'init_from', 'test_only')


def check_extra(extra):
    """Raises UserError when `extra` sets what the run specs and compare's flags set, or
    makes a run other than a fresh one."""
    flags = {o.name: o.flags for o in OPTIONS}
    for word in shlex.split(extra):
        typed = word.split('=', 1)[0]
        if any(typed in flags[name] for name in SET_BY_COMPARE):
            raise UserError(f'--extra may not set {typed}: each run\'s '
                            f'method:dataset:network:epochs, --rounds, --data-root and '
                            f'--work-dir set it, and the table names what they set')
        if any(typed in flags[name] for name in NOT_FRESH):
            raise UserError(f'--extra may not set {typed}: every run of the comparison trains '
                            f'from scratch, in a folder of its own')


def compare(argv):
    args = build_parser().parse_args(argv)
    check_extra(args.extra)
    # Whole paths in the commands and the table (the runs start here, so --extra's are right).
    args.data_root = os.path.abspath(args.data_root)
    args.work_dir = os.path.abspath(args.work_dir)
    for spec in args.runs:                    # every spec checked before the first run
        method, _, _, epochs = parse_spec(spec)
        schedule(method, epochs, args.rounds, spec)
    rows = [run_one(spec, args) for spec in args.runs]
    text = table(rows)
    out = args.out or os.path.join(args.work_dir, 'results.md')
    written = 'replaced' if os.path.exists(out) else 'written to'
    print('\n' + text)                  # (first: a file that cannot be written loses no result)
    with cli.writing(out), open(out, 'w') as f:
        f.write(text + '\n')
    print(f'\n({written} {out}; "best" is the best of every epoch\'s test evaluation, as the '
          'paper reports; "final" is the last epoch\'s)')
    failed = [spec for spec, row in zip(args.runs, rows) if row['final'] == 'failed']
    if failed:
        print(f'{len(failed)} of {len(rows)} runs failed: {" ".join(failed)}', file=sys.stderr)
        return 1


def main(argv=None):
    return cli.run(compare, argv)


if __name__ == '__main__':
    sys.exit(main())
