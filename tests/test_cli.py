"""main.py end to end on a generated tiny image folder: training, checkpoints, resume, errors."""
import os
import re
import shutil

import pytest
import torch

from conftest import (MECHANICS, UNBROKEN_FLAGS, assert_same_training_state, fast_args,
                      write_image_folder)


def percent(pattern, text):
    return [float(v) for v in re.findall(pattern, text)]


# ----------------------------------------------------------------------------- end to end
def test_train_two_rounds_then_test_only(tiny_folder, tmp_path, run_main):
    """The default network (ResNet18 with the Sobel branch), trained and then evaluated. (main.py
    as a program in a fresh interpreter: test_processes, test_as_typed.)"""
    code, out, err = run_main(*fast_args(tiny_folder, tmp_path, '--rounds', '2', '--epochs', '1'))
    assert code == 0, err
    epoch_lines = [l for l in out.splitlines() if l.startswith('round ') and '| lr' in l]
    assert len(epoch_lines) == 2
    for line in epoch_lines:
        for field in ('lr', 'UE weight', 'AND loss', 'aug loss', 'UE loss', 'kNN top-1', 'top-5',
                      'best', ' s'):
            assert field in line
    assert re.search(r'round 1: 5 anchors \(25\.0% of 20\), label consistency .* \d+\.\d\d%', out)
    best = percent(r'done: best kNN top-1 (\d+\.\d+)%', out)[0]
    assert best == max(percent(r'kNN top-1 (\d+\.\d+)%', out))
    assert sorted(os.listdir(tmp_path)) == ['ckpt.t7', 'config.json', 'last.t7', 'log.jsonl',
                                            'run.lock', 'runs']
    # (no temporary checkpoint files left behind)

    code, out, err = run_main('--resume', 'ckpt.t7', '--test_only', '--model_dir', tmp_path,
                              '--data-root', tiny_folder, '--workers', '0')
    assert code == 0, err
    assert percent(r'top-1 (\d+\.\d+)%', out) == [best]


def test_checkpoint_contents(tiny_folder, tmp_path, run_main):
    code, _, err = run_main(*fast_args(tiny_folder, tmp_path, '--rounds', '1', '--epochs', '1'))
    assert code == 0, err
    best = torch.load(tmp_path / 'ckpt.t7', weights_only=True)
    assert {'net', 'npc', 'ANs_discovery', 'acc', 'round', 'epoch'} <= set(best)
    # What the released code's loader needs: DataParallel keys, the bank's two buffers only.
    assert all(key.startswith('module.') for key in best['net'])
    assert 'module.conv1.weight' in best['net'] and 'module.sobel.1.weight' in best['net']
    assert set(best['npc']) == {'params', 'memory'}
    assert best['npc']['memory'].shape == (20, 128)
    assert (best['round'], best['epoch']) == (0, 0)
    last = torch.load(tmp_path / 'last.t7', weights_only=True)
    assert {'optimizer', 'rng', 'next', 'best', 'config'} <= set(last)
    assert last['next'] == {'round': 1, 'epoch': 0, 'step': 0}
    assert torch.equal(last['npc']['memory'], best['npc']['memory'])


def test_a_round_without_anchors_says_so_and_logs_null(tiny_folder, tmp_path, run_main):
    """int(20 images x 0.04 x round 1) = 0 anchors: the round trains on, its line says there
    are no pairs, and its record has no consistency or cosine (null, not 0% or NaN, which
    strict JSON readers refuse)."""
    import json
    code, out, err = run_main(*fast_args(tiny_folder, tmp_path, '--rounds', '2', '--epochs', '1',
                                         '--ANs_select_rate', '0.04', *MECHANICS))
    assert code == 0, err
    assert 'round 1: 0 anchors (0.0% of 20), so no (anchor, neighbour) pairs yet' in out

    def refuse(constant):
        raise AssertionError(f'{constant} in log.jsonl')
    records = [json.loads(line, parse_constant=refuse)
               for line in (tmp_path / 'log.jsonl').read_text().splitlines()]
    [anchors] = [r for r in records if r['type'] == 'round']
    assert (anchors['anchors'], anchors['consistency'], anchors['neighbour_similarity']) == \
        (0, None, None)


# Each pipeline resumes once: inside a round on one, at a round's start (anchors found again)
# on the other; the signal and kill tests resume both mid-epoch and at an epoch boundary.
@pytest.mark.parametrize('pipeline, stop_after', [('cpu', 2), ('gpu', 1)])
def test_resume_equals_unbroken_run(tiny_folder, tmp_path, run_main, unbroken_run, pipeline,
                                    stop_after):
    """Stopped after epoch k and resumed == never stopped (bank and weights, CPU, fixed seed).

    k = 1 resumes inside round 0; k = 2 resumes at the start of round 1 (anchors rediscovered).
    """
    code, out, err = run_main(*fast_args(tiny_folder, tmp_path, *UNBROKEN_FLAGS[pipeline],
                                         '--stop-after', stop_after))
    assert code == 0 and 'stopping after' in out, err
    code, out, err = run_main('--resume', 'last.t7', '--model_dir', tmp_path, '--data-root',
                              tiny_folder, '--workers', '0', '--pipeline', pipeline,
                              '--no-tensorboard')
    assert code == 0, err
    assert f'resuming at round {stop_after // 2} epoch {stop_after % 2}' in out
    assert_same_training_state(unbroken_run(pipeline),
                               torch.load(tmp_path / 'last.t7', weights_only=True))


