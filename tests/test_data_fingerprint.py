"""A checkpoint is never scored against other data in silence: the training data's
fingerprint is stored in every checkpoint and checked on --resume, --init-from and by the
analysis commands."""
import os
import re

import numpy as np
import torch

import datasets
from conftest import MECHANICS, fast_args, write_image_folder


def test_fingerprint_tells_data_sets_apart(tmp_path):
    write_image_folder(tmp_path / 'a', classes=3, train_per_class=2, seed=0)
    write_image_folder(tmp_path / 'b', classes=3, train_per_class=2, seed=1)  # same names
    a, _ = datasets.load_dataset('folder', str(tmp_path / 'a'))
    again, _ = datasets.load_dataset('folder', str(tmp_path / 'a'))
    b, _ = datasets.load_dataset('folder', str(tmp_path / 'b'))
    assert a.fingerprint == again.fingerprint
    assert a.fingerprint['images'] == b.fingerprint['images'] == 6
    assert a.fingerprint['labels'] == b.fingerprint['labels']        # same label order...
    assert a.fingerprint['content'] != b.fingerprint['content']      # ...other images
    # The same pixels as arrays (torchvision's files) or as files, or in another order, differ.
    as_arrays = datasets.ImageSet(a.images, a.targets, a.classes, 'arrays')
    assert as_arrays.fingerprint['content'] != a.fingerprint['content']
    order = np.arange(6)[::-1]
    reordered = datasets.ImageSet(a.images[order], a.targets[order], a.classes, 'arrays')
    assert reordered.fingerprint['labels'] != as_arrays.fingerprint['labels']
    assert reordered.fingerprint['content'] != as_arrays.fingerprint['content']
    # A subset is fingerprinted as what it is.
    assert a.subset([0, 1]).fingerprint['images'] == 2
    assert a.subset([0, 1]).fingerprint != a.subset([0, 2]).fingerprint


def test_test_only_on_other_images_is_refused(tiny_folder, tmp_path, run_main):
    code, _, err = run_main(*fast_args(tiny_folder, tmp_path / 'run', '--rounds', '1',
                                       '--epochs', '1', '--no-tensorboard', '--quiet',
                                       *MECHANICS))
    assert code == 0, err
    other = write_image_folder(tmp_path / 'other', seed=5)   # 20 images, same names and labels
    code, out, err = run_main('--resume', 'ckpt.t7', '--test_only', '--model_dir',
                              tmp_path / 'run', '--data-root', other, '--workers', '0')
    assert code == 2 and 'top-1' not in out
    line = err.strip().splitlines()
    assert len(line) == 1 and 'Traceback' not in err
    found = re.findall(r'content (files:[0-9a-f]{16})', line[0])
    assert 'was trained on other data' in line[0] and len(found) == 2 and found[0] != found[1]
    # Fewer images because of a typed --subset: said, with the run's own.
    code, out, err = run_main('--resume', 'ckpt.t7', '--test_only', '--model_dir',
                              tmp_path / 'run', '--subset', '6', '--workers', '0')
    assert code == 2 and '(14 images fewer; give the --data-root it was trained on, without ' \
        '--subset)' in err, err
    # The same data passes, also when --data-root is left to the checkpoint.
    code, out, err = run_main('--resume', 'ckpt.t7', '--test_only', '--model_dir',
                              tmp_path / 'run', '--workers', '0')
    assert code == 0 and 'top-1' in out, err


def test_the_same_images_labelled_are_scored_with_a_note(tiny_folder, tmp_path, run_main):
    """Trained on the images as one unlabeled folder, evaluated on them as a class tree in
    the same order: the bank fits (only the labels differ), so it is scored, with a note."""
    import shutil
    flat = tmp_path / 'flat'
    flat.mkdir()
    train = os.path.join(tiny_folder, 'train')
    for name in sorted(os.listdir(train)):             # class_00-0000.png...: the tree's order
        for image in sorted(os.listdir(os.path.join(train, name))):
            shutil.copy(os.path.join(train, name, image), flat / f'{name}-{image}')
    code, _, err = run_main(*fast_args(flat, tmp_path / 'run', '--dataset', 'folder', '--rounds',
                                       '1', '--epochs', '1', '--no-tensorboard', '--quiet',
                                       *MECHANICS))
    assert code == 0, err
    code, out, err = run_main('--resume', 'last.t7', '--test_only', '--model_dir',
                              tmp_path / 'run', '--data-root', tiny_folder, '--workers', '0')
    assert code == 0, err
    assert re.search(r'note: \S+last\.t7 was trained on these images in this order with other '
                     r'labels \(20 images, labels none, ', out), out
    assert 'top-1' in out


