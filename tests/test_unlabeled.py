"""Your own unlabeled images: training on a flat folder, embedding any folder, nearest images,
and the bad inputs of each (CPU, tiny; nothing here needs a well-trained model)."""
import json
import os
import re
import shlex
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import DISCRIMINATIVE, MECHANICS, PYTHON, fast_args
from tools import embed, retrieve


def write_flat_folder(root, count=12, size=32, seed=0):
    """Images directly in `root` and in a sub-folder, no classes, no split."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = os.path.join(root, 'more') if i % 3 == 0 else root
        os.makedirs(folder, exist_ok=True)
        pixels = rng.integers(0, 256, 3) + rng.normal(0, 30, size=(size, size, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            os.path.join(folder, f'img{i:02d}.png'))
    return str(root)


@pytest.fixture(scope='module')
def flat_run(tmp_path_factory):
    """A flat folder trained 2 rounds x 1 epoch: (folder, model_dir, stdout)."""
    import main
    root = write_flat_folder(tmp_path_factory.mktemp('flat'))
    model_dir = tmp_path_factory.mktemp('flat_run')
    code = main.main(fast_args(root, model_dir, *DISCRIMINATIVE, '--dataset', 'folder',
                               '--rounds', '2', '--epochs', '1', '--batch_size', '4',
                               '--no-tensorboard'))
    assert code == 0
    return root, model_dir


def records(model_dir):
    return [json.loads(line) for line in open(model_dir / 'log.jsonl')]


def test_a_flat_folder_trains_without_labels_and_resumes(tmp_path, run_main):
    root = write_flat_folder(tmp_path / 'photos')
    flags = ['--dataset', 'folder', '--rounds', '2', '--epochs', '1', '--batch_size', '4',
             '--no-tensorboard']
    code, out, err = run_main(*fast_args(root, tmp_path / 'run', *flags, '--stop-after', '1'))
    assert code == 0, err
    assert 'data: 12 unlabeled images (no classes, no test split)' in out
    assert 'kNN' not in out and 'warning' not in out
    epoch = next(r for r in records(tmp_path / 'run') if r['type'] == 'epoch')
    assert 'knn_top1' not in epoch
    bank = epoch['bank']
    assert 0 <= bank['entropy_min'] <= bank['entropy_mean'] <= bank['entropy_max'] \
        <= np.log(12) + 1e-4
    assert -1 <= bank['nearest_similarity'] <= 1
    code, out, err = run_main('--resume', 'last.t7', '--model_dir', tmp_path / 'run')
    assert code == 0, err
    assert re.search(r'round 1: 3 anchors \(25\.0% of 12\), mean \(anchor, neighbour\) '
                     r'cosine -?\d\.\d{3}', out)
    assert 'anchor-neighbour cos' in out and 'done: 2 rounds x 1 epoch without labels' in out
    kinds = [r['type'] for r in records(tmp_path / 'run')]
    assert kinds == ['start', 'epoch', 'start', 'round', 'epoch', 'end']
    assert json.load(open(tmp_path / 'run' / 'config.json'))['dataset'] == 'folder'


def test_a_folder_with_a_lone_train_subfolder_is_unlabeled(tmp_path):
    import datasets
    write_flat_folder(tmp_path / 'export' / 'train', count=4)
    train, test = datasets.load_dataset('folder', str(tmp_path / 'export'))
    assert test is None and not train.labelled and len(train) == 4
    assert all(path.startswith('train' + os.sep) for path in train.paths)


def test_eval_root_adds_knn_and_test_only_needs_it(flat_run, tiny_folder, run_main):
    root, model_dir = flat_run
    code, out, err = run_main('--resume', 'ckpt.t7', '--test_only', '--model_dir', model_dir)
    assert code == 2 and 'give --eval-root DIR' in err
    for missing, needle in ((model_dir / 'nowhere', 'does not exist'),
                            (model_dir / 'ckpt.t7', 'is a file, not a folder')):
        code, out, err = run_main('--resume', 'ckpt.t7', '--test_only', '--model_dir',
                                  model_dir, '--eval-root', missing)
        assert code == 2 and f'--eval-root {missing} {needle}: give a labelled tree' in err, err
        # before the training images are read (minutes, for a large folder)
        assert 'images:' not in out and 'data:' not in out, out
    code, out, err = run_main('--resume', 'ckpt.t7', '--test_only', '--model_dir', model_dir,
                              '--eval-root', tiny_folder, '--knn-k', '5')
    assert code == 0, err
    assert f'kNN evaluation on {tiny_folder}: 20 training and 10 test images' in out
    assert re.search(r'top-1 \d+\.\d\d% top-5', out)


def test_training_with_eval_root_keeps_the_bank_statistics(tiny_folder, tmp_path, run_main):
    """--eval-root adds a kNN accuracy to the epochs of an unlabeled run: its record and
    line keep the bank's statistics besides."""
    root = write_flat_folder(tmp_path / 'flat')
    code, out, err = run_main(*fast_args(root, tmp_path / 'run', *MECHANICS, '--dataset',
                                         'folder', '--rounds', '1', '--epochs', '1',
                                         '--batch_size', '4', '--no-tensorboard', '--eval-root',
                                         tiny_folder, '--knn-k', '5'))
    assert code == 0, err
    [epoch] = [r for r in records(tmp_path / 'run') if r['type'] == 'epoch']
    assert 0 <= epoch['knn_top1'] <= 100 and set(epoch['bank']) >= {'entropy_mean',
                                                                      'nearest_similarity'}
    assert re.search(r'kNN top-1 \d+\.\d\d% .* \| bank entropy \d', out), out


