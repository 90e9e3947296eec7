"""The GPU-resident path (tensor pipeline, channels_last, fused SGD) computes what the
released loader path computes, here on CPU tensors in float32."""
import os

import numpy as np
import pytest
import torch

import datasets
import models
from lib.core.memory_bank import MemoryBank
from lib.core.neighbourhoods import ANsDiscovery
from lib.core.step import StepLosses, train_step
from lib.fast_path import Autocast
from lib.pipelines import LoaderPipeline, TensorPipeline, epoch_order
from conftest import MECHANICS, fast_args

WEIGHTS = {'and': 1.0, 'aug': 1.0, 'ue': 0.4}

MEAN, STD = datasets.MEAN_STD['cifar10']


def image_sets(n_train=24, n_test=6, seed=0):
    rng = np.random.default_rng(seed)
    make = lambda n: datasets.ImageSet(  # noqa: E731
        rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 3, size=n).astype(np.int64), ['a', 'b', 'c'], 'generated')
    return make(n_train), make(n_test)


def pipelines(batch_size=4):
    train, test = image_sets()
    common = dict(train_set=train, test_set=test, mean=MEAN, std=STD, image_size=32, views=2,
                  batch_size=batch_size, device='cpu', seed=7)
    return TensorPipeline(**common), LoaderPipeline(workers=0, **common)


def model(fused, n=24):
    torch.manual_seed(3)
    net = models.build_network('resnet18')
    bank = MemoryBank(128, n, 0.1, 0.5)
    anchors = ANsDiscovery(n, 0.5, 1)
    anchors.update(1, torch.nn.functional.normalize(bank.memory, dim=1), 0.1)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, 0.03, momentum=0.9, weight_decay=5e-4, nesterov=True,
                                fused=fused or None)
    return net, bank, anchors, optimizer


def test_both_pipelines_draw_the_same_images():
    fast, loader = pipelines()
    for (_, fast_idx), (_, loader_idx), want in zip(fast.train_batches(1, 3),
                                                    loader.train_batches(1, 3),
                                                    epoch_order(24, 4, 7, 1, 3)):
        assert torch.equal(fast_idx, want) and torch.equal(loader_idx, want)
    # Different epochs shuffle differently; an epoch drops its incomplete last batch.
    assert not torch.equal(epoch_order(24, 4, 7, 1, 3), epoch_order(24, 4, 7, 1, 4))
    assert epoch_order(26, 4, 7, 0, 0).shape == (6, 4)


def test_one_step_same_loss_and_bank_update():
    fast, _ = pipelines()
    views, indexes = next(iter(fast.train_batches(0, 0)))
    assert views.shape == (8, 3, 32, 32) and views.dtype == torch.float32
    results = []
    for fast_path in (True, False):
        net, bank, anchors, optimizer = model(fused=fast_path)
        wrapped = Autocast(net, bf16=False, channels_last=True) if fast_path else net
        losses = train_step(wrapped, StepLosses(bank, anchors, list(WEIGHTS)), optimizer,
                            views.clone(), indexes, WEIGHTS)
        parts = torch.stack([losses[name].detach() for name in WEIGHTS])
        results.append((parts, bank.memory.clone(),
                        [p.detach().clone() for p in net.parameters()]))
    (parts_a, bank_a, params_a), (parts_b, bank_b, params_b) = results
    assert torch.allclose(parts_a, parts_b, rtol=1e-5, atol=1e-5)
    assert torch.allclose(bank_a, bank_b, atol=1e-5)
    # ...and the step did something: the batch's bank rows moved, the others did not.
    fresh_net, fresh, _, _ = model(fused=False)
    moved = (bank_a - fresh.memory).abs().sum(1) > 0
    assert moved.nonzero().view(-1).tolist() == sorted(indexes.tolist())
    # The weight updates agree in direction. Not elementwise: at 8 views BatchNorm makes the
    # float32 gradients ill-conditioned (against float64, 0.2% relative error contiguous and
    # a few % in channels_last, whose CPU convolutions sum in another order).
    start = torch.cat([p.detach().flatten() for p in fresh_net.parameters()])
    update_a = torch.cat([p.flatten() for p in params_a]) - start
    update_b = torch.cat([p.flatten() for p in params_b]) - start
    assert torch.nn.functional.cosine_similarity(update_a, update_b, dim=0) > 0.999


def test_eval_batches_match_the_test_transform():
    fast, loader = pipelines()
    fast_images, fast_targets = zip(*fast.eval_batches('test'))
    loader_images, loader_targets = zip(*loader.eval_batches('test'))
    assert torch.allclose(torch.cat(fast_images), torch.cat(loader_images), atol=1e-6)
    assert torch.equal(torch.cat(fast_targets), torch.cat(loader_targets))


