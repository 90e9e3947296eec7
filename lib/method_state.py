"""The state of a method: the network, the memory bank and the anchor neighbourhoods, which
travel together (docs/ALGORITHM.md sections 1, 3 and 4).

A `MethodState` is built from a run's options, saved in the released checkpoint layout
(`net` with DataParallel's `module.` prefix, `npc` with the bank's two buffers,
`ANs_discovery`), loaded back with clear errors, sized for the disk check, and keeps its
anchors the same on every process.
"""
from dataclasses import dataclass

import torch

import models

from .core.memory_bank import MemoryBank
from .core.neighbourhoods import ANsDiscovery
from .errors import UserError

PREFIXES = ('module.', '_orig_mod.')   # added by DataParallel/DDP and by torch.compile
RELEASED_PREFIX = 'module.'            # the released code wraps its network in DataParallel


def clean_state_dict(state_dict):
    """Drop `module.` / `_orig_mod.` prefixes, so wrapped and plain networks load alike."""
    cleaned = {}
    for key, value in state_dict.items():
        for prefix in PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    return cleaned


def non_finite(tensors):
    """1.0 when any floating-point tensor of `tensors` holds a NaN or infinity, else 0.0 (a
    0-d float tensor, so that it can be summed over processes and read once)."""
    found = [~torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return torch.stack(found).any().float() if found else torch.zeros(())


def refuse_non_finite(tensors, path):
    """UserError when any of `tensors` (a checkpoint's, as loaded) holds a NaN or infinity:
    what is trained, scored or embedded from it would mean nothing."""
    if non_finite(tensors).item():
        raise UserError(f'checkpoint {path} holds non-finite (NaN or infinite) weights, '
                        f'BatchNorm statistics or bank entries: nothing can be trained, scored '
                        f'or embedded from it')


@dataclass
class MethodState:
    net: torch.nn.Module
    bank: MemoryBank = None             # None for methods without a bank (isif)
    anchors: ANsDiscovery = None        # None with the bank

    @classmethod
    def build(cls, opts, num_train, device):
        """Network, bank and anchors initialised from `opts.seed` (on the CPU, so every device
        starts from the same weights), then moved to `device`."""
        torch.manual_seed(opts.seed)
        stem = models.default_stem(opts.image_size) if opts.stem == 'auto' else opts.stem
        net = models.build_network(opts.network, opts.low_dim, sobel=opts.sobel, stem=stem)
        bank = anchors = None
        if opts.bank:
            bank = MemoryBank(opts.low_dim, num_train, opts.npc_t, opts.npc_m).to(device)
            anchors = ANsDiscovery(num_train, opts.ANs_select_rate, opts.ANs_size).to(device)
        net = net.to(device)
        if device.type == 'cuda':
            net = net.to(memory_format=torch.channels_last)
        return cls(net, bank, anchors)

    # ------------------------------------------------------------------ saving and loading
    def state_dict(self):
        """The released layout: `net` (with the `module.` prefix the released code expects),
        `npc` (exactly its buffers `params` and `memory`) and `ANs_discovery`."""
        return {
            'net': {RELEASED_PREFIX + k: v
                    for k, v in clean_state_dict(self.net.state_dict()).items()},
            'npc': self.bank.state_dict() if self.bank is not None else {},
            'ANs_discovery': self.anchors.state_dict() if self.anchors is not None else {},
        }

    def load(self, state, path):
        """Network, bank and anchors from a checkpoint dict read from `path`, or a UserError
        saying what does not fit."""
        weights = clean_state_dict(state['net'])
        try:
            self.net.load_state_dict(weights)
        except RuntimeError:
            held = models.describe_weights(weights)
            wanted = models.describe_weights(clean_state_dict(self.net.state_dict()))
            raise UserError(f'checkpoint {path} holds {held}, but this run builds {wanted}: '
                            f'give the --network, --sobel/--no-sobel, --stem or --low_dim it '
                            f'was trained with') from None
        memory = state['npc'].get('memory') if state.get('npc') else None
        if self.bank is not None:
            if memory is None:
                raise UserError(f'checkpoint {path} holds no memory bank (npc.memory), but this '
                                f'run\'s method has one')
            if tuple(memory.shape) != tuple(self.bank.memory.shape):
                raise UserError(
                    f'checkpoint {path} has a bank of {memory.shape[0]} x {memory.shape[1]}, '
                    f'but this run needs {self.bank.memory.shape[0]} x '
                    f'{self.bank.memory.shape[1]} (training images x --low_dim): another '
                    f'dataset, --subset or --low_dim?')
            self.bank.load_state_dict(state['npc'])
        if self.anchors is not None and state.get('ANs_discovery'):
            positions = state['ANs_discovery'].get('position')
            if positions is not None and positions.shape[0] != self.anchors.num_entries:
                raise UserError(f'checkpoint {path} has anchors for {positions.shape[0]} '
                                f'images, this run has {self.anchors.num_entries}')
            self.anchors.load_state_dict(state['ANs_discovery'])
        refuse_non_finite([*weights.values(), *([memory] if memory is not None else [])], path)

    def finite(self, world):
        """Whether every weight, BatchNorm statistic and bank entry is finite on every process
        (the loss can stay finite while running statistics overflow): one device read."""
        tensors = [*self.net.state_dict().values(),
                   *([self.bank.memory] if self.bank is not None else [])]
        return world.sum(non_finite(tensors)).item() == 0

    def checkpoint_bytes(self):
        """Bytes of a last.t7: the network, one SGD momentum buffer per trained weight, the
        bank and the anchors."""
        weights = sum(t.numel() * t.element_size() for t in self.net.state_dict().values())
        trained = sum(p.numel() * p.element_size() for p in self.net.parameters()
                      if p.requires_grad)
        extra = sum(t.numel() * t.element_size() for module in (self.bank, self.anchors)
                    if module is not None for t in module.state_dict().values())
        return weights + trained + extra

    # ------------------------------------------------------------------ rounds
    def discover_anchors(self, round_index, labels, world):
        """This round's anchors and neighbours from the bank, found on rank 0 and copied to
        the others. `labels` (or None) only feed the consistency diagnostic."""
        if world.main:
            self.anchors.update(round_index, self.bank.memory, self.bank.temperature, labels)
        self.anchors.broadcast(round_index, world)
