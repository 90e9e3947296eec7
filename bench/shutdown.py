"""What a program's shutdown costs after a run, with sys.exit and with lib.cli.exit_program.

    python bench/shutdown.py            # median of 5 of each

Each child imports torch, torchvision and main.py's modules, trains one SGD step of a small
network (the optimizer imports torch's compiler, as a run does), prints the time and exits one
way or the other; the figure is the seconds from that print to the child's end, as its parent
sees it. A benchmark, not a test: run it alone.
"""
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lib import cli  # noqa: E402

CHILD = '''
import sys, time
sys.path.insert(0, {root!r})
import torch
import main
from lib import cli
net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10))
optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True)
net(torch.randn(4, 3, 16, 16)).sum().backward()
optimizer.step()
print(time.time(), flush=True)
{exit}
'''
EXITS = {'sys.exit': 'sys.exit(0)', 'cli.exit_program': 'cli.exit_program(0)'}


def shutdown_seconds(exit_line):
    """Seconds from the child's last print to its end (its stderr goes to ours)."""
    proc = subprocess.Popen([sys.executable, '-c', CHILD.format(root=ROOT, exit=exit_line)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    proc.wait()
    if proc.returncode != 0 or not line:
        sys.exit(f'error: the child process failed (exit code {proc.returncode}; its error '
                 f'is above)')
    return time.time() - float(line)


def main():
    p = cli.Parser(description=__doc__.split('\n')[0])
    p.add_argument('--repeats', type=cli.POSITIVE_INT, default=5,
                   help='children of each kind (default: %(default)s)')
    args = p.parse_args()
    import torch
    print(f'PyTorch {torch.__version__}, {os.cpu_count()} cores, Python '
          f'{sys.version.split()[0]}')
    for name, line in EXITS.items():
        times = [shutdown_seconds(line) for _ in range(args.repeats)]
        print(f'{name:17} shutdown {statistics.median(times):.2f} s (median of {args.repeats}: '
              + ', '.join(f'{t:.2f}' for t in times) + ')')


if __name__ == '__main__':
    main()
