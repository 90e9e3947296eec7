"""Weighted kNN (docs/ALGORITHM.md section 7; Wu et al. 2018's protocol), and every nearest-
neighbour search of the project: the class scores, the top-k, the embeddings it compares and
the whole evaluation. main.py, the retrieval, the figures and the probe all come here.

Each test embedding votes with its K most similar training embeddings (the memory bank by
default), a neighbour weighing exp(similarity / sigma) for its class. Evaluation is float32 on
every device unless `precision='bf16'` is asked for: no autocast, and no TF32 in convolutions or
matrix products, so a checkpoint scores the same on a GPU as on the CPU (training may still run
in bf16). Q x N similarities are taken in chunks of at most CHUNK_FLOATS.

`world` arguments are the shell's process group (lib/distributed.py World: rank, size, shard,
gather_rows, sum); None is one process.
"""
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .constants import ALGORITHM, CHUNK_FLOATS

KNN_K, KNN_SIGMA = ALGORITHM['knn_k'], ALGORITHM['knn_sigma']


def rows_per_chunk(num_keys: int) -> int:
    """Query rows per chunk of similarities against `num_keys` keys: CHUNK_FLOATS at most."""
    return max(1, CHUNK_FLOATS // max(num_keys, 1))


# ----------------------------------------------------------------------------- scores, top-k
@torch.no_grad()
def knn_scores(queries: torch.Tensor, train_features: torch.Tensor, train_labels: torch.Tensor,
               num_classes: int, k: int = KNN_K, sigma: float = KNN_SIGMA) -> torch.Tensor:
    """Class scores of the weighted kNN vote, for one chunk of queries.

    queries: Q x D; train_features: N x D; train_labels: N (long) -> Q x C scores (>= 0; a
    class no neighbour voted for scores 0). Q x N similarities are made at once: `class_scores`
    chunks Q.

    Raises:
        ValueError: k or sigma not above 0, or features of different widths.
    """
    if k < 1 or not sigma > 0 or queries.shape[1] != train_features.shape[1]:
        raise ValueError(f'knn_scores needs k >= 1 (got {k}), sigma > 0 (got {sigma}) and '
                         f'features of one width (got {queries.shape[1]} and '
                         f'{train_features.shape[1]})')
    sims = queries.float() @ train_features.float().t()                # Q x N
    top_sims, top_index = sims.topk(min(k, sims.shape[1]), dim=1)      # Q x K, sorted
    weights = torch.exp(top_sims / sigma)
    scores = torch.zeros(queries.shape[0], num_classes, device=queries.device)
    return scores.scatter_add_(1, train_labels[top_index], weights)


@torch.no_grad()
def class_scores(queries: torch.Tensor, train_features: torch.Tensor, train_labels: torch.Tensor,
                 num_classes: int, k: int = KNN_K, sigma: float = KNN_SIGMA) -> torch.Tensor:
    """Q x C weighted-kNN class scores (`knn_scores`), the queries taken in chunks, so a
    whole Q x N similarity matrix is never held (ImageNet size: 1.3M columns)."""
    chunk = rows_per_chunk(train_features.shape[0])
    return torch.cat([knn_scores(queries[start:start + chunk], train_features, train_labels,
                                 num_classes, k, sigma)
                      for start in range(0, queries.shape[0], chunk)])


def topk_correct(scores: torch.Tensor, targets: torch.Tensor, ks=(1, 5)) -> list:
    """Number of rows whose target is among the top-k scored classes, for each k (0-d tensors).

    scores: Q x C class scores (>= 0; a class no neighbour voted for scores 0); targets: Q.
    Only classes that got a vote count: with fewer than k voted classes the rest of the
    ranking is zero-score classes in arbitrary order, and a target among them is no hit. (The
    released code counts it, so its top-5 with few neighbours or classes is too high; top-1 is
    the same in both.) Other scores (a probe's probabilities) are all above 0 and unaffected.
    """
    ranked_scores, ranked = scores.sort(dim=1, descending=True)
    hits = (ranked == targets[:, None]) & (ranked_scores > 0)
    return [hits[:, :min(k, scores.shape[1])].any(1).sum() for k in ks]


@torch.no_grad()
def knn_correct(test_features: torch.Tensor, test_targets: torch.Tensor,
                train_features: torch.Tensor, train_labels: torch.Tensor, num_classes: int,
                k: int = KNN_K, sigma: float = KNN_SIGMA) -> torch.Tensor:
    """Numbers of test rows right at top-1 and at top-5 (a 2-vector on the device)."""
    scores = class_scores(test_features, train_features, train_labels, num_classes, k, sigma)
    return torch.stack(topk_correct(scores, test_targets)).float()


@torch.no_grad()
def nearest(queries: torch.Tensor, keys: torch.Tensor, k: int, exclude: torch.Tensor = None,
            chunk: int = None) -> tuple:
    """(Q x k similarities, Q x k positions in `keys`), most similar first: the retrieval's, the
    figures' and the anchors' top-k. queries: Q x D, keys: N x D; unit rows make the dot
    product a cosine. exclude: Q positions in `keys` never returned (a query's own entry: its
    similarity is set to -inf). Taken in chunks of `chunk` queries (default: rows_per_chunk)."""
    chunk = chunk or rows_per_chunk(keys.shape[0])
    values, positions = [], []
    for start in range(0, queries.shape[0], chunk) or [0]:    # (no queries: Q = 0 results)
        similarities = queries[start:start + chunk].float() @ keys.float().t()
        if exclude is not None:
            similarities.scatter_(1, exclude[start:start + chunk, None], float('-inf'))
        found = similarities.topk(k, dim=1)
        values.append(found.values)
        positions.append(found.indices)
    return torch.cat(values), torch.cat(positions)


# ----------------------------------------------------------------------------- embeddings
@contextmanager
def exact_float32(device, precision='fp32'):
    """No TF32 inside, with `precision` fp32 on CUDA (PyTorch's default lets cuDNN round a
    convolution's inputs to TF32's 10-bit mantissa; the released code predates TF32), put back
    as found afterwards; nothing for bf16 or on the CPU. Used by the kNN embeddings and by the
    training loop (--precision)."""
    if device.type != 'cuda' or precision != 'fp32':
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@torch.no_grad()
def embed(net: torch.nn.Module, batches, precision: str = 'fp32') -> tuple:
    """Eval-mode embeddings of every batch of `(images, targets)`: (M x D float32, M targets)."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    features, targets = [], []
    with exact_float32(device, precision):
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
    """What a kNN evaluation reads: a pipeline's `eval_batches('train' | 'test', shard)` and
    `num_test`, the training labels (a device tensor), the number of classes, and the training
    side (`source`: 'bank' or 'network'). The labels are those of the first len(train_labels)
    training images, the ones that vote: all of them, or STL-10's 5,000 labelled images that
    come before its 100,000 unlabeled ones."""
    pipeline: object
    train_labels: torch.Tensor
    num_classes: int
    source: str = 'bank'


def _shard(world, count):
    return (0, count) if world is None else world.shard(count)


def training_features(net: torch.nn.Module, bank, data: KnnData, world=None,
                      precision: str = 'fp32', progress=None) -> torch.Tensor:
    """N x D: the kNN's training side, the bank or the network's embeddings of the first N
    training images, N = len(data.train_labels) (test transform, eval mode; always for runs
    without a bank). With several processes
    each embeds a share and all get every row. `progress` wraps the batches (a progress bar)."""
    count = len(data.train_labels)
    if bank is not None and data.source == 'bank':
        return bank.memory[:count].float()
    batches = data.pipeline.eval_batches('train', _shard(world, count))
    features, _ = embed(net, progress(batches, 'embed train') if progress else batches,
                        precision)
    return features if world is None else world.gather_rows(features, count)


def knn_evaluate(net: torch.nn.Module, bank, data: KnnData, k: int = KNN_K,
                 sigma: float = KNN_SIGMA, world=None, precision: str = 'fp32',
                 progress=None) -> tuple:
    """Weighted-kNN top-1 and top-5 (fractions) of the test split against the training side.
    With several processes each embeds a share of the test images and the counts are summed."""
    train_features = training_features(net, bank, data, world, precision, progress)
    count = data.pipeline.num_test
    batches = data.pipeline.eval_batches('test', _shard(world, count))
    test_features, test_targets = embed(
        net, progress(batches, 'embed test') if progress else batches, precision)
    correct = knn_correct(test_features, test_targets, train_features, data.train_labels,
                          data.num_classes, k, sigma)
    if world is not None:
        correct = world.sum(correct)
    top1, top5 = (value / max(count, 1) for value in correct.tolist())
    return top1, top5
