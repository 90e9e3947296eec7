"""What a newcomer meets: commands that work from any folder, refusals before the work,
counts and words that are true, export and embed that agree, help that guides."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import MECHANICS, ROOT, fast_args, write_image_folder

SMALL = ['--rounds', '1', '--epochs', '1', '--no-tensorboard', *MECHANICS]


# ----------------------------------------------------------------------------- 2. any folder
@pytest.mark.parametrize('recorded', [True, False])
def test_a_run_with_relative_paths_is_evaluated_and_resumed_from_another_folder(
        tmp_path, run_main, monkeypatch, recorded):
    """The run was started in proj/ with --data-root data; from elsewhere its checkpoint still
    finds its data: where the run recorded it started, or (older checkpoints) where its
    folder says. (main.main in this process, in each folder in turn: that printed commands
    work typed in another folder, test_processes runs as programs.)"""
    project = tmp_path / 'proj'
    write_image_folder(project / 'data')

    def run_in(folder, *argv):
        monkeypatch.chdir(folder)
        return run_main(*argv)
    code, out, err = run_in(project, '--data-root', 'data', '--model_dir', 'checkpoint/quick',
                            '--batch_size', '8', '--workers', '0', '--device', 'cpu', '--rounds',
                            '2', '--epochs', '1', '--stop-after', '1', *MECHANICS)
    assert code == 0, err
    if not recorded:
        for name in ('ckpt.t7', 'last.t7'):
            state = torch.load(project / 'checkpoint/quick' / name, weights_only=True)
            del state['config']['started_in']
            torch.save(state, project / 'checkpoint/quick' / name)
    elsewhere = tmp_path / 'elsewhere'
    os.makedirs(elsewhere)
    code, out, err = run_in(elsewhere, '--resume', project / 'checkpoint/quick', '--test_only',
                            '--workers', '0')
    assert code == 0, err
    assert f'from {project}/data/train' in out and 'kNN accuracy of' in out
    code, out, err = run_in(elsewhere, '--resume', project / 'checkpoint/quick/last.t7',
                            '--workers', '0')
    assert code == 0, err
    assert 'resuming at round 1 epoch 0' in out and 'done:' in out
    # Its TensorBoard events go on in the one folder under proj/runs, not in a new elsewhere/runs.
    (events,) = os.listdir(project / 'runs')
    assert f'logs in {project}/checkpoint/quick/log.jsonl and {project}/runs/{events}' in out
    assert os.listdir(project / 'runs' / events) and not (elsewhere / 'runs').exists()


# ----------------------------------------------------------------------------- 3. refuse first
@pytest.mark.parametrize('dataset, name', [('cifar10', 'cifar10'), ('cifar100', 'cifar100'),
                                           ('svhn', 'SVHN'), ('stl10', 'STL-10')])
def test_own_images_without_dataset_folder_are_not_a_download_target(dataset, name, tmp_path,
                                                                     run_main, monkeypatch):
    """A folder of one's own photos given with the default --dataset (cifar10) or another
    downloadable one: refused before any download, naming --dataset folder; on a machine with
    network access the download went into the photos' folder, and the run trained on it."""
    import torchvision.datasets

    def no_download(*args, **kwargs):
        raise AssertionError('a download was started')
    for reader in ('CIFAR10', 'CIFAR100', 'SVHN', 'STL10'):
        monkeypatch.setattr(torchvision.datasets, reader, no_download)
    photos = tmp_path / 'photos'
    (photos / '2024').mkdir(parents=True)
    Image.new('RGB', (8, 8)).save(photos / '2024' / 'a.jpg')
    argv = ['--data-root', photos, '--model_dir', tmp_path / 'run', '--device', 'cpu']
    code, out, err = run_main(*argv, *(['--dataset', dataset] if dataset != 'cifar10' else []))
    assert code == 2
    assert err.strip() == (f'error: {photos} holds images ({photos}/2024/a.jpg, ...) but no '
                           f'{name} files: for images of your own, give --dataset folder; to '
                           f'download {name}, give it a folder of its own (a download of '
                           f'{name} into this one was not started)')
    assert sorted(os.listdir(photos)) == ['2024']
    # An image-folder copy of another dataset in the same data root (the README's offline
    # layout, data/train/<class>/*) is no reason to refuse: the download is tried.
    if dataset in ('svhn', 'stl10'):        # (cifar100 would read that copy as its own)
        write_image_folder(tmp_path / 'data')
        code, out, err = run_main('--data-root', tmp_path / 'data', '--dataset', dataset,
                                  '--model_dir', tmp_path / 'run', '--device', 'cpu')
        assert code == 2 and 'a download was started' in err, err
    code, out, err = run_main(*argv, '--dataset', 'folder', *SMALL, '--batch_size', '2')
    assert code == 2 and 'a run needs at least 2 training images, and there is 1' in err


