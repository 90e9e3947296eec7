"""Messages that tell the truth: one whole sentence per user error (exit 2), warnings where an
accuracy means nothing, Ctrl-C answered at once, plurals, and lines only for what a run has."""
import os
import signal
import subprocess
import sys

import pytest
import torch

import models
from conftest import MECHANICS, PYTHON, ROOT, fast_args, write_image_folder
from lib import cli
from lib.core.memory_bank import MemoryBank
from lib.stopping import StopSignals


def one_error_line(result, *needles):
    code, out, err = result
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def checkpoint_files(tmp_path):
    """A truncated, an empty, a foreign (pickled object) and a non-PyTorch file."""
    good = tmp_path / 'good.t7'
    torch.save({'net': {'w': torch.zeros(5000)}, 'npc': {}}, good)
    (tmp_path / 'truncated.t7').write_bytes(good.read_bytes()[:3000])
    (tmp_path / 'empty.t7').write_bytes(b'')
    torch.save({'net': torch.nn.Linear(2, 2), 'npc': {}}, tmp_path / 'foreign.t7')
    (tmp_path / 'notes.t7').write_text('some notes, not a checkpoint')
    return tmp_path


@pytest.mark.parametrize('name, needle', [
    ('truncated.t7', 'is truncated or damaged: it was not completely written or copied'),
    ('empty.t7', 'is empty (0 bytes)'),
    ('foreign.t7', 'holds Python objects other than tensors'),
    ('notes.t7', 'is a text file, not a PyTorch checkpoint: give the checkpoint file itself'),
])
def test_unusable_checkpoints_get_one_sentence(checkpoint_files, tiny_folder, run_main, name,
                                               needle):
    line = one_error_line(run_main('--resume', name, '--test_only', '--model_dir',
                                   checkpoint_files, '--data-root', tiny_folder), needle)
    assert 'weights_only' not in line and line.endswith(('copied', 'written', 'code)',
                                                         'itself'))


def test_network_mismatch_names_the_stored_network(tiny_folder, tmp_path, run_main):
    torch.save({'net': models.build_network('alexnet', sobel=False).state_dict(),
                'npc': MemoryBank(128, 20, 0.1, 0.5).state_dict(), 'ANs_discovery': {},
                'acc': 0.1, 'round': 0, 'epoch': 0}, tmp_path / 'alex.t7')
    one_error_line(run_main('--resume', 'alex.t7', '--test_only', '--model_dir', tmp_path,
                            '--data-root', tiny_folder),
                   'holds alexnet without the Sobel branch, cifar stem, 128-d embedding',
                   'this run builds resnet18 with the Sobel branch')


def test_model_dir_that_is_a_file(tiny_folder, tmp_path, run_main):
    (tmp_path / 'taken').write_text('a file')
    one_error_line(run_main(*fast_args(tiny_folder, tmp_path / 'taken', '--epochs', '1')),
                   '--model_dir', 'is a file, not a folder')


def test_missing_data_root_is_not_created(tmp_path, run_main):
    root = tmp_path / 'typo' / 'data'
    one_error_line(run_main('--data-root', root, '--model_dir', tmp_path / 'ck', '--epochs',
                            '1'), 'no cifar10 data under')
    assert not (tmp_path / 'typo').exists()


def test_warnings_when_the_accuracy_means_nothing(tmp_path, run_main):
    root = write_image_folder(tmp_path / 'one', classes=1, train_per_class=6, test_per_class=2)
    code, out, err = run_main('--dataset', 'folder', *fast_args(root, tmp_path / 'ck',
                              '--rounds', '1', '--epochs', '1', '--batch_size', '4',
                              '--knn-k', '6', '--subset', '50', '--no-tensorboard'))
    assert code == 0, err
    assert 'warning: 1 class: every kNN vote goes to it, so the accuracy means nothing' in out
    assert 'note: --subset 50 is more than the 6 training images there are: all of them are ' \
        'used' in out
    assert 'warning: --knn-k 6 is at least the 6 labelled training images' in out
    assert 'data: 6 training and 2 test images, 1 class,' in out
    assert '1 round x 1 epoch, 1 step of 4 images' in out


