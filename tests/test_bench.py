"""The benchmark scripts keep working on the CPU (their output is checked, never their times)."""
import subprocess
import sys

from conftest import ROOT


def run_script(*argv):
    proc = subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_epoch_speed_runs_every_phase_on_cpu():
    out = run_script('bench/epoch_speed.py', '--synthetic-n', 32, '--synthetic-test', 8,
                     '--device', 'cpu', '--steps', 1, '--warmup', 0, '--batch_size', 4,
                     '--pipeline', 'gpu')
    for label in ('augmentation', 'memory-bank update', 'forward + losses + backward',
                  'whole training steps', 'images per second', 'network only', 'kNN pass',
                  'ANs discovery', 'whole epoch', 'ratio whole epoch / network only'):
        assert label in out, out


def test_compare_curve_reads_a_main_log(tmp_path):
    log = tmp_path / 'run.log'
    log.write_text(''.join(
        f'round 0 epoch {e:3d}/40 | lr 0.03000 | ue weight 0.0 | loss and 1 aug 1 ue 1 | '
        f'kNN top-1 {20 + e:.2f}% top-5 50.00% | best {20 + e:.2f}% | {9.0 if e == 0 else 5.0} s\n'
        for e in range(40)))
    out = run_script('bench/compare_curve.py', log)
    assert '| 0 | 25.80 | 20.00 | -5.80 |' in out
    assert '| 39 | 69.64 | 59.00 | -10.64 |' in out
    assert 'first epoch 9.0 s' in out and 'median of the rest 5.00 s' in out
