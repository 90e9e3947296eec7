"""What a user is told works as typed: flags are answered before torch is imported, and help
texts say what each command does."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT


# ----------------------------------------------------------------------------- answered at once
PROBE = '''
import runpy, sys
target, sys.argv = sys.argv[1], sys.argv[1:]
sys.path.insert(0, {root!r})
code = 'no exit'
try:
    if target.endswith('.py'):
        runpy.run_path(target, run_name='__main__')
    else:
        runpy.run_module(target, run_name='__main__', alter_sys=True)
except SystemExit as exit_:
    code = exit_.code
print('torch imported' if 'torch' in sys.modules else 'torch not imported', code)
'''


@pytest.mark.parametrize('argv, code', [
    (['main.py', '--epcohs', '2'], 2),
    (['main.py', '--help'], 0),
    (['lib.embed', '--help'], 0),
    (['lib.embed', '--ckpt', 'x.t7'], 2),
    (['lib.retrieve', '--help'], 0),
    (['lib.linear_probe', '--help'], 0),
    (['lib.export', '--help'], 0),
    (['lib.visualize', '--help'], 0),
    (['lib.visualize'], 2),
    (['lib.visualize', 'curve', '--help'], 0),
    (['experiments/compare.py', '--help'], 0),
    (['bench/compare_curve.py', '--help'], 0),
    (['bench/epoch_speed.py', '--help'], 0),
    (['bench/augment_vs_pil.py', '--help'], 0),
])
def test_help_and_flag_errors_come_before_torch(argv, code):
    proc = subprocess.run([sys.executable, '-c', PROBE.format(root=ROOT), *argv],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.stdout.splitlines()[-1] == f'torch not imported {code}', proc.stderr


def test_a_torchvision_that_does_not_match_torch_is_one_line(tmp_path):
    """A torchvision built for another torch fails at import (simulated here by a package
    that raises what the real mismatch raises): one line, exit code 2."""
    fake = tmp_path / 'torchvision'
    fake.mkdir()
    (fake / '__init__.py').write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n')
    env = {**os.environ, 'PYTHONPATH': str(tmp_path)}
    for argv in (['main.py', '--epochs', '1'], ['-m', 'lib.embed', '--ckpt', 'x.t7',
                                                 '--images', '.', '--out', 'x.npz']):
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                              cwd=ROOT, env=env, timeout=120)
        assert proc.returncode == 2 and proc.stdout == ''
        assert re.fullmatch(r'error: torch \S+ and torchvision \S+ do not match \(operator '
                            r'torchvision::nms does not exist\): install a matching pair, e\.g\. '
                            r'pip install --upgrade torch torchvision .*\n', proc.stderr), \
            proc.stderr


# ----------------------------------------------------------------------------- help texts
def option_help(parser, flag):
    """The help text of `flag`, with argparse's %(default)s filled in."""
    action = next(a for a in parser._actions if flag in a.option_strings)
    return (action.help or '') % {'default': action.default}


def subcommand(parser, name):
    return next(a for a in parser._actions if a.dest == 'command').choices[name]


def test_help_texts_say_what_each_command_does():
    from experiments import compare
    from lib import export, linear_probe, visualize
    analysis = [linear_probe.build_parser(), export.build_parser(),
                subcommand(visualize.build_parser(), 'retrieval')]
    for parser in analysis:         # no --dataset flag there to refer to
        text = option_help(parser, '--data-root')
        assert '--dataset' not in text and "the checkpoint's" in text, text
    features = option_help(export.build_parser(), '--features')
    assert 'kNN' not in features and 'written' in features
    probe = linear_probe.build_parser()
    for flag in ('--batch-size', '--weight-decay'):
        assert len(option_help(probe, flag).split('(default')[0]) > 20, flag
    compare_parser = compare.build_parser()
    assert 'main.py' in option_help(compare_parser, '--data-root')
    curve = subcommand(visualize.build_parser(), 'curve')
    assert not any('--seed' in a.option_strings for a in curve._actions)


def test_visualize_without_a_command_lists_them(capsys):
    from lib import visualize
    assert visualize.main([]) == 2
    err = capsys.readouterr().err.splitlines()
    listed = [line.split()[0] for line in err if line.startswith('  ')]
    assert listed == ['retrieval', 'probabilities', 'embedding', 'curve']
    assert all(len(line.split()) > 3 for line in err if line.startswith('  '))   # a line each
    assert err[-1] == ('error: no command given: choose one of retrieval, probabilities, '
                       'embedding, curve')
