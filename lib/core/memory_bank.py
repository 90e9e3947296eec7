"""The memory bank: one embedding per training image (docs/ALGORITHM.md section 3).

Wu et al. (2018)'s non-parametric classifier as Super-AND uses it: the "class weights" of
image i are its bank row, logits are `f @ memory^T / T`, and after every step the rows of
the batch move towards the new features. The released name of this module was `npc`; its
state-dict keys (`params`, `memory`) are kept so released checkpoints load.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class MemoryBank(nn.Module):
    """The bank (docs/ALGORITHM.md 3): `memory` N x D (num_entries x low_dim), `params` = [T, m].

    Raises:
        ValueError: a temperature not above 0, or a momentum outside [0, 1).
    """

    def __init__(self, low_dim: int, num_entries: int, temperature: float, momentum: float,
                 generator: torch.Generator = None):
        super().__init__()
        if not temperature > 0 or not 0 <= momentum < 1:
            raise ValueError(f'MemoryBank needs a temperature above 0 (got {temperature}) and a '
                             f'momentum in [0, 1) (got {momentum})')
        # Rows start uniform in [-s, s], s = 1/sqrt(D/3), *not* normalised (as released).
        stdv = 1.0 / math.sqrt(low_dim / 3)
        memory = torch.rand(num_entries, low_dim, generator=generator) * (2 * stdv) - stdv
        self.register_buffer('memory', memory)
        self.register_buffer('params', torch.tensor([temperature, momentum]))
        # Python copies, so the hot path never reads a device scalar back.
        self.temperature = float(temperature)
        self.momentum = float(momentum)

    @property
    def num_entries(self) -> int:
        return self.memory.shape[0]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """L = f @ memory^T / T. features: R x D -> R x N float32 (a logit is a cosine / T once
        the rows are unit vectors). Gradient flows to `features` only."""
        return features @ self.memory.t() / self.temperature

    @torch.no_grad()
    def update(self, features: torch.Tensor, indexes: torch.Tensor) -> None:
        """Move the batch's rows towards their new features (docs/ALGORITHM.md 3).

        features: V*B x D, the views stacked view-major (all of view 1, then view 2, ...);
        indexes: B dataset indexes. Every view reads the same old rows and writes
        `normalise(m * old + (1 - m) * f_v)`; the last view's write is the one that stays
        (the released code's CPU behaviour, made deterministic), so only it is computed.
        """
        batch = indexes.shape[0]
        last_view = features[-batch:].detach().to(self.memory.dtype)
        mixed = self.memory[indexes] * self.momentum + last_view * (1.0 - self.momentum)
        self.memory.index_copy_(0, indexes, F.normalize(mixed, dim=1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The rows are loaded; T and m stay this bank's (the run's options, which its records
        # name), not those a checkpoint was trained with.
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.params.copy_(torch.tensor([self.temperature, self.momentum]))
