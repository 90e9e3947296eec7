"""The fast path: the step's parts wrapped so that a GPU runs them fast, without changing what
lib/core/step.py computes.

- The network runs under bf16 autocast with channels_last activations (`Autocast`); its
  embeddings come out float32, so the bank, the logits, their softmaxes and the losses stay
  float32 (`--precision fp32`: the released arithmetic).
- With several processes it is wrapped in DistributedDataParallel, BatchNorm optionally over the
  global batch (--sync-bn), and the step all-gathers its embeddings (World.gather_batch).
- `torch.compile` wraps the network and the step's losses: 'reduce-overhead' also captures them
  as CUDA graphs, which removes the per-kernel launch cost that makes the eager step
  launch-bound at batch 128 (docs/ALGORITHM.md section 9). The backward is compiled with them;
  the optimizer step and the bank update stay eager.
"""
import torch
import torch.nn as nn

from .build import distribute
from .core.losses import active_losses
from .core.step import StepLosses
from .engine import StepParts


class Autocast(nn.Module):
    """`net` under bf16 autocast (`bf16`) with channels_last input (`channels_last`): views
    V x 3 x H x W -> V x D float32 embeddings."""

    def __init__(self, net, bf16=True, channels_last=True):
        super().__init__()
        self.net, self.bf16, self.channels_last = net, bf16, channels_last

    def forward(self, views):
        if self.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        with torch.autocast(views.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.net(views).float()


def step_losses_of(config, method):
    """The StepLosses of a run's configuration and method state."""
    return StepLosses(method.bank, method.anchors, active_losses(config), config.views,
                      config.aug_input, config.batch_t, config.batch_m)


def step_parts(config, settings, method, optimizer, world):
    """The StepParts a run trains with: `method`'s network wrapped for the device (DDP with
    several processes, autocast, channels_last) and compiled with the step's losses as
    `settings.compile` says."""
    net = distribute(config, method.net, world)
    if settings.precision == 'bf16' or settings.cuda:
        net = Autocast(net, bf16=settings.precision == 'bf16', channels_last=settings.cuda)
    losses = step_losses_of(config, method)
    cuda_graphs = settings.compile == 'reduce-overhead' and settings.cuda
    if settings.compile != 'none':
        if cuda_graphs:
            # Read in place by the captured graphs, and allocated outside them (a buffer first
            # allocated inside a graph and then mutated there is pytorch#192748's crash).
            for static in (method.bank.memory if method.bank is not None else None,
                           method.anchors.neighbour_table if method.anchors is not None
                           else None):
                if static is not None:
                    torch._dynamo.mark_static_address(static)
        net = torch.compile(net, mode=settings.compile, dynamic=False)
        losses = torch.compile(losses, mode=settings.compile, dynamic=False)
    return StepParts(net, losses, optimizer, world.gather_batch, cuda_graphs, world)