@pytest.mark.parametrize('classes', [5, 6])
def test_top5_of_five_classes_or_fewer_is_said_to_be_100_by_construction(classes, tmp_path,
                                                                         run_main, capsys):
    """With 5 classes or fewer every class is among the five best-scored: the linear probe's
    top-5 is 100% whatever the embedding, the kNN's a hit whenever the class got any vote
    (lib/core/knn.topk_correct); both say so, and with 6 classes neither does."""
    from tools import linear_probe
    root = write_image_folder(tmp_path / 'few', classes=classes, train_per_class=3,
                              test_per_class=2)
    code, out, err = run_main('--dataset', 'folder', *fast_args(
        root, tmp_path / 'ck', '--rounds', '1', '--epochs', '1', '--knn-k', '5',
        '--no-tensorboard', *MECHANICS))
    assert code == 0, err
    assert (f'note: with {classes} classes, kNN top-5 is a hit whenever the image\'s class got '
            f'any of its 5 neighbours\' votes, so it says little; top-1 is the measure'
            in out) == (classes <= 5)
    assert linear_probe.main(['--ckpt', str(tmp_path / 'ck'), '--epochs', '1', '--device', 'cpu',
                              '--quiet']) == 0
    out = capsys.readouterr().out
    assert (f'note: with {classes} classes, the five best-scored classes are all of them, so '
            f'top-5 is 100% by construction' in out) == (classes <= 5)
    assert 'top-5 100.00%' in out or classes > 5


def starred(method_line):
    return [part for part in method_line.split() if '=' in part and part.endswith('*')]


def test_lines_show_only_what_the_run_has(tiny_folder, tmp_path, run_main):
    code, out, err = run_main(*fast_args(tiny_folder, tmp_path, '--method', 'and', '--rounds',
                                         '1', '--epochs', '1', '--knn-k', '5',
                                         '--no-tensorboard'))
    assert code == 0, err
    method_line = out.splitlines()[0]
    assert method_line.startswith('method and:')
    assert starred(method_line) == ['rounds=1*']
    epoch_line = next(line for line in out.splitlines() if '| lr' in line)
    assert 'UE' not in epoch_line and 'aug' not in epoch_line and '| AND loss ' in epoch_line
    schedule_line = next(line for line in out.splitlines() if line.startswith('schedule'))
    assert 'UE' not in schedule_line
    assert 'warning' not in out
    code, out, err = run_main('--resume', 'ckpt.t7', '--test_only', '--model_dir', tmp_path)
    assert code == 0, err
    # Only what differs from the recipe is starred, typed now or in the run resumed.
    method_line = next(line for line in out.splitlines() if line.startswith('method'))
    assert starred(method_line) == ['rounds=1*']
    assert method_line.endswith('(* differs from the and recipe)')
    code, out, err = run_main(*fast_args(tiny_folder, tmp_path / 'plain', '--epochs', '1',
                                         '--stop-after', '1', '--knn-k', '5', '--quiet',
                                         '--no-tensorboard'))
    assert code == 0, err
    assert '(*' not in out.splitlines()[0]              # nothing typed: no legend


def test_first_signal_is_answered_at_once_second_ctrl_c_interrupts():
    said = []
    with StopSignals(said.append) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop() and said == ['Ctrl-C: stopping at the next step, after writing last.t7; '
                                   'Ctrl-C again to quit at once']
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_a_ctrl_c_while_torch_is_imported_is_one_line(capsys, monkeypatch):
    """The seconds of `import torch` come before any handler of the program's own: Ctrl-C
    there was a KeyboardInterrupt traceback."""
    import datasets

    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(datasets, 'import_torchvision', interrupted)
    with pytest.raises(SystemExit) as exit_:
        cli.parse_first(lambda: None, 'stopped by Ctrl-C: nothing was trained or written')
    assert exit_.value.code == 130
    assert capsys.readouterr().err == 'stopped by Ctrl-C: nothing was trained or written\n'