def test_a_busy_or_unwritable_run_folder_is_refused_before_the_data_is_read(tiny_folder,
                                                                            tmp_path, run_main):
    from lib.run_folder import acquire
    with acquire(str(tmp_path)):
        code, out, err = run_main(*fast_args(tiny_folder, tmp_path, *SMALL))
    assert code == 2 and f'--model_dir {tmp_path} is in use by a live run' in err, err
    assert 'data:' not in out and 'images:' not in out
    code, out, err = run_main(*fast_args(tiny_folder, '/proc/nope', *SMALL))
    assert code == 2 and err.startswith('error: --model_dir /proc/nope cannot be written')
    assert 'data:' not in out


@pytest.fixture(scope='module')
def unlabeled_run(tmp_path_factory):
    """A run on a folder of unlabeled images (one of them corrupt), and the folder."""
    folder = tmp_path_factory.mktemp('unlabeled')
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(
            folder / f'{i:02d}.png')
    (folder / 'broken.jpg').write_bytes(b'not a jpeg')
    run = tmp_path_factory.mktemp('unlabeled-run')
    import main
    assert main.main(['--dataset', 'folder', '--data-root', str(folder), '--model_dir',
                      str(run), '--batch_size', '4', '--workers', '0', '--device', 'cpu',
                      '--rounds', '1', '--epochs', '2', '--stop-after', '1',
                      '--no-tensorboard', *MECHANICS]) == 0
    return folder, run


def test_analysis_of_an_unlabeled_run_is_refused_before_the_data_is_read(unlabeled_run,
                                                                         tmp_path, capsys,
                                                                         monkeypatch):
    import lib.analysis
    from tools import export, linear_probe, visualize

    def never(*args, **kwargs):
        raise AssertionError('the data was read before the refusal')
    monkeypatch.setattr(lib.analysis, 'load_for_analysis', never)
    folder, run = unlabeled_run
    ckpt = run / 'ckpt.t7'
    trained_on = f'{ckpt} was trained on unlabeled images ({folder})'
    for command, said in (
            (lambda: export.main(['--ckpt', str(ckpt), '--out', str(tmp_path / 'x.npz')]),
             f'{trained_on}: there is no test split to export; --split train exports the '
             f'training images'),
            (lambda: visualize.main(['retrieval', '--ckpt', str(run)]),
             f'this figure shows test images and their classes, and {trained_on} (python -m '
             f'tools.retrieve --figure draws the nearest images of unlabeled ones)'),
            (lambda: linear_probe.main(['--ckpt', str(run)]),
             f'a linear probe trains on labelled training images, and {trained_on}')):
        assert command() == 2
        assert capsys.readouterr().err == f'error: {said}\n'
    # A labelled run given an unlabeled --data-root: the folder is named, not the run.
    assert linear_probe.main(['--ckpt', str(ckpt), '--data-root', str(folder)]) == 2
    assert capsys.readouterr().err == (
        f'error: a linear probe trains on labelled training images, and --data-root {folder} '
        f'holds unlabeled images (no train/<class> and test/<class> folders)\n')


# ----------------------------------------------------------------------------- 4. true words
def test_counts_say_what_was_read_and_what_was_not(unlabeled_run, tmp_path, capsys, run_main):
    from tools import embed, retrieve
    folder, run = unlabeled_run
    assert embed.main(['--ckpt', str(run), '--images', str(folder), '--out',
                       str(tmp_path / 'e.npz'), '--device', 'cpu']) == 0
    out = capsys.readouterr().out
    assert 'embedding 13 image files of' in out
    assert 'note: 12 of 12 images are not 32 x 32 px' in out
    assert 'wrote ' in out and ': 12 x 128 unit-length features' in out and \
        '(1 unreadable file left out, named above)' in out
    lone = tmp_path / 'lone'
    os.makedirs(lone)
    (lone / 'only.jpg').write_bytes(b'broken')
    assert retrieve.main(['--ckpt', str(run), '--gallery', str(lone), '--query',
                          str(folder / '00.png'), '--k', '10', '--device', 'cpu']) == 2
    assert capsys.readouterr().err == f'error: {lone} holds no readable image (1 file could ' \
        f'not be read)\n'
    code, out, err = run_main('--model_dir', run, '--resume', 'last.t7', '--workers', '0')
    assert code == 0, err
    assert 'resuming at round 0 epoch 1 from' in out and 'best kNN' not in out
    code, out, err = run_main('--dataset', 'folder', '--data-root', folder / '00.png',
                              '--model_dir', tmp_path / 'r', '--device', 'cpu')
    assert code == 2 and err == (f'error: --data-root {folder}/00.png is a file, not a folder: '
                                 f'give the folder that holds the images (such as {folder})\n')


