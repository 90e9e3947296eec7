"""torchrun, with its own failures said in one line: the launcher for runs on several machines.

    # on each of 2 machines, the same command (HOST: one of them, reachable by both)
    python3 tools/launch.py --nnodes 2 --nproc_per_node 4 --rdzv-backend c10d \
        --rdzv-endpoint HOST:29400 --rdzv-id myrun main.py --sync-bn --model_dir /shared/run

It takes exactly torchrun's options (`python3 tools/launch.py --help` lists them) and runs
torchrun's own launcher. What differs is what a person reads when the launch itself fails,
where torchrun prints a 40-line traceback: a node that never joins the rendezvous ends the
others after the join timeout (torchrun's --rdzv-conf join_timeout, 600 s unless given) with
one line saying so (exit code 2); when a process fails, its own `error (rank N): ...` line is
what it printed, and the launcher adds one line (exit code 1). The commands a run prints then
repeat this launcher.
"""
import os
import sys

if not __package__:     # run by its path, python3 tools/<name>.py: the project's packages
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = 'tools'

from lib import cli  # noqa: E402


def main(argv=None):
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import (RendezvousError,
                                                          RendezvousTimeoutError)
    args = run.parse_args(argv)
    try:
        run.run(args)
    except RendezvousTimeoutError:
        timeout = rendezvous_setting(args, 'join_timeout', '600')
        print(f'error: not every node joined the run at {args.rdzv_endpoint} within {timeout} s '
              f'({args.nnodes} asked for by --nnodes): start this launcher on each node with '
              f'the same --rdzv-endpoint and --rdzv-id, or wait longer with --rdzv-conf '
              f'join_timeout=SECONDS', file=sys.stderr, flush=True)
        return 2
    except RendezvousError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f'error: the nodes could not meet at {args.rdzv_endpoint}: {reason}',
              file=sys.stderr, flush=True)
        return 2
    except ChildFailedError as err:
        codes = sorted({failure.exitcode for failure in err.failures.values()})
        print(f'error: {len(err.failures)} process(es) of this node ended with exit code '
              f'{", ".join(map(str, codes))}; what each said is above', file=sys.stderr,
              flush=True)
        return 1
    except SignalException as err:      # the launcher itself was stopped (Ctrl-C, a scheduler)
        print(f'stopped: the launcher got signal {err.sigval}; its processes were stopped with '
              f'it (what they wrote they said above)', file=sys.stderr, flush=True)
        return 128 + int(err.sigval)
    return 0


def rendezvous_setting(args, name, default):
    """A value of --rdzv-conf (key=value,key=value)."""
    for item in (args.rdzv_conf or '').split(','):
        key, _, value = item.partition('=')
        if key.strip() == name:
            return value.strip()
    return default


if __name__ == '__main__':
    cli.exit_program(main())