def test_embed_writes_unit_rows_and_relative_paths(flat_run, tiny_folder, tmp_path, capsys):
    root, model_dir = flat_run
    out = tmp_path / 'flat.npz'
    assert embed.main(['--ckpt', str(model_dir), '--images', root,         # (its ckpt.t7)
                       '--out', str(out), '--device', 'cpu']) == 0
    data = np.load(out)
    assert data['features'].shape == (12, 128)
    assert np.allclose(np.linalg.norm(data['features'], axis=1), 1, atol=1e-5)
    assert sorted(data['paths']) == sorted(
        [f'img{i:02d}.png' for i in range(12) if i % 3] +
        [os.path.join('more', f'img{i:02d}.png') for i in range(0, 12, 3)])
    assert 'labels' not in data
    # A class tree gives labels too.
    classes = tmp_path / 'classes.npz'
    assert embed.main(['--ckpt', str(model_dir / 'ckpt.t7'), '--images',
                       os.path.join(tiny_folder, 'test'), '--out', str(classes)]) == 0
    data = np.load(classes)
    assert data['labels'].tolist() == list(range(10)) and len(data['classes']) == 10
    assert data['paths'][0] == os.path.join('class_00', '0000.png')


def test_retrieve_finds_the_query_itself_first(flat_run, tmp_path, capsys):
    root, model_dir = flat_run
    # A copy of the checkpoint, whose gallery cache (next to it) is this test's alone: the
    # first retrieval embeds, whichever tests retrieved with the shared run before.
    shutil.copy(model_dir / 'ckpt.t7', tmp_path / 'ckpt.t7')
    query = os.path.join(root, 'more', 'img03.png')
    argv = ['--ckpt', str(tmp_path / 'ckpt.t7'), '--gallery', root, '--query', query, '--k',
            '4', '--figure', str(tmp_path / 'grid.png')]
    assert retrieve.main(argv) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines() if re.match(r'\s+\d+\s+-?\d\.\d{4}\s', line)]
    assert [int(line[0]) for line in lines] == [1, 2, 3, 4]
    assert lines[0][1:] == ['1.0000', os.path.join('more', 'img03.png')]
    sims = [float(line[1]) for line in lines]
    assert sims == sorted(sims, reverse=True)
    assert 'cached in' in out
    with Image.open(tmp_path / 'grid.png') as grid:     # 1 row: query + 4 neighbours
        assert grid.size == (120 + 4 + 5 * (72 + 4) + 12, 4 + 76)
    assert retrieve.main(argv[:-2]) == 0                 # the second time, from the cache
    assert 'embeddings from the cache' in capsys.readouterr().out


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith('error: '), err
    for needle in needles:
        assert needle in err, err
    return err.strip()


def test_bad_inputs(flat_run, tmp_path, capsys):
    root, model_dir = flat_run
    ckpt = str(model_dir / 'ckpt.t7')
    (tmp_path / 'empty').mkdir()
    assert embed.main(['--ckpt', ckpt, '--images', str(tmp_path / 'empty'), '--out',
                       str(tmp_path / 'x.npz')]) == 2
    one_line_error(capsys, 'holds no images')
    image = os.path.join(root, 'img01.png')           # an image where a folder is asked for
    assert embed.main(['--ckpt', ckpt, '--images', image, '--out', str(tmp_path / 'x.npz')]) == 2
    one_line_error(capsys, f'{image} is a file, not a folder: give the folder that holds the '
                           f'images (such as {root})')
    broken = tmp_path / 'broken'
    broken.mkdir()
    (broken / 'a.jpg').write_bytes(b'not a jpeg')
    assert embed.main(['--ckpt', ckpt, '--images', str(broken), '--out',
                       str(tmp_path / 'x.npz')]) == 2
    assert 'holds no readable image' in capsys.readouterr().err
    query = os.path.join(root, 'img01.png')
    assert retrieve.main(['--ckpt', ckpt, '--gallery', root, '--query',
                          str(tmp_path / 'nope.png')]) == 2
    one_line_error(capsys, 'query image', 'does not exist')
    assert retrieve.main(['--ckpt', ckpt, '--gallery', root, '--query', query, '--k',
                          '13']) == 2
    one_line_error(capsys, '--k 13 is more than the 12 readable images')


