"""Embedding passes and the kNN accuracy of a network (SPEC section 7)."""
import torch

from .config import KNN_K, KNN_SIGMA
from .knn import knn_scores, topk_correct

QUERY_CHUNK = 256      # test rows per kNN chunk: QUERY_CHUNK x N similarities at a time


@torch.no_grad()
def embed(net, batches):
    """Eval-mode embeddings of every batch of `(images, targets)`: (M x D float32, M targets)."""
    was_training = net.training
    net.eval()
    features, targets = [], []
    for images, labels in batches:
        features.append(net(images).float())
        targets.append(labels)
    net.train(was_training)
    return torch.cat(features), torch.cat(targets)


@torch.no_grad()
def knn_accuracy(test_features, test_targets, train_features, train_labels, num_classes,
                 k=KNN_K, sigma=KNN_SIGMA):
    """Weighted-kNN top-1 and top-5 accuracy (fractions in [0, 1]) of test embeddings."""
    correct = torch.zeros(2, device=test_features.device)
    for start in range(0, test_features.shape[0], QUERY_CHUNK):
        scores = knn_scores(test_features[start:start + QUERY_CHUNK], train_features,
                            train_labels, num_classes, k, sigma)
        correct += torch.stack(topk_correct(scores, test_targets[start:start + QUERY_CHUNK]))
    top1, top5 = (correct / max(test_features.shape[0], 1)).tolist()
    return top1, top5
