"""kNN options, linear probe, export, and the run's logs (JSON lines, TensorBoard)."""
import glob
import json
import math
import re
import struct

import numpy as np
import pytest
import torch

from conftest import MECHANICS, fast_args
from lib.analysis import load_trained
from tools.linear_probe import train_linear_probe


@pytest.fixture(scope='module')
def trained_run(tiny_folder, tmp_path_factory):
    """A 2 rounds x 1 epoch run on the tiny folder: its model_dir."""
    import main
    model_dir = tmp_path_factory.mktemp('run')
    code = main.main(fast_args(tiny_folder, model_dir, '--rounds', '2', '--epochs', '1'))
    assert code == 0
    return model_dir


def reference_knn(test_f, test_y, train_f, train_y, k, sigma, classes):
    """Weighted kNN written out per query in float64 (docs/ALGORITHM.md 7). Top-5 counts a
    class only when a neighbour voted for it (k = 1: top-5 is top-1)."""
    top1 = top5 = 0
    for f, y in zip(test_f.double(), test_y.tolist()):
        sims = (train_f.double() @ f).tolist()
        nearest = sorted(range(len(sims)), key=lambda j: -sims[j])[:k]
        scores = [0.0] * classes
        for j in nearest:
            scores[int(train_y[j])] += math.exp(sims[j] / sigma)
        ranked = sorted(range(classes), key=lambda c: -scores[c])
        top1 += ranked[0] == y
        top5 += y in [c for c in ranked[:5] if scores[c] > 0]    # only classes with a vote
    return 100 * top1 / len(test_y), 100 * top5 / len(test_y)


@pytest.mark.parametrize('features', ['bank', 'network'])
@pytest.mark.parametrize('k, sigma', [(1, 0.1), (3, 0.5), (200, 0.1)])
def test_knn_flags_are_honoured(trained_run, tiny_folder, run_main, features, k, sigma):
    trained = load_trained(str(trained_run / 'ckpt.t7'), data_root=tiny_folder, workers=0)
    test_f, test_y = trained.embeddings('test')
    train_f, train_y = trained.embeddings('train', features)
    want1, want5 = reference_knn(test_f, test_y, train_f, train_y, k, sigma, 10)
    code, out, err = run_main('--resume', 'ckpt.t7', '--test_only', '--model_dir', trained_run,
                              '--data-root', tiny_folder, '--workers', '0', '--knn-k', k,
                              '--knn-sigma', sigma, '--knn-features', features)
    assert code == 0, err
    top1, top5 = map(float, re.search(r'top-1 ([\d.]+)% top-5 ([\d.]+)%', out).groups())
    assert (top1, top5) == (pytest.approx(want1, abs=0.01), pytest.approx(want5, abs=0.01))
    assert top5 >= top1


def test_recomputed_features_differ_from_the_bank(trained_run, tiny_folder):
    trained = load_trained(str(trained_run / 'ckpt.t7'), data_root=tiny_folder, workers=0)
    bank, _ = trained.embeddings('train', 'bank')
    network, _ = trained.embeddings('train', 'network')
    assert bank.shape == network.shape
    assert not torch.allclose(bank, network, atol=1e-3)      # the bank is a running average


def test_linear_probe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 4
    labels = torch.arange(400) % 4
    x = centres[labels] + torch.randn(400, 16, generator=g)
    result = train_linear_probe(x[:300], labels[:300], x[300:], labels[300:], 4, epochs=30)
    assert result['top1'] > 97 and result['train_top1'] > 97
    # Labels unrelated to the features cannot be learned beyond chance on the test split.
    shuffled = labels[torch.randperm(400, generator=g)]
    chance = train_linear_probe(x[:300], shuffled[:300], x[300:], shuffled[300:], 4, epochs=30)
    assert chance['top1'] < 50