def test_corrupt_and_different_images_are_named_skipped_and_said_once(flat_run, tmp_path,
                                                                      capsys, monkeypatch):
    root, model_dir = flat_run
    gallery = write_flat_folder(tmp_path / 'gallery', count=6, size=48, seed=3)
    (tmp_path / 'gallery' / 'bad.png').write_bytes(b'\x89PNG broken')
    os.symlink(tmp_path / 'nowhere.png', tmp_path / 'gallery' / 'gone.png')   # a broken link
    out = tmp_path / 'g.npz'
    assert embed.main(['--ckpt', str(model_dir / 'ckpt.t7'), '--images', gallery, '--out',
                       str(out)]) == 0
    printed = capsys.readouterr().out
    assert 'skipped bad.png: ' in printed and \
        f'skipped gone.png: a link to {tmp_path}/nowhere.png, which does not exist' in printed \
        and 'skipped 2 unreadable files' in printed
    assert printed.count('are not 32 x 32 px') == 1 and '6 of 6 images' in printed
    assert printed.count("the checkpoint's normalisation is used") <= 1
    assert np.load(out)['features'].shape == (6, 128)
    # A gallery .npz made with other settings: said once, the checkpoint's used for queries.
    data = dict(np.load(out))
    data['image_size'] = np.asarray(64)
    np.savez(tmp_path / 'other.npz', **data)
    assert retrieve.main(['--ckpt', str(model_dir / 'ckpt.t7'), '--gallery',
                          str(tmp_path / 'other.npz'), '--query',
                          os.path.join(gallery, 'img01.png'), '--k', '2']) == 0
    printed = capsys.readouterr().out
    assert printed.count('was embedded at 64 px') == 1
    assert re.search(r'\n\s+1\s+1\.0000\s+img01\.png', printed)
    # ...but one made by another checkpoint would compare two different embeddings: refused.
    # Its own file, since written over by more training, is named as such.
    data['checkpoint_digest'] = np.asarray('0123456789abcdef')
    np.savez(tmp_path / 'stale.npz', **data)
    query = ['--query', os.path.join(gallery, 'img01.png'), '--k', '2']
    assert retrieve.main(['--ckpt', str(model_dir / 'ckpt.t7'), '--gallery',
                          str(tmp_path / 'stale.npz'), *query]) == 2
    one_line_error(capsys, f'was embedded with an earlier {model_dir / "ckpt.t7"}, written over '
                           f'since (the run trained on)')
    data['checkpoint'] = np.asarray(str(tmp_path / 'other_run' / 'ckpt.t7'))
    np.savez(tmp_path / 'foreign.npz', **data)
    assert retrieve.main(['--ckpt', str(model_dir / 'ckpt.t7'), '--gallery',
                          str(tmp_path / 'foreign.npz'), *query]) == 2
    line = one_line_error(capsys, f'was embedded with another checkpoint '
                                  f'({tmp_path / "other_run" / "ckpt.t7"})')
    # The command it gives embeds the gallery again, with this checkpoint, as printed.
    command = shlex.split(line[line.index(f'{PYTHON} -m tools.embed'):])
    assert command[:3] == [*shlex.split(PYTHON), '-m', 'tools.embed']
    assert embed.main(command[3:]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(      # (said: it was there)
        f'replaced {tmp_path}/foreign.npz: 6 x 128')
    assert retrieve.main(['--ckpt', str(model_dir / 'ckpt.t7'), '--gallery',
                          str(tmp_path / 'foreign.npz'), *query]) == 0
    assert re.search(r'\n\s+1\s+1\.0000\s+img01\.png', capsys.readouterr().out)
    # Too large a --k is said with the count of the gallery's readable images (6 of its 8
    # files), however large; an unreadable query is named as it was typed.
    monkeypatch.chdir(tmp_path)
    ask = ['--ckpt', str(model_dir / 'ckpt.t7'), '--gallery', 'gallery', '--query',
           'gallery/img01.png']
    for k in ('7', '9'):
        assert retrieve.main([*ask, '--k', k]) == 2
        one_line_error(capsys, f'--k {k} is more than the 6 readable images of the gallery '
                               f'gallery')
    assert retrieve.main([*ask, 'gallery/bad.png', '--k', '2']) == 0
    printed = capsys.readouterr().out
    assert 'query gallery/img01.png\n' in printed and 'skipped gallery/bad.png: ' in printed
