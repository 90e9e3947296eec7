"""The weighted-kNN evaluation (docs/ALGORITHM.md section 7): embedding passes, the kNN's
training side, class scores and accuracy. `main.py`, `bench/`, the analysis commands and
the figures all evaluate through here.

Evaluation is float32 on every device unless `precision='bf16'` is asked for: no autocast,
and no TF32 in convolutions or matrix products, so a checkpoint scores the same on a GPU as on
the CPU (training may still run in bf16).
"""
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from .config import CHUNK_FLOATS, KNN_K, KNN_SIGMA
from .distributed import World
from .knn import knn_scores, topk_correct
from .progress import progress_bar


@contextmanager
def exact_float32(device):
    """No TF32 inside: CUDA's default lets cuDNN convolutions round inputs to 10 bits."""
    if device.type != 'cuda':
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@torch.no_grad()
def embed(net, batches, precision='fp32'):
    """Eval-mode embeddings of every batch of `(images, targets)`: (M x D float32, M targets)."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    features, targets = [], []
    with exact_float32(device) if precision == 'fp32' else nullcontext():
        for images, labels in batches:
            if images.device.type == 'cuda':
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(images.device.type, dtype=torch.bfloat16,
                                enabled=precision == 'bf16'):
                features.append(net(images).float())
            targets.append(labels)
    net.train(was_training)
    if not features:
        return torch.zeros(0, 0, device=device), torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(features), torch.cat(targets)


@dataclass
class KnnData:
    """What a kNN evaluation reads: a pipeline's `eval_batches('train' | 'test')` and
    `num_test`, the training labels (a device tensor), the number of classes, and the training
    side (`source`: 'bank' or 'network')."""
    pipeline: object
    train_labels: torch.Tensor
    num_classes: int
    source: str = 'bank'


def training_features(net, bank, data, world=None, precision='fp32', show=False):
    """N x D: the kNN's training side, the bank or the network's embeddings of the training
    images (test transform, eval mode; always for runs without a bank). With several processes
    each embeds a share and all get every row."""
    world = world or World()
    if bank is not None and data.source == 'bank':
        return bank.memory.float()
    count = len(data.train_labels)
    batches = data.pipeline.eval_batches('train', world.shard(count))
    features, _ = embed(net, progress_bar(batches, desc='embed train', enabled=show), precision)
    return world.gather_rows(features, count)


@torch.no_grad()
def class_scores(queries, train_features, train_labels, num_classes, k=KNN_K, sigma=KNN_SIGMA):
    """Q x C weighted-kNN class scores, the Q x N similarities taken in chunks of at most
    CHUNK_FLOATS (never a whole Q x N matrix at ImageNet size)."""
    chunk = max(1, CHUNK_FLOATS // max(train_features.shape[0], 1))
    return torch.cat([knn_scores(queries[start:start + chunk], train_features, train_labels,
                                 num_classes, k, sigma)
                      for start in range(0, queries.shape[0], chunk)])


@torch.no_grad()
def knn_correct(test_features, test_targets, train_features, train_labels, num_classes,
                k=KNN_K, sigma=KNN_SIGMA):
    """Numbers of test rows right at top-1 and at top-5 (a 2-vector on the device)."""
    scores = class_scores(test_features, train_features, train_labels, num_classes, k, sigma)
    return torch.stack(topk_correct(scores, test_targets)).float()


def knn_evaluate(net, bank, data, k=KNN_K, sigma=KNN_SIGMA, world=None, precision='fp32',
                 show=False):
    """Weighted-kNN top-1 and top-5 (fractions) of the test split against the training side.
    With several processes each embeds a share of the test images and the counts are summed."""
    world = world or World()
    train_features = training_features(net, bank, data, world, precision, show)
    count = data.pipeline.num_test
    batches = data.pipeline.eval_batches('test', world.shard(count))
    test_features, test_targets = embed(net, progress_bar(batches, desc='embed test',
                                                          enabled=show), precision)
    correct = knn_correct(test_features, test_targets, train_features, data.train_labels,
                          data.num_classes, k, sigma)
    top1, top5 = (value / max(count, 1) for value in world.sum(correct).tolist())
    return top1, top5
