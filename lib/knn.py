"""Weighted kNN evaluation (docs/ALGORITHM.md section 7; Wu et al. 2018's protocol).

Each test embedding votes with its K most similar training embeddings (the memory bank by
default), a neighbour weighing exp(similarity / sigma) for its class.
"""
import torch

from .config import KNN_K, KNN_SIGMA


@torch.no_grad()
def knn_scores(queries, train_features, train_labels, num_classes, k=KNN_K, sigma=KNN_SIGMA):
    """Class scores of the weighted kNN vote.

    queries: Q x D; train_features: N x D; train_labels: N (long) -> Q x C scores.
    Callers chunk Q so that Q x N similarities fit in memory.
    """
    sims = queries.float() @ train_features.float().t()                # Q x N
    top_sims, top_index = sims.topk(min(k, sims.shape[1]), dim=1)      # Q x K, sorted
    weights = torch.exp(top_sims / sigma)
    scores = torch.zeros(queries.shape[0], num_classes, device=queries.device)
    return scores.scatter_add_(1, train_labels[top_index], weights)


def topk_correct(scores, targets, ks=(1, 5)):
    """Number of rows whose target is among the top-k scored classes, for each k (tensors).

    scores: Q x C class scores (>= 0; a class no neighbour voted for scores 0); targets: Q.
    Only classes that got a vote count: with fewer than k voted classes the rest of the
    ranking is zero-score classes in arbitrary order, and a target among them is no hit. (The
    released code counts it, so its top-5 with few neighbours or classes is too high; top-1 is
    the same in both.)
    """
    ranked_scores, ranked = scores.sort(dim=1, descending=True)
    hits = (ranked == targets[:, None]) & (ranked_scores > 0)
    return [hits[:, :min(k, scores.shape[1])].any(1).sum() for k in ks]
