"""Resume means one thing: --resume continues a run exactly (both pipelines, also after a
signal mid-epoch), --init-from starts a new run from a checkpoint's weights, a resumed run
keeps its recipe, and a finished run is left alone."""
import json
import os
import re
import shlex
import signal

import numpy as np
import pytest
import torch

import datasets
import lib.checkpoint
from lib import engine
from conftest import MECHANICS, PYTHON, assert_same_training_state, fast_args, signal_at

SMALL = ['--rounds', '2', '--epochs', '1', '--no-tensorboard', '--quiet', *MECHANICS]


def test_resume_of_a_weights_only_checkpoint_is_refused(tiny_folder, tmp_path, run_main):
    code, _, err = run_main(*fast_args(tiny_folder, tmp_path, *SMALL))
    assert code == 0, err
    before = os.path.getmtime(tmp_path / 'last.t7')
    code, out, err = run_main('--resume', 'ckpt.t7', '--model_dir', tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert 'holds no optimizer state' in err and '--test_only' in err and '--init-from' in err
    assert os.path.getmtime(tmp_path / 'last.t7') == before


def test_init_from_starts_a_new_run_from_the_weights(tiny_folder, tmp_path, run_main):
    """A new run from a checkpoint's weights, bank and anchors, at its round. Its T, m and
    neighbourhood size are not taken: the new run's --npc_t and --npc_m apply at once, its
    --ANs_size at its next discovery (anchors taken keep the neighbours they were found with),
    each said, as the log records."""
    code, _, err = run_main(*fast_args(tiny_folder, tmp_path / 'first', *SMALL))
    assert code == 0, err
    path = tmp_path / 'first' / 'last.t7'
    source = torch.load(path, weights_only=True)
    code, out, err = run_main(*fast_args(tiny_folder, tmp_path / 'second', '--init-from', path,
                                         '--rounds', '3', '--epochs', '1', '--no-tensorboard',
                                         '--ANs_size', '3', '--npc_t', '0.2', '--npc_m', '0.25',
                                         *MECHANICS))
    assert code == 0, err
    start = [line for line in out.splitlines() if line.startswith('initialised from')]
    assert len(start) == 1
    assert (f"(round {source['round']} epoch {source['epoch']}): weights, bank and "
            f"{len(source['ANs_discovery']['anchor_indexes'])} anchors") in start[0]
    assert f"training starts at round {source['round']} epoch 0" in start[0]
    rounds_trained = [int(line.split()[1]) for line in out.splitlines()
                      if line.startswith('round ') and '| lr' in line]
    assert rounds_trained == list(range(source['round'], 3)) == [1, 2]
    assert (f'note: the 5 anchors of {path} have 1 neighbour each; --ANs_size 3 applies from '
            f'the next anchor discovery') in out
    assert (f'note: {path} was trained with --npc_t 0.1 --npc_m 0.5; this run goes on with '
            f'--npc_t 0.2 --npc_m 0.25') in out
    state = torch.load(tmp_path / 'second' / 'last.t7', weights_only=True)
    assert state['optimizer']['state']                    # a new optimizer that has stepped
    assert state['round'] == 2 and state['config']['ANs_size'] == 3
    assert state['ANs_discovery']['neighbours'].shape == (10, 3)
    assert state['npc']['params'].tolist() == pytest.approx([0.2, 0.25])


def test_init_from_takes_the_weights_not_the_options(tiny_folder, tmp_path, run_main):
    """A new run from --init-from has the options typed for it and the defaults, never the
    source run's (only --resume continues a run with its own options)."""
    code, _, err = run_main(*fast_args(tiny_folder, tmp_path / 'first', *SMALL, '--lr', '0.01',
                                       '--knn-k', '7'))
    assert code == 0, err
    code, out, err = run_main(*fast_args(tiny_folder, tmp_path / 'second', '--init-from',
                                         tmp_path / 'first' / 'ckpt.t7', '--rounds', '3',
                                         '--epochs', '1', '--no-tensorboard', '--quiet',
                                         *MECHANICS))
    assert code == 0, err
    assert 'options from the checkpoint' not in out
    start = next(json.loads(line) for line in open(tmp_path / 'second' / 'log.jsonl')
                 if json.loads(line)['type'] == 'start')
    assert start['options']['lr'] == 0.03 and start['options']['knn_k'] == 200
    # Without the network it was trained with, one line says which to type.
    code, out, err = run_main(*fast_args(tiny_folder, tmp_path / 'third', '--init-from',
                                         tmp_path / 'first' / 'ckpt.t7', '--rounds', '3'))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert 'holds alexnet' in err and 'builds resnet18' in err and '--network' in err


def test_a_resumed_run_keeps_its_recipe(tiny_folder, tmp_path, run_main):
    code, _, err = run_main(*fast_args(tiny_folder, tmp_path, '--rounds', '2', '--epochs', '2',
                                       '--stop-after', '1', '--no-tensorboard', '--quiet',
                                       *MECHANICS))
    assert code == 0, err
    for flags, needle in ((['--method', 'and'], '--method and contradicts'),
                          (['--no-ue-loss'], '--no-ue-loss contradicts'),
                          (['--image-size', '16'], '--image-size 16 contradicts the run in '),
                          (['--image-size', '16', '--test_only'],
                           '(image_size = 32): its bank holds the embeddings of the images as '
                           'they were'),
                          (['--mean', '0.5', '0.5', '0.5'], '--mean 0.5 0.5 0.5 contradicts')):
        code, out, err = run_main('--resume', 'last.t7', '--model_dir', tmp_path, *flags)
        assert code == 2 and needle in err, err
    stored = torch.load(tmp_path / 'last.t7', weights_only=True)['config']
    assert stored['method'] == 'super-and' and stored['ue_loss'] is True
    # Typing the stored value is fine; --data-root, --batch_size... come from the checkpoint.
    # A typed momentum and weight decay replace the optimizer file's, as the records say.
    code, out, err = run_main('--resume', 'last.t7', '--model_dir', tmp_path, '--method',
                              'super-and', '--workers', '0', '--momentum', '0.8', '--wd', '0.001')
    assert code == 0, err
    assert not (tmp_path / 'runs').exists()          # --no-tensorboard kept
    state = torch.load(tmp_path / 'last.t7', weights_only=True)
    [group] = state['optimizer']['param_groups']
    assert (group['momentum'], group['weight_decay']) == (0.8, 0.001)
    assert (state['config']['momentum'], state['config']['weight_decay']) == (0.8, 0.001)
    # Scored with another normalisation of both sides: an evaluation of its own.
    code, out, err = run_main('--resume', 'last.t7', '--model_dir', tmp_path, '--test_only',
                              '--mean', '0.5', '0.5', '0.5', '--knn-features', 'network',
                              '--workers', '0')
    assert code == 0 and 'top-1' in out, err


def test_a_finished_run_is_left_alone(tiny_folder, tmp_path, run_main):
    code, _, err = run_main(*fast_args(tiny_folder, tmp_path, *SMALL))
    assert code == 0, err
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    code, out, err = run_main('--resume', 'last.t7', '--model_dir', tmp_path)
    assert code == 0, err
    assert 'already finished' in out and 'top-1' in out
    # A typed --rounds below the rounds trained: counted from the checkpoint, and the command
    # suggested trains one more round than it holds.
    code, out, err = run_main('--resume', 'last.t7', '--model_dir', tmp_path, '--rounds', '1')
    assert code == 0, err
    assert 'already finished, and --rounds 1 is fewer rounds than it trained (2 of 2 rounds ' \
        'x 1 epoch trained; best kNN top-1' in out
    assert out.rstrip().endswith(f"--resume last.t7 --model_dir {tmp_path} --rounds 3")
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before


def test_best_so_far_before_any_evaluation():
    progress = lib.checkpoint.Progress()
    assert progress.best_text() == 'none yet'
    assert progress.record(0, 0, 0.25) and not progress.record(0, 1, 0.2)
    assert progress.best_text() == '25.00% (round 0 epoch 0)'


def test_cpu_pipeline_resumes_exactly_after_a_signal_mid_epoch(tiny_folder, tmp_path,
                                                               run_main, monkeypatch):
    """The stopped run and its continuation use 2 loader processes, the unbroken run none:
    each image's augmentation depends on (seed, round, epoch, index) only."""
    flags = ['--rounds', '1', '--epochs', '2', '--pipeline', 'cpu', '--batch_size', '2',
             '--no-tensorboard', *MECHANICS]
    code, _, err = run_main(*fast_args(tiny_folder, tmp_path / 'whole', *flags))
    assert code == 0, err
    signal_at(monkeypatch, signal.SIGTERM, (0, 1, 5))   # drawing step 5 of the 10 of epoch 1
    code, out, err = run_main(*fast_args(tiny_folder, tmp_path / 'stopped', *flags),
                              '--workers', '2')
    monkeypatch.undo()
    assert code == 0, err
    assert 'SIGTERM: stopping at the next step' in out
    assert 'stopped by SIGTERM at round 0 epoch 1 step 6' in out and 'done:' not in out
    # The command it prints, run as printed; its progress bar counts on from the step.
    command = shlex.split(out.split('continue with: ')[1].splitlines()[0])
    assert command[:2] == [*shlex.split(PYTHON), 'main.py']
    bars = []

    def progress_bar(iterable, **kwargs):
        bars.append(kwargs)
        return iterable
    monkeypatch.setattr(engine, 'progress_bar', progress_bar)
    code, out, err = run_main(*command[2:], '--workers', '2')
    assert code == 0 and 'done:' in out, err
    assert (bars[0]['desc'], bars[0]['total'], bars[0]['initial']) == ('round 0 epoch 1', 10, 6)
    assert_same_training_state(torch.load(tmp_path / 'whole' / 'last.t7', weights_only=True),
                               torch.load(tmp_path / 'stopped' / 'last.t7', weights_only=True))


def test_augmentation_depends_on_epoch_seed_and_index_only():
    rng = np.random.default_rng(0)
    images = datasets.ImageSet(rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
                               np.zeros(6, dtype=np.int64), ['a'], 'generated')
    views = datasets.AugmentedViews(images, datasets.train_transform((0.5,) * 3, (0.2,) * 3), 2)
    views.set_epoch(123)
    forwards = [views[i] for i in range(6)]
    torch.rand(7)                                               # the global stream moves on
    backwards = [views[i] for i in reversed(range(6))][::-1]
    for a, b in zip(forwards, backwards):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(forwards[0][0], forwards[0][1])        # two different views
    views.set_epoch(124)
    assert not torch.equal(views[0][0], forwards[0][0])           # another epoch, other views


def test_cuda_random_states_are_restored_only_for_present_devices(monkeypatch):
    restored = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'set_rng_state',
                        lambda state, device: restored.append(device))
    state = {'torch': torch.get_rng_state(), 'cuda': [torch.zeros(8, dtype=torch.uint8)] * 4}
    lib.checkpoint.set_rng_state(state, device_count=2)          # saved on 4 GPUs, now 2
    assert restored == [0, 1]