def test_a_checkpoint_without_fingerprint_is_accepted_with_a_note(tiny_folder, tmp_path,
                                                                   run_main):
    code, _, err = run_main(*fast_args(tiny_folder, tmp_path, '--rounds', '1', '--epochs', '1',
                                       '--no-tensorboard', '--quiet'))
    assert code == 0, err
    state = torch.load(tmp_path / 'ckpt.t7', weights_only=True)
    released = {k: state[k] for k in ('net', 'npc', 'ANs_discovery', 'acc', 'round', 'epoch')}
    torch.save(released, tmp_path / 'released.t7')
    code, out, err = run_main('--resume', 'released.t7', '--test_only', '--model_dir', tmp_path,
                              '--data-root', tiny_folder, '--workers', '0')
    assert code == 0, err
    notes = [line for line in out.splitlines() if 'fingerprint' in line]
    assert len(notes) == 1 and 'could not be checked' in notes[0]


def test_analysis_commands_check_the_data(tiny_folder, tmp_path, run_main, capsys):
    from tools import export
    code, _, err = run_main(*fast_args(tiny_folder, tmp_path / 'run', '--rounds', '1',
                                       '--epochs', '1', '--no-tensorboard', '--quiet',
                                       *MECHANICS))
    assert code == 0, err
    other = write_image_folder(tmp_path / 'other', seed=5)
    code = export.main(['--ckpt', str(tmp_path / 'run' / 'ckpt.t7'), '--data-root', other,
                        '--out', str(tmp_path / 'x.npz'), '--device', 'cpu'])
    assert code == 2 and 'was trained on other data' in capsys.readouterr().err


def test_a_data_folder_moved_since_training_is_said_to_be_the_runs(tmp_path, run_main, capsys):
    """The path that fails was never typed: it is the run's, from its checkpoint. The error
    says so and names the flag that gives the folder's new place, which then works."""
    from tools import export
    photos = write_image_folder(tmp_path / 'photos')
    code, _, err = run_main(*fast_args(photos, tmp_path / 'run', '--dataset', 'folder',
                                       '--rounds', '1', '--epochs', '1', '--no-tensorboard',
                                       '--quiet', *MECHANICS))
    assert code == 0, err
    moved = str(tmp_path / 'moved')
    os.rename(photos, moved)
    hint = (f"(--data-root {photos} is the run's own, from its checkpoint: if its images have "
            f"moved, give their new place with --data-root DIR)")
    for argv in (['--model_dir', tmp_path / 'run', '--resume', 'last.t7', '--rounds', '2'],
                 ['--resume', tmp_path / 'run', '--test_only']):
        code, _, err = run_main(*argv, '--workers', '0')
        assert code == 2 and err.strip().endswith(hint), err
        assert err.count('\n') == 1
    assert export.main(['--ckpt', str(tmp_path / 'run' / 'ckpt.t7'), '--device', 'cpu',
                        '--out', str(tmp_path / 'x.npz')]) == 2
    assert capsys.readouterr().err.strip().endswith(hint)
    assert export.main(['--ckpt', str(tmp_path / 'run' / 'ckpt.t7'), '--device', 'cpu',
                        '--out', str(tmp_path / 'x.npz'), '--data-root', moved]) == 0
    assert hint not in capsys.readouterr().err
    code, _, err = run_main('--resume', tmp_path / 'run', '--test_only', '--workers', '0',
                            '--data-root', moved)
    assert code == 0, err


def test_a_moved_eval_root_is_said_to_be_the_runs_and_a_default_never_is(tmp_path, run_main,
                                                                         monkeypatch):
    """--eval-root, taken from the checkpoint, is named as the run's too; the default
    --data-root of a checkpoint that keeps no options (a released file) is not."""
    unlabeled = os.path.join(write_image_folder(tmp_path / 'photos'), 'train')  # (no test/)
    labelled = write_image_folder(tmp_path / 'labelled', seed=3)
    code, _, err = run_main(*fast_args(unlabeled, tmp_path / 'run', '--dataset', 'folder',
                                       '--eval-root', labelled, '--rounds', '1', '--epochs', '1',
                                       '--no-tensorboard', '--quiet', *MECHANICS))
    assert code == 0, err
    os.rename(labelled, tmp_path / 'moved')
    code, _, err = run_main('--resume', tmp_path / 'run', '--test_only', '--workers', '0')
    assert code == 2 and err.strip().endswith(
        f"(--eval-root {labelled} is the run's own, from its checkpoint: if its images have "
        f"moved, give their new place with --eval-root DIR)"), err
    code, _, err = run_main('--resume', tmp_path / 'run', '--test_only', '--workers', '0',
                            '--eval-root', tmp_path / 'moved')
    assert code == 0, err
    state = torch.load(tmp_path / 'run' / 'ckpt.t7', weights_only=True)
    del state['config']
    torch.save(state, tmp_path / 'released.t7')
    monkeypatch.chdir(tmp_path)                 # (no ./data here)
    code, _, err = run_main('--resume', 'released.t7', '--test_only', '--workers', '0')
    assert code == 2 and 'no cifar10 data under' in err and 'from its checkpoint' not in err
