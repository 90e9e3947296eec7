"""Anchor-neighbourhood (ANs) discovery: the curriculum of rounds (docs/ALGORITHM.md section 4).

Before round r >= 1 the `int(N * select_rate * r)` bank entries whose softmax over the bank
has the lowest entropy become anchors, and each anchor gets its `ANs_size` most similar
other entries as neighbours (Huang et al. 2019, AND). Everything is computed from the bank
alone, in row chunks, so no N x N matrix is ever held (50,000^2 floats would be 10 GB).

The buffers keep the released names and meaning so released checkpoints load:
`position[i]` is i's rank among the anchors (>= 0), or -(k+1) for the k-th non-anchor;
`neighbours` is (anchors x ANs_size), row j belonging to `anchor_indexes[j]`.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .knn import nearest, rows_per_chunk


@torch.no_grad()
def bank_entropy(memory: torch.Tensor, temperature: float, chunk_rows: int = None,
                 rows: torch.Tensor = None) -> torch.Tensor:
    """H_i = -sum_j p_ij log p_ij, p_i = softmax(memory_i @ memory^T / T), itself included
    (docs/ALGORITHM.md 4; Huang et al. 2019, AND).

    memory: N x D -> N entropies (float32, nats), computed `chunk_rows` rows at a time; with
    `rows` (a long tensor of R entries) only theirs, R entropies.
    """
    chunk_rows = chunk_rows or rows_per_chunk(memory.shape[0])
    count = memory.shape[0] if rows is None else rows.shape[0]
    entropy = torch.empty(count, dtype=torch.float32, device=memory.device)
    for start in range(0, count, chunk_rows):
        part = (memory[start:start + chunk_rows] if rows is None
                else memory[rows[start:start + chunk_rows]])
        logits = (part @ memory.t()).float() / temperature
        log_p = torch.log_softmax(logits, dim=1)
        entropy[start:start + chunk_rows] = -(log_p.exp() * log_p).sum(1)
    return entropy


@torch.no_grad()
def nearest_other_entries(memory: torch.Tensor, rows: torch.Tensor, k: int,
                          chunk_rows: int = None) -> torch.Tensor:
    """For each entry in `rows` (A, long), the k most similar *other* bank entries (A x k,
    long), most similar first.

    Similarity is the dot product of bank rows (cosine, the rows being unit vectors once
    trained); the entry itself is excluded by setting its own similarity to -inf. The rows
    are gathered `chunk_rows` at a time: with every entry an anchor (the last round), a
    gather of them all would be a second copy of the bank.

    Raises:
        ValueError: k not below the number of entries (there are N - 1 others).
    """
    if not 1 <= k < memory.shape[0]:
        raise ValueError(f'nearest_other_entries needs 1 <= k < N = {memory.shape[0]}, got {k}')
    chunk_rows = chunk_rows or rows_per_chunk(memory.shape[0])
    return torch.cat([nearest(memory[part], memory, k, exclude=part)[1]
                      for part in rows.split(chunk_rows)])


@torch.no_grad()
def bank_statistics(memory: torch.Tensor, temperature: float, rows: torch.Tensor) -> dict:
    """What the bank says about the embedding without labels, on a sample of its entries
    `rows` (a long tensor): the mean, min and max of their softmax entropies over the whole
    bank (low: confident neighbourhoods) and the mean cosine to their nearest other entry."""
    entropy = bank_entropy(memory, temperature, rows=rows)
    unit = F.normalize(memory.float(), dim=1)
    nearest = nearest_other_entries(unit, rows, 1)[:, 0]
    cosine = (unit[rows] * unit[nearest]).sum(1)
    values = torch.stack((entropy.mean(), entropy.min(), entropy.max(), cosine.mean()))
    return dict(zip(('entropy_mean', 'entropy_min', 'entropy_max', 'nearest_similarity'),
                    values.tolist()))


class ANsDiscovery(nn.Module):
    """The anchors of a round and their neighbours, for `num_entries` bank entries: each round
    r adds `select_rate` of them (int(N * select_rate * r) in all), each with `ans_size`
    neighbours.

    Raises:
        ValueError: a select rate outside (0, 1], or a neighbourhood size below 1.
    """

    def __init__(self, num_entries: int, select_rate: float, ans_size: int):
        super().__init__()
        if not 0 < select_rate <= 1 or ans_size < 1:
            raise ValueError(f'ANsDiscovery needs a select rate in (0, 1] (got {select_rate}) '
                             f'and at least 1 neighbour (got {ans_size})')
        self.select_rate = select_rate
        self.ans_size = ans_size
        self.register_buffer('samples_num', torch.tensor(num_entries))
        self.register_buffer('anchor_indexes', torch.zeros(0, dtype=torch.long))
        self.register_buffer('instance_indexes', torch.arange(num_entries))
        self.register_buffer('position', -torch.arange(num_entries) - 1)
        self.register_buffer('neighbours', torch.zeros(0, ans_size, dtype=torch.long))
        self.register_buffer('entropy', torch.zeros(num_entries))
        self.register_buffer('consistency', torch.tensor(0.))
        # Dense view used by the loss: row i holds i's neighbours, or -1 for a non-anchor.
        # Its shape never changes between rounds (no recompilation of the training step).
        self.register_buffer('neighbour_table', torch.full((num_entries, ans_size), -1),
                             persistent=False)

    @property
    def num_entries(self) -> int:
        return self.position.shape[0]

    @property
    def num_anchors(self) -> int:
        return self.anchor_indexes.shape[0]

    def anchors_in_round(self, round_index: int) -> int:
        """int(N * select_rate * r), capped at N."""
        return min(int(self.num_entries * self.select_rate * round_index), self.num_entries)

    @torch.no_grad()
    def update(self, round_index: int, memory: torch.Tensor, temperature: float,
               labels: torch.Tensor = None, chunk_rows: int = None) -> torch.Tensor:
        """Choose this round's anchors and their neighbours from the bank (docs/ALGORITHM.md 4).

        `labels` (N), if given, are used only for the diagnostic `consistency`: the share of
        (anchor, neighbour) pairs with the same true label, among the pairs whose labels are
        known (>= 0); nan when there is no such pair (no anchors yet, or none labeled).
        """
        n = self.num_entries
        self.entropy = bank_entropy(memory, temperature, chunk_rows)
        num = self.anchors_in_round(round_index)
        anchors = self.entropy.topk(num, largest=False).indices
        is_anchor = torch.zeros(n, dtype=torch.bool, device=memory.device)
        is_anchor[anchors] = True
        position = -torch.cumsum((~is_anchor).long(), 0)       # -1, -2, ... over non-anchors
        position[anchors] = torch.arange(num, device=memory.device)
        self.anchor_indexes = anchors
        self.instance_indexes = torch.nonzero(~is_anchor).view(-1)
        self.position = position
        self.neighbours = nearest_other_entries(memory, anchors, self.ans_size, chunk_rows)
        if labels is not None:
            # Pairs with an unlabeled image (label -1: STL-10's unlabeled split) say nothing.
            first, second = labels[anchors][:, None], labels[self.neighbours]
            known = (first >= 0) & (second >= 0)
            same = (first == second) & known
            self.consistency = same.sum().float() / known.sum()    # 0 / 0: nan, not 0%
        self.fill_neighbour_table()
        return self.consistency

    def broadcast(self, round_index, world):
        """Copy rank 0's discovery of `round_index` into this process's buffers (the other
        ranks computed nothing): sizes first, as the lists change size every round."""
        if world.size == 1:
            return
        import torch.distributed as dist
        device = self.position.device
        if not world.main:
            count = self.anchors_in_round(round_index)
            self.anchor_indexes = torch.empty(count, dtype=torch.long, device=device)
            self.instance_indexes = torch.empty(self.num_entries - count, dtype=torch.long,
                                                device=device)
            self.neighbours = torch.empty(count, self.ans_size, dtype=torch.long, device=device)
            self.entropy = torch.empty(self.num_entries, device=device)
            self.consistency = torch.zeros((), device=device)
        for name in ('anchor_indexes', 'instance_indexes', 'position', 'neighbours', 'entropy',
                     'consistency'):
            dist.broadcast(getattr(self, name), src=0)
        self.fill_neighbour_table()

    def neighbour_similarity(self, memory: torch.Tensor) -> float:
        """Mean cosine of (anchor, neighbour) pairs in the bank (nan without anchors): how
        close the neighbourhoods the loss pulls together are, a measure that needs no labels."""
        if not self.num_anchors:
            return float('nan')
        unit = F.normalize(memory.float(), dim=1)
        pairs = unit[self.anchor_indexes][:, None, :] * unit[self.neighbours]
        return float(pairs.sum(-1).mean())

    def fill_neighbour_table(self):
        # In place where the shape allows: a captured CUDA graph keeps reading this tensor.
        # As wide as the round's neighbours, which a checkpoint may have found with another
        # ans_size (that of this run applies from the next update).
        shape = (self.num_entries, self.neighbours.shape[1])
        if tuple(self.neighbour_table.shape) != shape:
            self.neighbour_table = torch.empty(shape, dtype=torch.long,
                                               device=self.position.device)
        self.neighbour_table.fill_(-1)
        if self.num_anchors:
            self.neighbour_table[self.anchor_indexes] = self.neighbours.to(self.position.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The anchor lists change size every round: take the stored shapes before loading.
        for name in ('anchor_indexes', 'instance_indexes', 'neighbours'):
            if prefix + name in state_dict:
                stored = state_dict[prefix + name]
                setattr(self, name, torch.empty_like(stored, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.neighbours.dim() == 1:      # the released file's empty list, before round 1
            self.neighbours = self.neighbours.view(0, self.ans_size)
        self.fill_neighbour_table()