def test_interrupt_is_exit_130_and_one_line(capsys):
    def interrupted(argv):
        raise KeyboardInterrupt
    assert cli.run(interrupted, interrupted='interrupted: stopped at once') == 130
    assert capsys.readouterr().err == 'interrupted: stopped at once\n'


def test_a_reader_that_goes_away_is_exit_1_without_a_traceback():
    """`python -m tools.retrieve ... | head -1`: the command ends quietly when its reader
    closes the pipe (every entry point runs under cli.run)."""
    lines = ('from lib import cli; import sys; '
             'sys.exit(cli.run(lambda argv: [print(i) for i in range(10 ** 6)]))')
    proc = subprocess.Popen([sys.executable, '-c', lines], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == '0\n'
    proc.stdout.close()                             # as `head -1` does
    assert proc.wait(timeout=60) == 1
    assert proc.stderr.read() == ''
    # Another pipe that breaks is a bug, shown as one.
    other = ('from lib import cli; import os, sys; reader, writer = os.pipe(); os.close(reader); '
             'sys.exit(cli.run(lambda argv: os.write(writer, b"x")))')
    proc = subprocess.run([sys.executable, '-c', other], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and 'Traceback' in proc.stderr and 'BrokenPipeError' in proc.stderr


SHUTDOWN = """
import atexit, gc
from lib import cli
atexit.register(lambda: print('atexit ran, objects frozen:', gc.get_freeze_count() > 0))
class Cycle:
    def __del__(self):
        print('cycle finalised')
cycle = Cycle()
cycle.itself = cycle
del cycle                           # garbage that only the cyclic collector finds
cli.exit_program(3)
"""


def test_a_program_ends_with_its_code_its_exit_handlers_and_its_garbage_finalised():
    """cli.exit_program (how main.py and the tools end, sparing the shutdown's collections)
    still runs the atexit handlers and finalises the garbage there is."""
    proc = subprocess.run([sys.executable, '-c', SHUTDOWN], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.splitlines() == ['cycle finalised', 'atexit ran, objects frozen: True']


@pytest.mark.parametrize('argv, needle', [
    (['tools.linear_probe', '--ckpt', 'x.t7', '--epochs', '0'], '0 is not an integer >= 1'),
    (['tools.export', '--ckpt', 'x.t7', '--out', 'x.npz', '--subset', '-3'],
     '-3 is not an integer >= 1'),
])
def test_analysis_flags_are_validated(argv, needle, capsys):
    import importlib
    module = importlib.import_module(argv[0])
    assert module.main(argv[1:]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize('command', [
    ['tools.embed', '--ckpt', 'x.t7', '--images', '.', '--out', '{out}.npz'],
    ['tools.export', '--ckpt', 'x.t7', '--out', '{out}.npz'],
    ['tools.retrieve', '--ckpt', 'x.t7', '--gallery', '.', '--query', 'a.jpg',
     '--figure', '{out}.png'],
    ['tools.visualize', 'curve', '--log', 'x.jsonl', '--out', '{out}.png'],
])
@pytest.mark.parametrize('out, needle', [
    ('a_folder', 'is a folder; give the name of a file to write'),
    ('a_file/below', 'is a file, not a folder'),
])
def test_outputs_are_checked_before_any_work(command, out, needle, tmp_path, capsys):
    """A file that cannot be written is refused when the flags are read (the checkpoint,
    named second, is not even looked for), not after the embedding."""
    import importlib
    (tmp_path / 'a_folder.npz').mkdir()
    (tmp_path / 'a_folder.png').mkdir()
    (tmp_path / 'a_file').write_text('')
    argv = [word.format(out=tmp_path / out) for word in command]
    assert importlib.import_module(argv[0]).main(argv[1:]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize('argv, needle', [
    (['tools.retrieve', '--ckpt', 'x.t7', '--gallery', '.', '--query', 'a.jpg', '--figure',
      'grid'], 'grid does not end in .png, .jpg or .jpeg'),
    (['tools.visualize', 'curve', '--log', 'x.jsonl', '--out', 'c.eps'],
     'c.eps does not end in .png, .pdf, .svg, .jpg or .jpeg'),
    (['tools.visualize', 'embedding', '--ckpt', 'x.t7', '--perplexity', '0'],
     '0 is not a number > 0'),
    (['tools.embed', '--ckpt', 'x.t7', '--images', '.', '--out', 'x.csv'],
     'x.csv does not end in .npz'),
    (['tools.export', '--ckpt', 'x.t7', '--out', 'x.txt'], 'x.txt does not end in .npz'),
])
def test_figure_names_say_their_format(argv, needle, capsys):
    import importlib
    assert importlib.import_module(argv[0]).main(argv[1:]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_both_spellings_of_every_flag():
    from lib.config import build_parser, parse, resolve
    a = parse(['--batch-size', '8', '--data_root', 'x', '--knn_k', '3', '--no-ue_loss',
               '--name', 'n'])
    assert a.typed == {'batch_size': 8, 'data_root': 'x', 'knn_k': 3, 'ue_loss': False,
                       'name': 'n'}
    b = parse(['--batch_size', '8', '--data-root', 'x', '--knn-k', '3', '--no-ue-loss',
               '--name', 'n'])
    assert resolve(a, say=print).record() == resolve(b, say=print).record()
    # Both spellings are argparse's own option strings, shown side by side.
    shown = ' '.join(build_parser().format_help().split())
    assert '--batch_size B, --batch-size B' in shown
    assert '--data-root DIR, --data_root DIR' in shown


@pytest.mark.parametrize('argv, message', [
    (['--seed', '-1'], '--seed: -1 is not an integer from 0 to 2**64 - 1'),
    (['--seed', str(2 ** 64)], f'--seed: {2 ** 64} is not an integer from 0 to 2**64 - 1'),
    (['--name', 'a/../../../b'], '--name: a/../../../b is not a folder under --log-dir (not '
                                 'empty or absolute, no ..)'),
    (['--name', '..'], '--name: .. is not a folder under --log-dir (not empty or absolute, no ..)'),
    (['--name', ''], '--name:  is not a folder under --log-dir (not empty or absolute, no ..)'),
    (['--name', '/tmp/x'], '--name: /tmp/x is not a folder under --log-dir (not empty or '
                           'absolute, no ..)'),
])
def test_a_seed_torch_cannot_take_and_a_name_that_is_a_path_are_refused_at_once(argv, message,
                                                                              run_main):
    """Answered when the flags are read, as any flag error is: not a traceback once the run
    has started, nor TensorBoard events outside --log-dir."""
    assert run_main(*argv) == (2, '', f'error: argument {message}\n')


@pytest.mark.parametrize('value', ['1', '1.5', '-0.1', 'nan'])
def test_a_momentum_outside_0_to_1_is_refused_at_once(value, run_main):
    """SGD with a momentum of 1 or more never forgets a gradient and diverges; a negative
    one alternates. The ends of the range are taken."""
    from lib.config import parse
    assert run_main('--momentum', value) == \
        (2, '', f'error: argument --momentum: {value} is not a number in [0, 1)\n')
    assert [parse(['--momentum', ok]).typed['momentum'] for ok in ('0', '0.999')] == [0, 0.999]


def test_the_ends_of_the_seed_range_and_a_plain_name_are_taken():
    import torch
    from lib.config import parse
    for seed in (0, 2 ** 64 - 1):
        assert parse(['--seed', str(seed), '--name', 'sweep/run.2-b']).typed == \
            {'seed': seed, 'name': 'sweep/run.2-b'}         # (nested under --log-dir)
        torch.manual_seed(seed)                 # (what the run does with it)


def test_a_continue_command_repeats_what_was_typed_of_this_machine(monkeypatch):
    """The options no checkpoint keeps (the image cache, the processes, the device...) as
    typed, in either spelling; not those the command sets itself, nor what the checkpoint
    keeps."""
    from types import SimpleNamespace
    from lib import console
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv('TORCHELASTIC_RUN_ID', raising=False)
    argv = ('--data-root', 'd', '--cache-dir', 'my cache', '--no-cache', '--workers=0', '--lr',
            '0.1', '--stop-after', '2', '--model_dir', 'x', '--quiet', '--data_memory', '2',
            '--device', 'cpu', '--eval-precision', 'bf16', '--compile-check', 'off', '--seed',
            '3')
    line = console.stopped_after_line(SimpleNamespace(model_dir='ck', argv=argv), 2)
    assert line == (f"stopping after 2 epochs (--stop-after); continue with: {PYTHON} main.py "
                    f"--model_dir ck --resume last.t7 --cache-dir 'my cache' --no-cache "
                    f"--workers=0 --quiet --data_memory 2 --device cpu --eval-precision bf16 "
                    f"--compile-check off")


def test_a_suggested_command_replaces_an_option_however_it_was_typed(monkeypatch):
    """What an error suggests (`retyped`) is the command as typed with the named options
    replaced, whether they were typed as aliases (-r), with '=' or in the other spelling, and
    with every other word kept, values with several words (--mean R G B) included."""
    from types import SimpleNamespace
    from lib import console
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv('TORCHELASTIC_RUN_ID', raising=False)
    argv = ('-r', 'last.t7', '--wd=0.001', '--mean', '0.5', '-0.25', '0.5', '--model-dir', 'a',
            '--no-sobel', '--rounds', '2', '--ANs-size=3')
    assert console.retyped(argv, {'--resume': 'b/last.t7', '--model_dir': 'b',
                                  '--rounds': '3'}) == (
        f'{PYTHON} main.py --wd=0.001 --mean 0.5 -0.25 0.5 --no-sobel --ANs-size=3 '
        f'--resume b/last.t7 --model_dir b --rounds 3')
    # -rNAME (argparse's short flag with its value attached) is a flag, not a value of the one
    # before it: replaced when --resume is, kept when another option is, never repeated as a
    # word of this machine.
    argv = ('--workers', '0', '-rlong/last.t7', '--rounds', '1', '--device', 'cpu')
    assert console.retyped(argv, {'--rounds': '2'}) == \
        f'{PYTHON} main.py --workers 0 -rlong/last.t7 --device cpu --rounds 2'
    assert console.retyped(argv, {'--resume': 'x.t7'}) == \
        f'{PYTHON} main.py --workers 0 --rounds 1 --device cpu --resume x.t7'
    assert console.continue_command(SimpleNamespace(model_dir='b', argv=argv)) == \
        f'{PYTHON} main.py --model_dir b --resume last.t7 --workers 0 --device cpu'


@pytest.mark.parametrize('resumes_at, held', [
    (None, 'no checkpoint had been written yet'),
    ((1, 2, 0), f'ck/last.t7 continues from round 1 epoch 2; continue with: {PYTHON} main.py '
                f'--model_dir ck --resume last.t7 --workers 3')])
def test_a_lost_loader_worker_says_what_to_do_and_what_last_t7_holds(resumes_at, held,
                                                                      monkeypatch):
    from types import SimpleNamespace
    from lib import console
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv('TORCHELASTIC_RUN_ID', raising=False)
    line = console.lost_loader_line(SimpleNamespace(model_dir='ck', workers=3,
                                                    argv=('--lr', '1', '--workers', '3')),
                                    SimpleNamespace(resumes_at=resumes_at), None)
    assert line == ('a data-loader worker process was killed (out of memory? --workers 3 starts '
                    'that many; fewer take less memory); ' + held)