def test_released_checkpoint_layout_evaluates(tiny_folder, tmp_path, run_main):
    """A file in the released layout (DataParallel `module.` keys, ANs buffers) loads."""
    import models
    from lib.core.memory_bank import MemoryBank
    from lib.core.neighbourhoods import ANsDiscovery
    net = models.build_network('resnet18')
    bank = MemoryBank(128, 20, 0.1, 0.5)
    ans = ANsDiscovery(20, 0.25, 1)
    ans.update(1, bank.memory, 0.1)
    torch.save({'net': {'module.' + k: v for k, v in net.state_dict().items()},
                'npc': bank.state_dict(), 'ANs_discovery': ans.state_dict(),
                'acc': 0.5, 'round': 1, 'epoch': 7}, tmp_path / 'ckpt_SAND.t7')
    code, out, err = run_main('--resume', 'ckpt_SAND.t7', '--test_only', '--model_dir',
                              tmp_path, '--data-root', tiny_folder, '--workers', '0')
    assert code == 0, err
    assert re.search(r'kNN accuracy of \S+/ckpt_SAND\.t7 \(round 1 epoch 7\): top-1 \d+\.\d\d%',
                     out)


# ----------------------------------------------------------------------------- errors
def assert_user_error(result, *needles):
    code, out, err = result
    assert code == 2, (out, err)
    assert 'Traceback' not in err
    assert 'error:' in err.strip().splitlines()[-1]
    for needle in needles:
        assert needle in err, err


def test_size_checks_name_what_does_not_fit(tiny_folder, tmp_path, run_main):
    # One image: no step of two images; three: the batch does not fit; with one round there
    # are no anchors to check.
    assert_user_error(run_main(*fast_args(tiny_folder, tmp_path / 'one', '--subset', '1',
                                          '--rounds', '1', *MECHANICS)),
                      'a run needs at least 2 training images, and there is 1')
    assert_user_error(run_main(*fast_args(tiny_folder, tmp_path / 'three', '--subset', '3',
                                          '--rounds', '1', *MECHANICS)),
                      '--batch_size 8 is larger than the 3 training images')
    assert_user_error(run_main(*fast_args(tiny_folder, tmp_path / 'two', '--rounds', '2',
                                          '--ANs_size', '20', *MECHANICS)),
                      '--ANs_size 20 needs more than 20 training images')
    from lib.build import load_data
    from lib.config import defaults             # one round finds no anchors: no size to check
    train, _ = load_data(defaults(data_root=tiny_folder, rounds=1, ANs_size=20, batch_size=8))
    assert len(train) == 20


@pytest.mark.parametrize('flags, needle', [
    (['--dataset', 'mnist'], '--dataset'),
    (['--network', 'vgg'], '--network'),
    (['--epochs', '0'], '--epochs'),
    (['--rounds', '0'], '--rounds'),
    (['--batch_size', '1'], '--batch_size'),
    (['--ANs_select_rate', '0'], '--ANs_select_rate'),
    (['--ANs_select_rate', '1.5'], '--ANs_select_rate'),
    (['--ANs_size', '0'], '--ANs_size'),
    (['--npc_t', '0'], '--npc_t'),
    (['--batch_t', '-0.1'], '--batch_t'),
    (['--test_only'], '--resume'),
])
def test_bad_flags(run_main, flags, needle):
    assert_user_error(run_main(*flags), needle)


def test_missing_data_is_one_line_exit_2(tmp_path, run_main):
    code, out, err = run_main('--data-root', tmp_path / 'nowhere', '--model_dir', tmp_path)
    assert code == 2 and 'Traceback' not in err
    assert len(err.strip().splitlines()) == 1
    assert 'no cifar10 data under' in err and 'image folder' in err


def test_malformed_folders(tmp_path, run_main):
    root = write_image_folder(tmp_path / 'data', train_per_class=1, test_per_class=1)
    args = ['--data-root', root, '--model_dir', tmp_path / 'ck', '--workers', '0']
    shutil.rmtree(os.path.join(root, 'test'))
    assert_user_error(run_main(*args), 'no test/ directory')
    write_image_folder(root, train_per_class=1, test_per_class=1)
    empty = os.path.join(root, 'train', 'class_03')
    for f in os.listdir(empty):
        os.remove(os.path.join(empty, f))
    assert_user_error(run_main(*args), 'holds no images')
    write_image_folder(root, train_per_class=1, test_per_class=1)
    with open(os.path.join(root, 'train', 'class_03', '0000.png'), 'wb') as f:
        f.write(b'not an image')
    assert_user_error(run_main(*args), 'cannot read image')
    shutil.rmtree(os.path.join(root, 'train', 'class_03'))
    shutil.rmtree(os.path.join(root, 'test', 'class_03'))
    assert_user_error(run_main(*args), 'has 9 classes')


