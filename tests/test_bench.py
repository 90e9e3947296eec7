"""The benchmark scripts keep working on the CPU (their output is checked, never their times)."""
import json
import os
import runpy
import sys

from conftest import ROOT


def run_script(capsys, monkeypatch, script, *argv):
    """bench/`script` as a program would run it (`__main__`, its argv), in this process (the
    seconds of a fresh interpreter's imports saved): its stdout."""
    monkeypatch.setattr(sys, 'argv', [script, *map(str, argv)])
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name='__main__')
    except SystemExit as exit_:
        assert exit_.code in (0, None), capsys.readouterr().err
    return capsys.readouterr().out


def test_epoch_speed_runs_every_phase_on_cpu(capsys, monkeypatch):
    out = run_script(capsys, monkeypatch, 'bench/epoch_speed.py', '--synthetic-n', 32, '--synthetic-test', 8,
                     '--device', 'cpu', '--steps', 1, '--warmup', 0, '--batch_size', 4,
                     '--pipeline', 'gpu', '--network', 'alexnet')
    for label in ('augmentation', 'memory-bank update', 'forward + losses + backward',
                  'whole training steps', 'images per second', 'network only', 'kNN pass',
                  'ANs discovery', 'whole epoch', 'ratio whole epoch / network only'):
        assert label in out, out


def test_epoch_speed_without_a_bank_and_with_100_classes(capsys, monkeypatch):
    """isif has no bank (no bank, knn or ans phase, no bank size line); the class count comes
    from the data, not a constant 10."""
    out = run_script(capsys, monkeypatch, 'bench/epoch_speed.py', '--synthetic-n', 16, '--synthetic-test', 4,
                     '--synthetic-classes', 100, '--device', 'cpu', '--steps', 1, '--warmup', 0,
                     '--batch_size', 4, '--pipeline', 'gpu', '--method', 'isif',
                     '--phases', 'aug,step')
    assert 'no memory bank' in out and 'memory bank (N x D' not in out


def test_compare_curve_reads_the_log_records(tmp_path, capsys, monkeypatch):
    def start(time, check):
        return json.dumps({'type': 'start', 'options': {}, 'time': time, 'compile': {
            'asked': 'auto', 'used': 'reduce-overhead', 'check': check}}) + '\n'
    with open(tmp_path / 'log.jsonl', 'w') as log:
        log.write(start(1.0, {'seconds': 41.2}))
        for e in range(40):
            if e == 10:             # a resume: its own compilation, not the first epoch's
                log.write(start(20.5, {'seconds': 7.0}))
            log.write(json.dumps({'type': 'epoch', 'round': 0, 'epoch': e, 'global_epoch': e,
                                  'loss': {'and': 1.0}, 'knn_top1': 20.0 + e, 'time': 2.0 + e,
                                  'seconds': 9.0 if e == 0 else 5.0}) + '\n')
    out = run_script(capsys, monkeypatch, 'bench/compare_curve.py', tmp_path)
    assert '| 0 | 25.80 | 20.00 | -5.80 |' in out
    assert '| 39 | 69.64 | 59.00 | -10.64 |' in out
    assert '40 epochs, 204 s in all; first epoch 9.0 s (warm-up; the step was compiled and ' \
        'checked in 41 s before it), median of the rest 5.00 s (training + kNN)' in out
    with open(tmp_path / 'log.jsonl', 'w') as log:      # one epoch: no rest to take the median of
        log.write(json.dumps({'type': 'start', 'options': {},       # (the CPU's default)
                              'compile': {'asked': 'auto', 'used': 'none', 'check': None}})
                  + '\n')
        log.write(json.dumps({'type': 'epoch', 'round': 0, 'epoch': 0, 'global_epoch': 0,
                              'loss': {'and': 1.0}, 'knn_top1': 20.0, 'seconds': 9.0}) + '\n')
    out = run_script(capsys, monkeypatch, 'bench/compare_curve.py', tmp_path)
    assert out.strip().splitlines()[-1] == '1 epoch, 9 s in all; first epoch 9.0 s (warm-up)'
