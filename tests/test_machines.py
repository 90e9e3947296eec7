"""Several machines: torchrun across nodes, tested as two nodes (two launchers) on this one
machine with gloo: the run equals the one-node run of as many processes; a node without the
checkpoint, with another one, or with other data stops every node with one line; a node that
never joins ends the others after the rendezvous timeout with one line."""
import os
import random
import socket
import subprocess
import sys

import torch

from conftest import (MECHANICS, ROOT, TWO_PROCESS_FLAGS, assert_same_training_state,
                      fast_args)

ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}
FLAGS = ['--rounds', '2', '--epochs', '1', '--batch_size', '8', '--pipeline', 'gpu',
         '--no-tensorboard', *MECHANICS]


def free_port():
    """A port free now, below the ephemeral range: a port from a bind to port 0 is free only
    until the kernel hands it to the next such bind (the other xdist worker's launchers, say),
    which it never does below that range."""
    try:
        with open('/proc/sys/net/ipv4/ip_local_port_range') as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = None
    ports = random.Random().sample(range(max(1024, low - 8000), low), 100) if low else []
    for port in ports + [0]:
        with socket.socket() as s:
            try:
                s.bind(('127.0.0.1', port))
            except OSError:
                continue                # taken
            return s.getsockname()[1]


def two_nodes(per_node, launcher=(sys.executable, '-m', 'torch.distributed.run'), timeout=600):
    """The run of `per_node[k]` (main.py's flags) on node k, two nodes of one process each
    meeting at a fresh port of this machine: [(exit code, stdout, stderr)] per node."""
    endpoint = f'127.0.0.1:{free_port()}'
    procs = [subprocess.Popen([*launcher, '--nnodes', '2', '--nproc_per_node', '1',
                               '--rdzv-backend', 'c10d', '--rdzv-endpoint', endpoint,
                               '--rdzv-id', 'test', os.path.join(ROOT, 'main.py'), *flags],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT, env=ENV)
             for flags in per_node]
    outputs = [proc.communicate(timeout=timeout) for proc in procs]
    return [(proc.returncode, *output) for proc, output in zip(procs, outputs)]


def error_lines(results):
    return [line for _, _, err in results for line in err.splitlines()
            if line.startswith('error (rank')]


def test_two_nodes_train_as_two_processes_of_one_node(tiny_folder, tmp_path, two_process_run):
    results = two_nodes([fast_args(tiny_folder, tmp_path / 'two', *TWO_PROCESS_FLAGS)] * 2)
    for code, out, err in results:
        assert code == 0, err[-3000:]
    printed = [out for _, out, _ in results if 'done:' in out]
    assert len(printed) == 1 and '2 processes' in printed[0]     # rank 0 prints, one node
    one_node, _, _ = two_process_run
    assert_same_training_state(torch.load(one_node / 'last.t7', weights_only=True),
                               torch.load(tmp_path / 'two' / 'last.t7', weights_only=True))


def test_a_node_without_the_checkpoint_or_with_another_is_refused_on_every_node(tiny_folder,
                                                                                 tmp_path):
    import main
    for name in ('a', 'b'):
        assert main.main(fast_args(tiny_folder, tmp_path / name, *FLAGS[:2], '--epochs', '2',
                                   '--stop-after', '1', *FLAGS[4:], '--seed',
                                   str(ord(name)))) == 0
    os.makedirs(tmp_path / 'empty')
    for other, needle in (('empty', 'cannot resume: no checkpoint'),
                          ('b', 'another file than rank 0')):
        results = two_nodes([['--model_dir', str(tmp_path / node), '--resume', 'last.t7',
                              '--device', 'cpu', '--workers', '0']
                             for node in ('a', other)])
        lines = error_lines(results)
        assert len(lines) == 2 and all(needle in line for line in lines), lines
        assert all(code != 0 for code, _, _ in results)
        assert 'every node needs the same checkpoint in its --model_dir' in lines[0]


def test_a_node_with_other_data_is_refused_before_the_first_step(tiny_folder, tmp_path):
    from conftest import write_image_folder
    other = write_image_folder(tmp_path / 'other', seed=1)
    results = two_nodes([fast_args(root, tmp_path / 'run', *FLAGS)
                         for root in (tiny_folder, other)])
    lines = error_lines(results)
    assert len(lines) == 2, [err[-2000:] for _, _, err in results]
    assert all('reads other data than rank 0' in line and 'every node needs the same data '
               'under its --data-root' in line for line in lines)
    assert not os.path.exists(tmp_path / 'run' / 'last.t7')


def test_a_node_that_never_joins_ends_the_others_in_one_line(tiny_folder, tmp_path):
    endpoint = f'127.0.0.1:{free_port()}'
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'tools', 'launch.py'), '--nnodes', '2',
         '--nproc_per_node', '1', '--rdzv-backend', 'c10d', '--rdzv-endpoint', endpoint,
         '--rdzv-conf', 'join_timeout=2', os.path.join(ROOT, 'main.py'),
         *fast_args(tiny_folder, tmp_path / 'run', *FLAGS)],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env=ENV)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f'error: not every node joined the run at {endpoint} within 2 s (2 asked for by '
        f'--nnodes): start this launcher on each node with the same --rdzv-endpoint and '
        f'--rdzv-id, or wait longer with --rdzv-conf join_timeout=SECONDS')
    assert 'Traceback' not in proc.stderr