def test_an_older_last_t7_resumes_on_its_own_schedule_without_sentinels(tiny_folder, tmp_path,
                                                                        run_main):
    """Files written before --schedule existed trained on the absolute schedule, and stored
    -1 for "no best yet": resumed, they keep that schedule and print no -100%."""
    code, _, err = run_main(*fast_args(tiny_folder, tmp_path, '--rounds', '1', '--epochs', '3',
                                       '--stop-after', '1', '--quiet', '--no-tensorboard',
                                       *MECHANICS))
    assert code == 0, err
    state = torch.load(tmp_path / 'last.t7', weights_only=True)
    del state['config']['schedule']
    state['best'] = {'acc': -1.0, 'round': -1, 'epoch': -1}
    torch.save(state, tmp_path / 'last.t7')
    code, out, err = run_main('--resume', 'last.t7', '--model_dir', tmp_path, '--stop-after', '1')
    assert code == 0, err
    assert 'it continues on the released (absolute) schedule' in out
    # (a percentage, not any '-100': the default run name holds the time, as in -100440)
    assert 'best kNN top-1 so far: none yet' in out and not re.search(r'-100(\.\d+)?%', out)
    assert 'released, absolute epochs' in out and 'UE weight 0 throughout' in out


def test_init_from_refuses_to_overwrite_its_source(tiny_folder, tmp_path, run_main):
    code, _, err = run_main(*fast_args(tiny_folder, tmp_path, *SMALL))
    assert code == 0, err
    before = (tmp_path / 'ckpt.t7').read_bytes()
    code, _, err = run_main('--init-from', 'ckpt.t7', '--model_dir', tmp_path)
    assert code == 2 and 'would overwrite' in err and 'another folder' in err
    assert (tmp_path / 'ckpt.t7').read_bytes() == before


def test_a_last_t7_of_the_earlier_layout_keeps_its_loss_sums_by_name():
    """last.t7 files written before losses were kept by name held a part-done epoch's sums as
    a list [AND, aug, UE] (zeros for the losses a run did not take)."""
    older = {'next': {'round': 0, 'epoch': 1, 'step': 4, 'loss_sums': [17.5, 7.5, 9.25]},
             'round': 0, 'epoch': 0, 'acc': 0.1}
    progress = lib.checkpoint.progress_of(older)
    assert progress.loss_sums == {'and': 17.5, 'aug': 7.5, 'ue': 9.25}
    assert (progress.round, progress.epoch, progress.step) == (0, 1, 4)
    newer = {**older, 'format': 2, 'next': {**older['next'], 'loss_sums': {'and': 1.0}}}
    assert lib.checkpoint.progress_of(newer).loss_sums == {'and': 1.0}