def test_checkpoint_errors(tiny_folder, tmp_path, run_main):
    base = ['--test_only', '--model_dir', tmp_path, '--data-root', tiny_folder, '--workers', '0']
    assert_user_error(run_main('--resume', 'missing.t7', *base), 'no checkpoint at')
    (tmp_path / 'damaged.t7').write_bytes(b'\x80\x02garbage' * 10)
    assert_user_error(run_main('--resume', 'damaged.t7', *base), 'damaged')
    torch.save({'something': 1}, tmp_path / 'other.t7')
    assert_user_error(run_main('--resume', 'other.t7', *base), 'not a Super-AND checkpoint')
    import models
    from lib.core.memory_bank import MemoryBank
    torch.save({'net': models.build_network('resnet18').state_dict(),
                'npc': MemoryBank(128, 999, 0.1, 0.5).state_dict(), 'ANs_discovery': {},
                'acc': 0.1, 'round': 0, 'epoch': 0}, tmp_path / 'big.t7')
    assert_user_error(run_main('--resume', 'big.t7', *base), 'bank of 999 x 128', 'needs 20')


def test_an_option_is_declared_once(unbroken_run):
    """Each entry of OPTIONS is a flag (both spellings, its default in the help), a field of the
    frozen RunConfig in the same order, and a key of the options a checkpoint stores; a resume
    takes back exactly the options declared resumed."""
    from dataclasses import fields

    from lib.checkpoint import stored_options
    from lib.config import OPTIONS, RESUMED, Flags, RunConfig, build_parser, resolve
    names = [o.name for o in OPTIONS]
    assert [f.name for f in fields(RunConfig)] == names + ['typed', 'argv']
    actions = {a.dest: a for a in build_parser()._actions if a.dest != 'help'}
    assert sorted(actions) == sorted(names)
    for o in OPTIONS:
        assert set(o.flags) <= set(actions[o.name].option_strings)
        assert o.flags[0].lstrip('-').replace('-', '_') == o.name
    stored = stored_options(unbroken_run('cpu'))
    assert set(stored) == set(names)
    config = resolve(Flags({}, ()), stored, say=lambda line: None)
    defaults = {o.name: o.default for o in OPTIONS}
    assert {'network', 'epochs', 'batch_size'} <= {n for n in RESUMED if stored[n] != defaults[n]}
    assert {'model_dir', 'workers', 'device'} <= {n for n in names if n not in RESUMED and
                                                  stored[n] != defaults[n]}
    for name in names:
        want = stored[name] if name in RESUMED else defaults[name]
        if name not in ('mean', 'std'):     # (stored as lists)
            assert getattr(config, name) == want, name


def test_runs_started_in_one_second_get_tensorboard_folders_of_their_own(monkeypatch):
    """The default --name (the TensorBoard folder) of two runs that start in the same second,
    in two processes (a sweep): distinct, where they shared one folder and event file and one
    run's curves were lost. A typed name, or a resumed run's, is kept as it is."""
    import time
    from lib.config import parse, resolve
    monkeypatch.setattr(time, 'strftime', lambda fmt: '20261208-030537')
    names = []
    for pid in (4242, 4243):
        monkeypatch.setattr(os, 'getpid', lambda pid=pid: pid)
        names.append(resolve(parse([]), say=lambda line: None).name)
    assert names == ['super-and-cifar10-resnet18-20261208-030537-4242',
                     'super-and-cifar10-resnet18-20261208-030537-4243']
    assert resolve(parse(['--name', 'sweep/lr0.1']), say=lambda line: None).name == \
        'sweep/lr0.1'
    assert resolve(parse([]), {'name': 'earlier'}, say=lambda line: None).name == 'earlier'


def test_every_on_off_flag_takes_both_spellings_of_its_off_side():
    """--no-sobel and --no_sobel, --no-aug-loss and --no_aug_loss: every flag takes both
    spellings, the off side included (argparse made the dashed one only)."""
    from lib.cli import OnOff
    from lib.config import OPTIONS, parse
    switches = [o for o in OPTIONS if o.kind.get('action') is OnOff]
    assert {'sobel', 'aug_loss', 'ue_loss', 'cache', 'tensorboard'} <= {o.name for o in switches}
    for o in switches:
        body = o.name
        for on in (f'--{body}', f'--{body.replace("_", "-")}'):
            assert parse([on]).typed == {o.name: True}
        for off in (f'--no_{body}', f'--no-{body.replace("_", "-")}'):
            assert parse([off]).typed == {o.name: False}, off
    from tools import embed
    assert embed.build_parser().parse_args(['--ckpt', 'c', '--images', 'i', '--out', 'o.npz',
                                            '--no_cache']).cache is False
