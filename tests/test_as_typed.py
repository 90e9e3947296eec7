"""What a user is told works as typed: every command the program prints runs as printed, from
the folder it was run in, on the same run; --resume and --init-from take folders and whole
paths; flags are answered before torch is imported; help texts say what each command does."""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from conftest import MECHANICS, PYTHON, ROOT, fast_args
from lib import checkpoint as ckpt
from lib.errors import UserError


def main_program():
    """main.py's command as the program prints it from the current folder."""
    from lib.console import project_file
    return f'{PYTHON} {project_file("main.py")}'


def printed_command(text, program=None):
    """The one command `text` (a program's output) ends a line with, as argv after the
    program's name (default: main.py's, as printed from the current folder)."""
    program = program or main_program()
    found = [line[line.index(program):] for line in text.splitlines() if program in line]
    assert len(found) == 1, text
    words = shlex.split(found[0])
    assert words[:len(program.split())] == program.split()
    return words[len(program.split()):]


def epochs_logged(model_dir):
    return [(r['round'], r['epoch']) for r in map(json.loads, open(f'{model_dir}/log.jsonl'))
            if r['type'] == 'epoch']


# ----------------------------------------------------------------------------- printed commands
def test_every_printed_command_continues_the_same_run(tiny_folder, tmp_path, run_main,
                                                      monkeypatch):
    """A run with its own --model_dir, stopped, interrupted, finished and extended, each time
    by the command the previous step printed, run as printed from the same folder; the
    default model dir, which holds another run, is never touched."""
    monkeypatch.chdir(tmp_path)
    os.makedirs('checkpoint')
    decoy = {name: f'another run\'s {name}'.encode() for name in ('last.t7', 'log.jsonl')}
    for name, data in decoy.items():
        (tmp_path / 'checkpoint' / name).write_bytes(data)
    run = 'checkpoint/stoptest/'            # (a trailing slash: no // in what is printed)

    code, out, err = run_main(*fast_args(tiny_folder, run, *MECHANICS, '--rounds', '2',
                                         '--epochs', '1', '--stop-after', '1',
                                         '--no-tensorboard', '--cache-dir', 'my-cache'))
    assert code == 0, err
    assert 'logs in checkpoint/stoptest/log.jsonl' in out and '//' not in out
    assert f'continue with: {main_program()} --model_dir checkpoint/stoptest/ --resume ' \
        f'last.t7' in out
    assert epochs_logged(run) == [(0, 0)]

    # A second Ctrl-C while the continued run works: out at once, saying what last.t7 holds.
    from lib import engine
    real_run_epoch = engine.run_epoch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(engine, 'run_epoch', interrupted)
    code, out, err = run_main(*printed_command(out))
    assert code == 130
    assert 'checkpoint/stoptest/last.t7 continues from round 1 epoch 0' in err
    monkeypatch.setattr(engine, 'run_epoch', real_run_epoch)

    code, out, err = run_main(*printed_command(err))
    assert code == 0, err
    assert 'resuming at round 1 epoch 0 from checkpoint/stoptest/last.t7' in out
    # Each continued in the image cache the first run was given (no checkpoint keeps it).
    assert re.search(r'^images: .* the image cache \S*my-cache$', out, re.M), out
    assert epochs_logged(run) == [(0, 0), (1, 0)]
    # The end names the run's files: the best epoch's, the last one's, the log.
    files = re.search(r'files: (\S+) holds the best epoch \(round (\d) epoch (\d)\), (\S+) the '
                      r'last \(round (\d) epoch (\d)\); the log is (\S+)$', out, re.M)
    best, last, log = files.group(1, 4, 7)
    assert (best, last, log) == ('checkpoint/stoptest/ckpt.t7', 'checkpoint/stoptest/last.t7',
                                 'checkpoint/stoptest/log.jsonl')
    best_state = torch.load(best, weights_only=True)
    assert (best_state['round'], best_state['epoch']) == tuple(map(int, files.group(2, 3)))
    last_state = torch.load(last, weights_only=True)
    assert (last_state['round'], last_state['epoch']) == tuple(map(int, files.group(5, 6))) \
        == (1, 0)

    # The folder alone continues it too (in that folder); finished, it says how to go on.
    code, out, err = run_main('--resume', 'checkpoint/stoptest')
    assert code == 0, err
    assert 'continuing the run in checkpoint/stoptest' in out and 'already finished' in out
    code, out, err = run_main(*printed_command(out))
    assert code == 0, err
    assert epochs_logged(run) == [(0, 0), (1, 0), (2, 0)]

    # Its best checkpoint cannot be continued: the error says how to evaluate it...
    code, out, err = run_main('--model_dir', run, '--resume', 'ckpt.t7')
    assert code == 2 and '--init-from checkpoint/stoptest/ckpt.t7 starts a new run' in err
    code, out, err = run_main(*printed_command(err))
    assert code == 0, err
    accuracy = re.search(r'kNN accuracy of checkpoint/stoptest/ckpt\.t7 .*', out).group()
    code, out, err = run_main('--resume', 'checkpoint/stoptest', '--test_only')   # the folder
    assert code == 0 and accuracy in out, err

    # A new run from its last epoch (round 2), in the same folder, would overwrite it: the
    # error gives another folder; there, --rounds 2 leaves nothing to train: one more round.
    code, out, err = run_main(*fast_args(tiny_folder, run, '--init-from', 'last.t7', '--rounds',
                                         '2', '--epochs', '1', '--no-tensorboard', *MECHANICS))
    assert code == 2 and 'a file this run would overwrite' in err
    command = printed_command(err)
    assert command[command.index('--init-from') + 1] == 'checkpoint/stoptest/last.t7'
    code, out, err = run_main(*command)
    assert code == 2 and 'is at round 2; with --rounds 2 there is nothing left to train' in err
    code, out, err = run_main(*printed_command(err))
    assert code == 0, err
    assert 'initialised from checkpoint/stoptest/last.t7 (round 2 epoch 0)' in out
    assert epochs_logged('checkpoint/stoptest-2') == [(2, 0)]

    for name, data in decoy.items():
        assert (tmp_path / 'checkpoint' / name).read_bytes() == data
    assert sorted(os.listdir('checkpoint')) == ['last.t7', 'log.jsonl', 'stoptest', 'stoptest-2']