def test_a_file_that_is_no_checkpoint_says_how_many_keys_it_holds(tmp_path, run_main):
    torch.save({f'key{i:02d}': i for i in range(11)}, tmp_path / 'many.t7')
    code, _, err = run_main('--resume', tmp_path / 'many.t7', '--test_only')
    assert code == 2 and 'holds the keys key00, key01, key02, key03, key04, key05, key06, ' \
                         'key07 and 3 more' in err


# ----------------------------------------------------------------------------- 5. export, embed
def test_export_and_embed_agree_and_map_back_to_files(unlabeled_run, tiny_folder, tmp_path,
                                                      capsys):
    from tools import embed, export
    run = tmp_path / 'run'
    import main
    assert main.main(fast_args(tiny_folder, run, *SMALL)) == 0
    assert export.main(['--ckpt', str(run), '--split', 'test', '--out', str(tmp_path / 'x.npz'),
                        '--device', 'cpu']) == 0
    assert embed.main(['--ckpt', str(run), '--images', os.path.join(tiny_folder, 'test'),
                       '--out', str(tmp_path / 'e.npz'), '--device', 'cpu']) == 0
    exported, embedded = np.load(tmp_path / 'x.npz'), np.load(tmp_path / 'e.npz')
    assert list(exported['paths']) == list(embedded['paths'])
    assert list(exported['labels']) == list(embedded['labels'])
    cosine = (exported['features'] * embedded['features']).sum(1)
    assert cosine.min() > 1 - 1e-6
    # Either is a gallery for retrieve, which finds what made them (no note of an older
    # reader or an unknown checkpoint), and says when the rows are the memory bank's.
    from tools import retrieve
    query = os.path.join(tiny_folder, 'test', str(embedded['paths'][0]))
    for gallery, features in (('x.npz', 'network'), ('e.npz', 'network'), ('b.npz', 'bank')):
        if features == 'bank':
            assert export.main(['--ckpt', str(run), '--split', 'train', '--features', 'bank',
                                '--out', str(tmp_path / gallery), '--device', 'cpu']) == 0
        capsys.readouterr()
        assert retrieve.main(['--ckpt', str(run), '--gallery', str(tmp_path / gallery),
                              '--query', query, '--k', '1', '--device', 'cpu']) == 0
        notes = [line for line in capsys.readouterr().out.splitlines()
                 if line.startswith('note:')]
        assert notes == ([f'note: {tmp_path / gallery} holds the memory bank\'s rows '
                          f'(tools.export --features bank), to which the queries\' network '
                          f'embeddings are compared, as the kNN evaluation does']
                         if features == 'bank' else []), notes
    # an unlabeled run's training split: paths to map rows to files, no made-up labels
    folder, unlabeled = unlabeled_run
    capsys.readouterr()
    assert export.main(['--ckpt', str(unlabeled), '--split', 'train', '--out',
                        str(tmp_path / 'u.npz'), '--device', 'cpu']) == 0
    assert 'note: these are the run\'s view of its training images' in capsys.readouterr().out
    written = np.load(tmp_path / 'u.npz')
    assert 'labels' not in written.files and len(written['paths']) == 12
    assert str(written['root']) == str(folder)


# ----------------------------------------------------------------------------- 6, 7. help
def test_figures_run_as_a_program_says_which_command_draws_them():
    proc = subprocess.run([sys.executable, '-m', 'tools.figures', '--help'],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ''
    assert proc.stderr.startswith('error: tools.figures is the library of the figures') and \
        'python -m tools.visualize COMMAND' in proc.stderr


def test_help_groups_every_option_once_and_ends_with_examples():
    from lib.config import HELP_GROUPS, OPTIONS, RunConfig, build_parser
    from dataclasses import fields
    grouped = [name for names in HELP_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(o.name for o in OPTIONS)       # each once
    assert set(grouped) == {f.name for f in fields(RunConfig)} - {'typed', 'argv'}
    text = build_parser().format_help()
    positions = [text.index(f'\n{title}:\n') for title in HELP_GROUPS]
    assert positions == sorted(positions)
    assert text.rstrip().endswith('The README has more (your own images, the figures, several '
                                  'GPUs).')
    for line in text.split('examples:\n')[1].splitlines()[:-1]:
        assert line.startswith('  python3 main.py ')
