"""Embedding passes and the kNN accuracy of a network (SPEC section 7)."""
import torch

from .config import CHUNK_FLOATS, KNN_K, KNN_SIGMA
from .knn import knn_scores, topk_correct



@torch.no_grad()
def embed(net, batches, bf16=False, channels_last=False):
    """Eval-mode embeddings of every batch of `(images, targets)`: (M x D float32, M targets)."""
    was_training = net.training
    net.eval()
    features, targets = [], []
    for images, labels in batches:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
            features.append(net(images).float())
        targets.append(labels)
    net.train(was_training)
    return torch.cat(features), torch.cat(targets)


@torch.no_grad()
def knn_correct(test_features, test_targets, train_features, train_labels, num_classes,
                k=KNN_K, sigma=KNN_SIGMA):
    """Numbers of test rows right at top-1 and at top-5 (a 2-vector on the device), the
    Q x N similarities taken in chunks of at most CHUNK_FLOATS."""
    correct = torch.zeros(2, device=test_features.device)
    chunk = max(1, CHUNK_FLOATS // max(train_features.shape[0], 1))
    for start in range(0, test_features.shape[0], chunk):
        scores = knn_scores(test_features[start:start + chunk], train_features,
                            train_labels, num_classes, k, sigma)
        correct += torch.stack(topk_correct(scores, test_targets[start:start + chunk]))
    return correct


def knn_accuracy(test_features, test_targets, train_features, train_labels, num_classes,
                 k=KNN_K, sigma=KNN_SIGMA):
    """Weighted-kNN top-1 and top-5 accuracy (fractions in [0, 1]) of test embeddings."""
    correct = knn_correct(test_features, test_targets, train_features, train_labels,
                          num_classes, k, sigma)
    top1, top5 = (correct / max(test_features.shape[0], 1)).tolist()
    return top1, top5


def evaluate_knn(net, test_batches, train_features, train_labels, num_classes, bf16=False,
                 channels_last=False, k=KNN_K, sigma=KNN_SIGMA):
    """Embed the test batches, then their weighted-kNN top-1 and top-5 against `train_features`."""
    test_features, test_targets = embed(net, test_batches, bf16, channels_last)
    return knn_accuracy(test_features, test_targets, train_features, train_labels, num_classes,
                        k, sigma)