def test_linear_probe_and_export_commands(trained_run, tiny_folder, tmp_path, capsys):
    from tools import export, linear_probe
    assert linear_probe.main(['--ckpt', str(trained_run / 'ckpt.t7'), '--data-root',
                              tiny_folder, '--epochs', '5', '--device', 'cpu']) == 0
    assert re.search(r'linear probe on backbone features \(1024-d, 20 train / 10 test images',
                     capsys.readouterr().out)
    out = tmp_path / 'test.npz'
    assert export.main(['--ckpt', str(trained_run / 'ckpt.t7'), '--split', 'test', '--out',
                        str(out), '--data-root', tiny_folder, '--device', 'cpu']) == 0
    data = np.load(out)
    assert data['features'].shape == (10, 128) and data['labels'].shape == (10,)
    assert np.allclose(np.linalg.norm(data['features'], axis=1), 1, atol=1e-5)
    assert data['indexes'].tolist() == list(range(10)) and len(data['classes']) == 10
    assert export.main(['--ckpt', str(tmp_path / 'none.t7'), '--split', 'test', '--out',
                        str(out)]) == 2
    assert capsys.readouterr().err.startswith('error: no checkpoint at')


def read_event_tags(path):
    """{tag: number of scalar/histogram values} of a TensorBoard event file (TFRecord frames)."""
    from tensorboardX.proto import event_pb2
    tags = {}
    with open(path, 'rb') as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                break
            (length,) = struct.unpack('<Q', header[:8])
            event = event_pb2.Event()
            event.ParseFromString(f.read(length))
            f.read(4)
            for value in event.summary.value:
                tags[value.tag] = tags.get(value.tag, 0) + 1
    return tags


def test_json_log_and_tensorboard_events(trained_run):
    records = [json.loads(line) for line in open(trained_run / 'log.jsonl')]
    epochs = [r for r in records if r['type'] == 'epoch']
    rounds = [r for r in records if r['type'] == 'round']
    assert [(r['round'], r['epoch'], r['global_epoch']) for r in epochs] == \
        [(0, 0, 0), (1, 0, 1)]
    assert [r['round'] for r in rounds] == [1] and rounds[0]['anchors'] == 5
    for r in epochs:
        assert set(r['loss']) == {'and', 'aug', 'ue'} and 0 <= r['knn_top1'] <= r['knn_top5']
    events = glob.glob(str(trained_run / 'runs' / '*' / 'events.out.tfevents.*'))
    assert len(events) == 1
    tags = read_event_tags(events[0])
    for tag in ('knn/top1', 'knn/top5', 'train/ue_weight', 'time/epoch_seconds'):
        assert tags.get(tag) == 2, tag                       # one per epoch
    # 2 steps per epoch, sampled every 50 steps: step 0 of each of the 2 epochs
    for tag in ('train/loss_and', 'train/loss_aug', 'train/loss_ue', 'train/lr'):
        assert tags.get(tag) == 2, tag
    assert tags.get('anchors/count') == 1 and tags.get('anchors/consistency') == 1
    assert tags.get('bank/entropy') == 1


def test_no_tensorboard_flag(tiny_folder, tmp_path, run_main):
    code, _, err = run_main(*fast_args(tiny_folder, tmp_path, '--rounds', '1', '--epochs', '1',
                                       '--no-tensorboard', '--quiet', *MECHANICS))
    assert code == 0, err
    assert not (tmp_path / 'runs').exists()
    records = [json.loads(line) for line in open(tmp_path / 'log.jsonl')]
    assert [r['type'] for r in records] == ['start', 'epoch', 'end']


def test_evaluation_is_float32_whatever_the_training_precision(trained_run, tiny_folder,
                                                               run_main, monkeypatch):
    import lib.core.knn
    seen, real = [], lib.core.knn.embed

    def spy(net, batches, precision='fp32'):
        seen.append(precision)
        return real(net, batches, precision)
    monkeypatch.setattr(lib.core.knn, 'embed', spy)
    code, _, err = run_main('--resume', 'ckpt.t7', '--test_only', '--model_dir', trained_run,
                            '--data-root', tiny_folder, '--precision', 'bf16',
                            '--knn-features', 'network')
    assert code == 0, err
    assert seen == ['fp32', 'fp32']                       # training images, then test images
    code, _, err = run_main('--resume', 'ckpt.t7', '--test_only', '--model_dir', trained_run,
                            '--data-root', tiny_folder, '--eval-precision', 'bf16')
    assert code == 0 and seen[-1] == 'bf16', err


def test_float32_evaluation_turns_tf32_off_on_cuda():
    from lib.core.knn import exact_float32
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with exact_float32(torch.device('cuda')):
            assert not torch.backends.cudnn.allow_tf32
            assert not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
