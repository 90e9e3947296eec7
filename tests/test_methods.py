"""Methods as recipes (issue: the paper's comparison), the extra datasets and backbones."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import models
from conftest import fast_args
from lib.config import parse, resolve
from lib.core.recipes import RECIPES
from lib.errors import UserError

# What each method is, written out from the papers (not read from lib/recipes.py).
DOCUMENTED = {
    'lemniscate': dict(sobel=False, views=1, bank=True, aug_loss=False, ue_loss=False,
                       flip=False, nesterov=False, rounds=1),
    'isif': dict(sobel=False, views=2, bank=False, aug_loss=True, aug_input='features',
                 ue_loss=False, rounds=1),
    'and': dict(sobel=False, views=1, bank=True, aug_loss=False, ue_loss=False, flip=False,
                rounds=5),
    'super-and': dict(sobel=True, views=2, bank=True, aug_loss=True, aug_input='logits',
                      ue_loss=True, flip=True, nesterov=True, rounds=5),
}


def resolved(*argv):
    return resolve(parse(list(argv)), say=lambda text: None)


@pytest.mark.parametrize('method', sorted(DOCUMENTED))
def test_recipe_resolves_to_documented_components(method):
    args = resolved('--method', method)
    for name, value in DOCUMENTED[method].items():
        assert getattr(args, name) == value, name


def test_single_flags_override_a_recipe():
    args = resolved('--method', 'super-and', '--no-ue-loss', '--no-sobel', '--rounds', '2')
    assert (args.ue_loss, args.sobel, args.rounds) == (False, False, 2)
    assert args.aug_loss and args.bank                       # the rest of the recipe stays
    args = resolved('--method', 'and', '--views', '2', '--aug-loss', '--flip')
    assert (args.views, args.aug_loss, args.flip, args.ue_loss) == (2, True, True, False)
    args = resolved('--method', 'lemniscate', '--nesterov')
    assert args.nesterov and args.rounds == 1


@pytest.mark.parametrize('argv, needle', [
    (('--method', 'super-and', '--views', '1'), 'two views'),
    (('--method', 'isif', '--ue-loss'), 'UE loss .* which --method isif leaves out: add '
                                        '--no-ue-loss$'),
    (('--method', 'isif', '--rounds', '3'), 'which --method isif leaves out: use --rounds 1$'),
    (('--no-bank',), 'which --no-bank leaves out: add --no-ue-loss or drop --no-bank$'),
    (('--no-bank', '--no-ue-loss', '--rounds', '2'), 'which --no-bank leaves out: use --rounds'),
    (('--method', 'lemniscate', '--no-bank'), 'nothing is trained'),
])
def test_incompatible_components_are_refused(argv, needle):
    with pytest.raises(UserError, match=needle):
        resolved(*argv)


@pytest.mark.parametrize('method', sorted(RECIPES))
def test_each_method_trains_and_its_checkpoint_evaluates(method, tiny_folder, tmp_path,
                                                         run_main):
    code, out, err = run_main(*fast_args(tiny_folder, tmp_path, '--method', method,
                                         '--epochs', '1', '--rounds', '1'))
    assert code == 0, err
    assert f'method {method}:' in out
    state = torch.load(tmp_path / 'ckpt.t7', weights_only=True)
    assert state['config']['method'] == method
    if method == 'isif':
        assert state['npc'] == {} and state['ANs_discovery'] == {}   # no bank, no anchors
    else:
        assert state['npc']['memory'].shape == (20, 128)
    has_sobel = any(k.startswith('module.sobel.') for k in state['net'])
    assert has_sobel == DOCUMENTED[method]['sobel']
    best = out.split('done: best kNN top-1 ')[1].split('%')[0]
    code, out, err = run_main('--resume', 'ckpt.t7', '--test_only', '--model_dir', tmp_path,
                              '--data-root', tiny_folder, '--workers', '0')
    assert code == 0, err
    assert f'top-1 {best}%' in out


def test_isif_knn_uses_recomputed_features(tiny_folder, tmp_path, run_main, monkeypatch):
    import lib.core.knn
    seen = []
    real_embed = lib.core.knn.embed

    def spy(net, batches, *a, **k):
        features, targets = real_embed(net, batches, *a, **k)
        seen.append(features.shape[0])
        return features, targets
    monkeypatch.setattr(lib.core.knn, 'embed', spy)
    code, out, err = run_main(*fast_args(tiny_folder, tmp_path, '--method', 'isif', '--epochs',
                                         '1', '--knn-features', 'bank'))
    assert code == 0, err
    assert seen == [20, 10]          # the 20 training images re-embedded, then the 10 test
    assert 'note: this run has no memory bank, so the kNN compares with the network' in out
    code, out, err = run_main(*fast_args(tiny_folder, tmp_path / 'more', '--method', 'isif',
                                         '--epochs', '1', '--init-from', tmp_path / 'ckpt.t7'))
    assert code == 0, err
    assert '(round 0 epoch 0): weights taken; optimizer and schedule fresh' in out


# ----------------------------------------------------------------------------- datasets
def write_svhn(root, n_train=12, n_test=6, seed=0):
    from scipy.io import savemat
    rng = np.random.default_rng(seed)
    for split, n in (('train', n_train), ('test', n_test)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)     # 1..10, 10 = digit 0
        savemat(os.path.join(root, f'{split}_32x32.mat'), {'X': x, 'y': y})
    return x, y


def test_svhn_loader_reads_torchvision_mat_layout(tmp_path):
    x_test, y_test = write_svhn(tmp_path)
    train, test = datasets.load_dataset('svhn', str(tmp_path), download=False)
    assert train.images.shape == (12, 32, 32, 3) and test.images.shape == (6, 32, 32, 3)
    assert test.targets.tolist() == [1, 2, 3, 4, 5, 6]
    assert np.array_equal(test.images[2], x_test[:, :, :, 2])
    assert train.targets.tolist()[9] == 0                             # label 10 is the digit 0
    assert datasets.mean_std('svhn', train) == ((0.4377, 0.4438, 0.4728),
                                                (0.1201, 0.1231, 0.1052))


def test_svhn_missing_is_a_data_error(tmp_path):
    with pytest.raises(datasets.DataError, match='no SVHN data'):
        datasets.load_dataset('svhn', str(tmp_path / 'none'), download=False)


def write_varied_folder(root, classes=3, per_class=2):
    rng = np.random.default_rng(1)
    sizes = [(60, 40), (45, 70), (96, 96), (50, 50)]
    for split in ('train', 'test'):
        for c in range(classes):
            folder = os.path.join(root, split, f'kind{c}')
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                w, h = sizes[(c + i) % len(sizes)]
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                    os.path.join(folder, f'{i}.jpg'))


def test_folder_loader_resizes_and_computes_normalisation(tmp_path):
    write_varied_folder(tmp_path)
    train, test = datasets.load_dataset('folder', str(tmp_path), image_size=24)
    assert train.classes == ['kind0', 'kind1', 'kind2']
    assert test.images.shape == (6, 24, 24, 3)                     # Resize + CenterCrop
    assert train.images.shape == (6, 27, 27, 3)                    # 24 * 8/7, crops taken later
    mean, std = datasets.mean_std('folder', train)
    pixels = train.images.reshape(6, -1, 3) / 255.0
    assert mean == pytest.approx(tuple(pixels.mean((0, 1))), abs=1e-4)
    assert std == pytest.approx(tuple(pixels.std(1).mean(0)), abs=1e-4)
    with pytest.raises(datasets.DataError, match='32 px'):
        datasets.load_dataset('cifar10', str(tmp_path), image_size=64)


def test_folder_dataset_trains_at_96_px(tmp_path, run_main):
    write_varied_folder(tmp_path / 'data', classes=2, per_class=3)
    code, out, err = run_main('--dataset', 'folder', '--data-root', tmp_path / 'data',
                              '--image-size', '96', '--network', 'alexnet', '--method', 'and',
                              '--epochs', '1', '--rounds', '2', '--batch_size', '2',
                              '--workers', '0', '--model_dir', tmp_path / 'ck',
                              '--no-tensorboard')
    assert code == 0, err
    assert '2 classes' in out and '96 px' in out and 'round 1: 1 anchor (' in out


# ----------------------------------------------------------------------------- backbones
@pytest.mark.parametrize('name', sorted(models.NETWORKS))
@pytest.mark.parametrize('size', [32, 96])
def test_backbone_shape_and_norm(name, size):
    for sobel in (True, False):
        net = models.build_network(name, 128, sobel=sobel, stem=models.default_stem(size)).eval()
        with torch.no_grad():
            out = net(torch.randn(2, 3, size, size))
        assert out.shape == (2, 128)
        assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
        assert hasattr(net, 'sobel') == sobel


def test_stem_follows_image_size():
    assert models.default_stem(32) == 'cifar' and models.default_stem(64) == 'cifar'
    assert models.default_stem(96) == 'imagenet'
    assert models.build_network('resnet18', stem='imagenet').conv1.kernel_size == (7, 7)
    assert models.build_network('resnet18', stem='cifar').conv1.kernel_size == (3, 3)


def test_compare_leaves_the_files_of_a_live_run_alone(tiny_folder, tmp_path):
    """A spec's folder whose run is live (its run.lock held): refused, its files kept."""
    import subprocess
    import sys
    from conftest import ROOT
    from lib.run_folder import acquire
    folder = tmp_path / 'and_cifar10_alexnet_2'
    folder.mkdir()
    (folder / 'last.t7').write_bytes(b'live')
    with acquire(folder):
        proc = subprocess.run(
            [sys.executable, 'experiments/compare.py', '--runs', 'and:cifar10:alexnet:2',
             '--data-root', tiny_folder, '--work-dir', tmp_path, '--out', tmp_path / 't.md'],
            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 2 and 'is in use by a live run' in proc.stderr, proc.stderr
    assert (folder / 'last.t7').read_bytes() == b'live'


def test_compare_script_writes_a_table(tiny_folder, tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    out_file = tmp_path / 'table.md'
    proc = subprocess.run(
        [sys.executable, 'experiments/compare.py', '--runs', 'lemniscate:cifar10:alexnet:2',
         'and:cifar10:alexnet:2', '--data-root', tiny_folder, '--work-dir', tmp_path,
         '--out', out_file, '--extra',
         '--batch_size 8 --workers 0 --device cpu --no-tensorboard'],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = out_file.read_text().splitlines()
    assert rows[0].startswith('| method | dataset | network | rounds x epochs | final')
    assert rows[2].startswith('| lemniscate | cifar10 | alexnet | 1 x 2 | ')
    assert rows[3].startswith('| and | cifar10 | alexnet | 2 x 1 | ')
    assert 'failed' not in out_file.read_text()
    assert (tmp_path / 'and_cifar10_alexnet_2' / 'ckpt.t7').exists()