def as_bash_reads(words):
    """The argv that bash makes of the command text `words` (the reference for quoting)."""
    out = subprocess.run(['bash', '-c', 'printf "%s\\0" ' + words], capture_output=True,
                         check=True).stdout
    return [os.fsdecode(word) for word in out.split(b'\0')[:-1]]


@pytest.mark.parametrize('word', ['plain', 'two words', "it's", '', 'café', 'back\\slash $HOME',
                                  os.fsdecode(b'caf\xe9'), os.fsdecode(b'\xff\xfe/x y'),
                                  'two\nlines', 'tab\there', '\u00a0before', "\\'\xe9"])
def test_a_printed_word_is_one_line_that_the_shell_reads_back_as_its_bytes(word):
    from lib.console import join, quote
    assert '\n' not in quote(word) and quote(word).isprintable()
    assert as_bash_reads(quote(word)) == [word]
    assert as_bash_reads(join([word, 'next', word])) == [word, 'next', word]


def test_a_folder_whose_name_is_not_utf8_is_continued_by_the_printed_command(
        tiny_folder, tmp_path, run_main, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = os.fsdecode(b'caf\xe9 run')          # Latin-1 bytes, as old zip tools write names
    code, out, err = run_main(*fast_args(tiny_folder, run, *MECHANICS, '--epochs', '2',
                                         '--rounds', '1', '--stop-after', '1',
                                         '--no-tensorboard'))
    assert code == 0, err
    line = next(line for line in out.splitlines() if 'continue with:' in line)
    assert line.isascii(), line
    program = main_program()
    argv = as_bash_reads(line[line.index(program) + len(program):])
    assert argv[:2] == ['--model_dir', run]
    code, out, err = run_main(*argv)
    assert code == 0, err
    assert epochs_logged(run) == [(0, 0), (0, 1)]


def test_a_printed_command_names_python3_only_where_that_is_this_python(tmp_path,
                                                                       monkeypatch):
    """A venv's python run by its path, the venv not on PATH: a python3 there that is the
    same file (a venv's python3 is a link to the system's) runs without the venv's packages,
    so the command names this interpreter's path, which has them. With this interpreter's
    folder first on PATH, python3 is this one: the command says python3."""
    from types import SimpleNamespace
    from lib import console
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv('TORCHELASTIC_RUN_ID', raising=False)
    elsewhere = tmp_path / 'bin'
    elsewhere.mkdir()
    os.symlink(os.path.realpath(sys.executable), elsewhere / 'python3')
    config = SimpleNamespace(model_dir='ck', argv=())

    def printed():
        return shlex.split(console.stopped_after_line(config, 1).split('continue with: ')[1])
    monkeypatch.setenv('PATH', str(elsewhere))
    words = printed()
    assert words[:2] == [sys.executable, 'main.py']
    finds = ('import importlib.util as u, sys; '            # (found, not imported: seconds)
             'sys.exit(any(u.find_spec(m) is None for m in ("torch", "PIL", "torchvision")))')
    proc = subprocess.run([words[0], '-c', finds], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    folder = os.path.dirname(sys.executable)
    if not os.path.isfile(os.path.join(folder, 'python3')):
        pytest.skip(f'{folder} holds no python3')
    monkeypatch.setenv('PATH', folder + os.pathsep + str(elsewhere))
    assert printed()[:2] == ['python3', 'main.py']
    ask = 'import sys; print(sys.prefix)'
    assert subprocess.run(['python3', '-c', ask], capture_output=True, text=True,
                          timeout=120).stdout.strip() == sys.prefix


# ----------------------------------------------------------------------------- --resume NAME
@pytest.mark.parametrize('model_dir, name, in_folder, meant', [
    ('checkpoint/quick', 'checkpoint/quick/ckpt.t7', ckpt.LAST, 'checkpoint/quick/ckpt.t7'),
    ('checkpoint/', 'checkpoint/quick', ckpt.LAST, 'checkpoint/quick/last.t7'),
    ('checkpoint/', 'checkpoint/quick', ckpt.BEST, 'checkpoint/quick/ckpt.t7'),
    ('checkpoint/', 'quick', ckpt.BEST, 'checkpoint/quick/ckpt.t7'),
    ('checkpoint/quick', 'ckpt.t7', ckpt.LAST, 'checkpoint/quick/ckpt.t7'),     # as released
    ('checkpoint/quick', 'ckpt_SAND.t7', ckpt.BEST, 'ckpt_SAND.t7'),            # here
    ('elsewhere', 'last.t7', ckpt.LAST, 'elsewhere/last.t7'),     # model dir first, as released
])
def test_resume_and_init_from_names_mean_what_was_meant(tmp_path, monkeypatch, model_dir,
                                                        name, in_folder, meant):
    monkeypatch.chdir(tmp_path)
    for path in ('checkpoint/quick/ckpt.t7', 'checkpoint/quick/last.t7', 'ckpt_SAND.t7',
                 'last.t7', 'elsewhere/last.t7'):
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        open(path, 'w').close()
    assert ckpt.resolve_path(model_dir, name, in_folder) == meant


def test_a_missing_checkpoint_names_both_places(tmp_path, monkeypatch):
    """In the order they are looked in: a path with a folder as typed first, a bare name in
    the model dir first."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r'^no checkpoint at checkpoint/quick \(nor at '
                                        r'checkpoint/checkpoint/quick\)$'):
        ckpt.resolve_path('checkpoint/', 'checkpoint/quick')
    with pytest.raises(UserError, match=r'^no checkpoint at checkpoint/missing.t7 \(nor at '
                                        r'missing.t7 in this folder\)$'):
        ckpt.resolve_path('checkpoint/', 'missing.t7')


def test_a_checkpoint_a_run_has_not_written_yet_says_so(tmp_path, monkeypatch):
    """A run's folder (its log.jsonl) without the checkpoint asked for: killed or still in its
    first epoch (none yet), or stopped in it (last.t7 only, which is named)."""
    monkeypatch.chdir(tmp_path)
    os.makedirs('run')
    open('run/log.jsonl', 'w').close()
    none_yet = ': the run in run has written none yet (the first is written at the end of its ' \
        'first epoch)'
    with pytest.raises(UserError) as raised:
        ckpt.resolve_path('run', 'last.t7')
    assert str(raised.value) == f'no checkpoint at run/last.t7 (nor at last.t7 in this folder)' \
        f'{none_yet}'
    with pytest.raises(UserError) as raised:
        ckpt.load('run/ckpt.t7')
    assert str(raised.value) == f'no checkpoint at run/ckpt.t7{none_yet}'
    open('run/last.t7', 'w').close()
    with pytest.raises(UserError) as raised:
        ckpt.load('run/ckpt.t7')
    assert str(raised.value) == ('no checkpoint at run/ckpt.t7: the run in run has last.t7 only '
                                 '(ckpt.t7 is written once an epoch is evaluated): give '
                                 'run/last.t7')
    with pytest.raises(UserError) as raised:        # a name mistyped: what is there
        ckpt.load('run/ckpt_t7')
    assert str(raised.value) == 'no checkpoint at run/ckpt_t7: the run in run holds last.t7'
    with pytest.raises(UserError) as raised:        # no run there: no guess
        ckpt.load('elsewhere/ckpt.t7')
    assert str(raised.value) == 'no checkpoint at elsewhere/ckpt.t7'


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
    (['tools.embed', '--help'], 0),
    (['tools.embed', '--ckpt', 'x.t7'], 2),
    (['tools.retrieve', '--help'], 0),
    (['tools.linear_probe', '--help'], 0),
    (['tools.export', '--help'], 0),
    (['tools.visualize', '--help'], 0),
    (['tools.visualize'], 2),
    (['tools.visualize', 'curve', '--help'], 0),
    (['experiments/compare.py', '--help'], 0),
    (['bench/compare_curve.py', '--help'], 0),
    (['bench/epoch_speed.py', '--help'], 0),
    (['bench/augment_vs_pil.py', '--help'], 0),
    (['bench/shutdown.py', '--help'], 0),
])
def test_help_and_flag_errors_come_before_torch(argv, code):
    proc = subprocess.run([sys.executable, '-c', PROBE.format(root=ROOT), *argv],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.stdout.splitlines()[-1] == f'torch not imported {code}', proc.stderr


@pytest.mark.parametrize('argv, needle', [
    (['--epcohs', '2'], 'unrecognized arguments: --epcohs 2 (did you mean --epochs?)'),
    (['--epoch', '2'], 'unrecognized arguments: --epoch 2 (did you mean --epochs?)'),
    (['--knn', '5'], 'unrecognized arguments: --knn 5'),
])
def test_a_flag_is_taken_only_whole_and_a_close_one_is_named(argv, needle, capsys):
    """No abbreviations: --epoch is not --epochs in silence."""
    from lib.config import parse
    with pytest.raises(SystemExit) as exit_:
        parse(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(f'error: {needle}') and \
        len(err.splitlines()) == 1, err


def test_a_mistyped_required_flag_is_named_with_the_one_meant(capsys):
    """argparse reports a missing required flag before an unknown one: --image for --images
    would only say that --images is required."""
    from tools import embed
    assert embed.main(['--ckpt', 'x.t7', '--image', 'photos', '--out', 'x.npz']) == 2
    assert capsys.readouterr().err == ('error: the following arguments are required: --images '
                                       '(--image: did you mean --images?)\n')
    from tools import visualize        # a flag of a subcommand, which the top parser reports
    assert visualize.main(['retrieval', '--ckpt', 'x.t7', '--labelz', 'a']) == 2
    assert capsys.readouterr().err == ('error: unrecognized arguments: --labelz a (did you mean '
                                       '--labels?)\n')


def test_a_torchvision_that_does_not_match_torch_is_one_line(tmp_path):
    """A torchvision built for another torch fails at import (simulated here by a package
    that raises what the real mismatch raises): one line, exit code 2, naming both versions
    and the command for this machine."""
    import torch
    fake = tmp_path / 'torchvision'
    fake.mkdir()
    (fake / '__init__.py').write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n')
    (fake / 'version.py').write_text("__version__ = '0.28.0+cpu'\n")
    env = {**os.environ, 'PYTHONPATH': str(tmp_path)}
    release = torch.__version__.split('+')[0]
    minor, patch = release.split('.')[1:3]
    for argv in (['main.py', '--epochs', '1'], ['-m', 'tools.embed', '--ckpt', 'x.t7',
                                                 '--images', '.', '--out', 'x.npz']):
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                              cwd=ROOT, env=env, timeout=120)
        assert proc.returncode == 2 and proc.stdout == ''
        assert proc.stderr == (
            f'error: torch {torch.__version__} and torchvision 0.28.0+cpu are from different '
            f'releases (torch {release} goes with torchvision 0.{int(minor) + 15}) (operator '
            f'torchvision::nms does not exist); this machine has no NVIDIA GPU: pip uninstall '
            f'-y torch torchvision && pip install torch=={release}+cpu torchvision==0.'
            f'{int(minor) + 15}.{patch}+cpu --index-url https://download.pytorch.org/whl/cpu\n')


def test_a_torchvision_whose_version_file_cannot_be_read_is_named_by_its_metadata(monkeypatch):
    """The mismatch message names torchvision's version from its version.py; without one (a
    broken install), from the installed package's metadata."""
    import importlib.metadata
    import importlib.util
    import datasets
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
    assert datasets.torchvision_build() == importlib.metadata.version('torchvision')
    assert datasets.installed('no-such-package-here') == 'unknown'


@pytest.mark.parametrize('torch_version, vision, gpu, cause, fix', [
    ('2.13.0+cpu', '0.28.0+cu128', False,
     'torch 2.13.0+cpu (a CPU build) and torchvision 0.28.0+cu128 (a CUDA 12.8 build) are one '
     'release in two builds',
     'pip uninstall -y torch torchvision && pip install torch==2.13.0+cpu '
     'torchvision==0.28.0+cpu --index-url https://download.pytorch.org/whl/cpu'),
    ('2.13.0+cpu', '0.28.0', True,
     'torch 2.13.0+cpu (a CPU build) and torchvision 0.28.0 (the default build) are one release '
     'in two builds', 'pip uninstall -y torch torchvision && pip install torch==2.13.0 '
                      'torchvision==0.28.0'),
    ('2.14.1', '0.28.0', True,
     'torch 2.14.1 and torchvision 0.28.0 are from different releases (torch 2.14.1 goes with '
     'torchvision 0.29)', 'pip uninstall -y torch torchvision && pip install torch==2.14.1 '
                          'torchvision==0.29.1'),
    ('2.11.0+cu128', '0.26.0+cu126', True,
     'torch 2.11.0+cu128 (a CUDA 12.8 build) and torchvision 0.26.0+cu126 (a CUDA 12.6 build) '
     'are one release in two builds',
     'pip uninstall -y torch torchvision && pip install torch==2.11.0 torchvision==0.26.0'),
])
def test_the_torch_pair_message_names_the_cause_and_a_fix_for_this_machine(
        torch_version, vision, gpu, cause, fix):
    import datasets
    machine = 'this machine has an NVIDIA GPU' if gpu else 'this machine has no NVIDIA GPU'
    assert datasets.mismatch_message(torch_version, vision, 'reason', gpu) == \
        f'{cause} (reason); {machine}: {fix}'


# ----------------------------------------------------------------------------- help texts
def option_help(parser, flag):
    """The help text of `flag`, with argparse's %(default)s filled in."""
    action = next(a for a in parser._actions if flag in a.option_strings)
    return (action.help or '') % {'default': action.default}


def subcommand(parser, name):
    return next(a for a in parser._actions if a.dest == 'command').choices[name]


def test_help_texts_say_what_each_command_does():
    from experiments import compare
    from tools import export, linear_probe, visualize
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


def all_parsers():
    from experiments import compare
    from lib.config import build_parser
    from tools import embed, export, linear_probe, retrieve, visualize
    parsers = [build_parser(), compare.build_parser(), embed.build_parser(),
               export.build_parser(), linear_probe.build_parser(), retrieve.build_parser()]
    commands = next(a for a in visualize.build_parser()._actions if a.dest == 'command')
    return parsers + list(commands.choices.values())


def test_every_help_line_says_its_default_once():
    for parser in all_parsers():
        for action in parser._actions:
            text = option_help(parser, action.option_strings[0]) if action.option_strings \
                else ''
            assert text.count('(default') <= 1, (parser.prog, action.option_strings, text)


def test_compare_refuses_epochs_that_do_not_split_into_rounds(capsys):
    from experiments import compare
    assert compare.main(['--runs', 'super-and:cifar10:resnet18:25', '--rounds', '2']) == 2
    err = capsys.readouterr().err
    assert '25 epochs do not split into --rounds 2 rounds' in err and 'e.g. 24 or 26' in err


@pytest.mark.parametrize('extra, flag', [('--batch_size 8 --epochs 3', '--epochs'),
                                         ('--workers 0 --method=super-and', '--method'),
                                         ('--device cpu --data_root x', '--data_root'),
                                         ('-r last.t7', '-r')])
def test_compare_extra_may_not_set_what_the_table_names(extra, flag, capsys):
    from experiments import compare
    assert compare.main(['--runs', 'lemniscate:cifar10:alexnet:1', '--extra', extra]) == 2
    assert f'--extra may not set {flag}:' in capsys.readouterr().err


def test_compare_paths_are_the_users_and_a_failed_run_fails_it(tmp_path, monkeypatch, capsys):
    """Paths typed relative to where compare runs (its runs start in the project's folder),
    and a run that fails is a row saying so and exit code 1."""
    from experiments import compare
    monkeypatch.chdir(tmp_path)
    code = compare.main(['--runs', 'lemniscate:cifar10:alexnet:1', '--data-root', 'missing',
                         '--work-dir', 'work', '--extra', '--device cpu'])
    out, err = capsys.readouterr()
    assert code == 1 and '1 of 1 runs failed: lemniscate:cifar10:alexnet:1' in err
    console = (tmp_path / 'work' / 'lemniscate_cifar10_alexnet_1' / 'console.txt').read_text()
    assert str(tmp_path / 'missing') in console
    assert '| lemniscate | cifar10 | alexnet | 1 x 1 | failed |' in \
        (tmp_path / 'work' / 'results.md').read_text()
    assert not os.path.exists(os.path.join(ROOT, 'work'))
    # A table that cannot be written: one line, exit code 2, and the table is still printed.
    code = compare.main(['--runs', 'lemniscate:cifar10:alexnet:1', '--data-root', 'missing',
                         '--work-dir', 'work', '--extra', '--device cpu', '--out',
                         '/proc/results.md'])
    out, err = capsys.readouterr()
    assert code == 2 and '| lemniscate | cifar10 | alexnet | 1 x 1 | failed |' in out
    assert err.splitlines()[-1] == ('error: cannot write /proc/results.md: No such file or '
                                    'directory')


def test_visualize_without_a_command_lists_them(capsys):
    from tools import visualize
    assert visualize.main([]) == 2
    err = capsys.readouterr().err.splitlines()
    listed = [line.split()[0] for line in err if line.startswith('  ')]
    assert listed == ['retrieval', 'probabilities', 'embedding', 'curve']
    assert all(len(line.split()) > 3 for line in err if line.startswith('  '))   # a line each
    assert err[-1] == ('error: no command given: choose one of retrieval, probabilities, '
                       'embedding, curve')


@pytest.mark.parametrize('program', ['main.py', os.path.join('tools', 'embed.py'),
                                     os.path.join('linked', 'main.py')])
def test_a_python_without_the_requirements_says_so_in_one_line(program, tmp_path):
    """`-S`: no site-packages, as the system's python3 beside a virtual environment; also
    for the project reached through a link."""
    os.symlink(ROOT, tmp_path / 'linked')
    proc = subprocess.run([sys.executable, '-S', program, '--help'], capture_output=True,
                          text=True, cwd=tmp_path if program.startswith('linked') else ROOT,
                          timeout=60)
    assert proc.returncode == 2 and proc.stdout == ''
    assert proc.stderr == (f'error: this Python ({sys.executable}) has no numpy, pillow, torch, '
                           f'torchvision, tqdm: install the requirements into it (pip install -r '
                           f'requirements.txt), or run the Python that has them\n')