def test_training_images_are_evaluated_at_the_crop_size_on_both_pipelines(tmp_path):
    """Folder data keeps training images 8/7 larger to crop from; the kNN (recompute), ISIF,
    the probe, export and the figures must see them at --image-size, on both pipelines."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ('train', 'test'):
        for c in range(2):
            os.makedirs(tmp_path / split / f'c{c}')
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)).save(
                    tmp_path / split / f'c{c}' / f'{i}.png')
    train, test = datasets.load_dataset('folder', str(tmp_path), image_size=24)
    assert train.images.shape[1:3] == (27, 27)
    common = dict(train_set=train, test_set=test, mean=MEAN, std=STD, image_size=24, views=2,
                  batch_size=2, device='cpu', seed=7)
    fast = torch.cat([x for x, _ in TensorPipeline(**common).eval_batches('train')])
    loader = torch.cat([x for x, _ in LoaderPipeline(workers=0, **common).eval_batches('train')])
    assert fast.shape == loader.shape == (6, 3, 24, 24)
    assert torch.allclose(fast, loader, atol=1e-6)


def test_the_step_parts_are_freed_without_the_garbage_collector():
    """Nothing keeps the network alive after a run (no reference cycle through the step's
    parts): DDP's reducer holds the process group, which must close before the interpreter
    does."""
    import gc
    import weakref
    from types import SimpleNamespace
    from lib.distributed import World
    from lib.fast_path import step_parts
    net, bank, anchors, optimizer = model(fused=False)
    config = SimpleNamespace(bank=True, aug_loss=True, ue_loss=True, views=2,
                             aug_input='logits', batch_t=0.1, batch_m=1.0, sync_bn=False,
                             compile='none', compile_check='on')
    settings = SimpleNamespace(precision='bf16', cuda=False, compile='none',
                               compile_why='as asked')
    method = SimpleNamespace(net=net, bank=bank, anchors=anchors)
    parts, _ = step_parts(config, settings, method, optimizer, World())
    ref = weakref.ref(net)
    gc.disable()
    try:
        del parts, net, optimizer, method
        assert ref() is None
    finally:
        gc.enable()


@pytest.mark.parametrize('precision, tf32', [('fp32', False), ('bf16', True), ('auto', True)])
def test_fp32_on_cuda_trains_without_tf32(monkeypatch, precision, tf32):
    """--precision fp32 is the released arithmetic: on CUDA, whose default lets cuDNN round a
    convolution's inputs to TF32, a run trains with TF32 off, and puts it back as found; bf16
    (and auto, bf16 on CUDA) leave it alone. (A machine said to have CUDA: the settings touch
    no device.)"""
    from lib.build import device_settings
    from lib.config import defaults
    from lib.core.knn import exact_float32
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    # (torch's flag objects: set and put back by hand, monkeypatch cannot undo them)
    before = cudnn.allow_tf32, matmul.allow_tf32, cudnn.benchmark
    cudnn.allow_tf32 = matmul.allow_tf32 = True
    try:
        settings = device_settings(defaults(device='cuda', precision=precision))
        assert settings.precision == ('bf16' if precision == 'auto' else precision)
        assert (cudnn.allow_tf32, matmul.allow_tf32) == (True, True)    # not yet
        with exact_float32(settings.device, settings.precision):
            assert (cudnn.allow_tf32, matmul.allow_tf32) == (tf32, tf32)
        assert (cudnn.allow_tf32, matmul.allow_tf32) == (True, True)    # as found
    finally:
        cudnn.allow_tf32, matmul.allow_tf32, cudnn.benchmark = before


def test_a_run_trains_and_checks_its_first_step_in_its_arithmetic(monkeypatch, tiny_folder,
                                                                  tmp_path, run_main):
    """The fast path's set-up (compiling, the first step's check) and every step run inside
    exact_float32(device, precision): no TF32 for fp32 on CUDA."""
    import contextlib
    import lib.engine
    inside, seen = [], []

    @contextlib.contextmanager
    def recorded(device, precision):
        inside.append(precision)
        try:
            yield
        finally:
            inside.pop()
    for name in ('step_parts', 'train_step'):      # (step_parts compiles and checks)
        def wrapped(*args, real=getattr(lib.engine, name), name=name, **kwargs):
            seen.append((name, list(inside)))
            return real(*args, **kwargs)
        monkeypatch.setattr(lib.engine, name, wrapped)
    monkeypatch.setattr(lib.engine, 'exact_float32', recorded)
    code, out, err = run_main(*fast_args(tiny_folder, tmp_path, '--rounds', '1', '--epochs', '1',
                                         *MECHANICS))
    assert code == 0, err
    assert [name for name, _ in seen] == ['step_parts', 'train_step', 'train_step']
    assert all(stack == ['fp32'] for _, stack in seen), seen
