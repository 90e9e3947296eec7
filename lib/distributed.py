"""Several processes through torch.distributed, as `torchrun --nproc_per_node=G main.py` starts
them (NCCL on GPUs, gloo on the CPU).

The global batch stays `--batch_size` images: each rank takes its contiguous share of every
global batch. The ranks all-gather the step's embeddings and indexes, so the augmentation loss
compares each local row with the whole global batch and every rank applies the same bank update
(`World.gather_views`); anchors are discovered once and broadcast (`ANsDiscovery.broadcast`); kNN
counts are summed over ranks. Only rank 0 prints, logs and writes checkpoints.
"""
import gc
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from .core.step import Batch, local_batch


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    places: list = None         # (node rank, host name) of every rank, with several processes

    @property
    def main(self):
        return self.rank == 0

    def shard(self, count):
        """This rank's contiguous range [start, stop) of `count` items: equal shares, the
        remainder to the last rank (the layout `gather_rows` undoes)."""
        share = count // self.size
        start = self.rank * share
        return start, (count if self.rank == self.size - 1 else start + share)

    def gather(self, tensor):
        """Every rank's `tensor`, concatenated along dim 0 in rank order (no gradient)."""
        if self.size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def gather_views(self, features, views):
        """Local view-major rows (V*b x D) -> the global batch's view-major rows (V*B x D),
        the layout a single process would have: view 1 of every rank's images, then view 2."""
        if self.size == 1:
            return features
        local = features.shape[0] // views
        gathered = self.gather(features).view(self.size, views, local, -1)
        return gathered.transpose(0, 1).reshape(views * self.size * local, -1)

    def global_rows(self, views, local, device):
        """The global-batch row of each local row (V*b), for `gather_views`'s layout."""
        batch = local * self.size
        images = torch.arange(local, device=device) + self.rank * local
        return torch.cat([v * batch + images for v in range(views)])

    def gather_batch(self, features, indexes):
        """The step's global Batch (lib/core/step.py): every process's embeddings (detached)
        and indexes in the layout one process would have, and where this process's rows sit
        in it. A single process's batch is its own rows."""
        if self.size == 1:
            return local_batch(features, indexes)
        views = features.shape[0] // indexes.shape[0]
        return Batch(self.gather_views(features.detach(), views), self.gather(indexes),
                     self.global_rows(views, indexes.shape[0], features.device))

    def sum(self, tensor):
        """In-place sum over ranks (returns `tensor`)."""
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def gather_rows(self, tensor, count):
        """Rows sharded with `shard(count)` (plus a remainder on the last rank) -> all rows."""
        if self.size == 1:
            return tensor
        share = count // self.size
        padded = tensor.new_zeros((count - share * (self.size - 1),) + tuple(tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        parts = self.gather(padded).view(self.size, -1, *tensor.shape[1:])
        return torch.cat([parts[r, :share] for r in range(self.size - 1)]
                         + [parts[-1, :count - share * (self.size - 1)]])

    def gather_objects(self, obj):
        """Every rank's picklable `obj`, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        everyone = [None] * self.size
        dist.all_gather_object(everyone, obj)
        return everyone

    def unlike_main(self, obj):
        """(every rank's picklable `obj`, the ranks whose `obj` differs from rank 0's)."""
        everyone = self.gather_objects(obj)
        return everyone, [rank for rank, found in enumerate(everyone) if found != everyone[0]]

    def where(self, rank=None):
        """'rank 1 (node 1, host gpu-b)': a process named so that a person finds it."""
        rank = self.rank if rank is None else rank
        node, host = self.places[rank] if self.places else (0, 'this machine')
        return f'rank {rank} (node {node}, host {host})'

    def share(self, obj):
        """Rank 0's picklable `obj`, on every rank."""
        if self.size == 1:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def barrier(self):
        if self.size > 1:
            dist.barrier()

    def lost_peer(self, err):
        """Whether `err` is a collective's failure because another process is gone: gloo's
        closed or reset connection, NCCL's aborted communicator, a transport timeout."""
        if self.size == 1:
            return False
        if isinstance(err, getattr(dist, 'DistBackendError', ())):
            return True
        text = str(err)
        return any(sign in text for sign in LOST_PEER_SIGNS)


# What a collective raises when a peer process died (gloo's TCP transport, NCCL, the store).
LOST_PEER_SIGNS = ('Connection closed by peer', 'Connection reset by peer', 'Broken pipe',
                   'NCCL communicator was aborted', 'Socket Timeout', 'Timed out waiting',
                   'connection refused', 'Connection refused')


class WorldError(Exception):
    """The processes could not form their group; the message is one line."""


def cuda_wanted(device_choice):
    """Whether --device auto|cuda|cpu runs on CUDA (auto: when present), for every process."""
    return device_choice != 'cpu' and torch.cuda.is_available()


def init_world(device_choice):
    """The World of this process: torchrun's environment, or a single process. Raises
    WorldError (one line) when the group does not form: a process that never joins."""
    size = environment_number('WORLD_SIZE', '1', 'a number of processes')
    if size == 1:
        return World()
    rank = environment_number('RANK', None, f'a rank from 0 to {size - 1}', size)
    local_rank = environment_number('LOCAL_RANK', '0', 'a rank on this machine')
    if 'TORCHELASTIC_RUN_ID' not in os.environ and rank == 0:   # (torchrun says it itself)
        print(f'joining a group of {size} processes at {os.environ.get("MASTER_ADDR")}:'
              f'{os.environ.get("MASTER_PORT")} as rank 0, as WORLD_SIZE and RANK set in the '
              f'environment (not by torchrun) ask: this waits until all {size} have joined',
              flush=True)
    cuda = cuda_wanted(device_choice)
    if cuda:
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group('nccl' if cuda else 'gloo')
    except (RuntimeError, ValueError) as err:       # DistStoreError, a timeout, a refusal
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WorldError(f'the {size} processes of this run did not all join its group at '
                         f'{os.environ.get("MASTER_ADDR")}:{os.environ.get("MASTER_PORT")} '
                         f'({reason}): a process that never started, or a node that cannot '
                         f'reach this one') from None
    world = World(rank, size, local_rank)
    node = int(os.environ.get('GROUP_RANK', os.environ.get('NODE_RANK', '0')))
    world.places = world.gather_objects((node, socket.gethostname()))
    return world


def environment_number(name, default, meaning, below=None):
    """The whole number of the environment variable `name` (torchrun's WORLD_SIZE, RANK,
    LOCAL_RANK), `default` where unset (None: it must be set); WorldError when it is not one
    (`meaning`: what it counts) or not below `below`."""
    text = os.environ.get(name, default)
    if text is None:
        raise WorldError(f'WORLD_SIZE={os.environ["WORLD_SIZE"]} is set in the environment but '
                         f'{name} is not: torchrun sets both (and MASTER_ADDR, MASTER_PORT); '
                         f'unset WORLD_SIZE to run one process')
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < (1 if name == 'WORLD_SIZE' else 0) or (below is not None and value >= below):
        also = '' if name == 'WORLD_SIZE' else ' and WORLD_SIZE'
        raise WorldError(f'{name}={text} in the environment is not {meaning} (torchrun sets it); '
                         f'unset it{also} to run one process')
    return value


def close_world(world, clean=True):
    """Leave the process group. After a clean run the ranks leave together (a rank that tears
    down gloo while another still talks to it aborts). After an error they do not wait: the
    other ranks may be inside a collective the failed one never joins, and would wait for it
    until the timeout, replacing the original error by the transport's."""
    if world.size == 1 or not dist.is_initialized():
        return
    gc.collect()    # DDP's reducer, kept alive by reference cycles, releases the group first
    if clean:
        world.barrier()
    dist.destroy_process_group()


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced gradient: d(sum_r L_r)/dx_r."""

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (1d or 2d: N x C, N x C x L, N x C x H x W) whose training statistics cover
    the global batch of every process: a stand-in for torch.nn.SyncBatchNorm on the CPU
    (gloo), where that one does not run. Gradients flow through the all-reduce of the
    per-channel sums."""

    def _check_input_dim(self, x):
        if x.dim() not in (2, 3, 4):
            raise ValueError(f'GlobalBatchNorm expects 2-d to 4-d input, got {x.dim()}-d')

    def forward(self, x):
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels, dims = x.shape[1], [0] + list(range(2, x.dim()))
        count = x.numel() // channels * dist.get_world_size()
        sums = _SumOverRanks.apply(torch.cat((x.sum(dims), (x * x).sum(dims))))
        mean = sums[:channels] / count
        var = sums[channels:] / count - mean * mean
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.mul_(1 - self.momentum).add_(mean * self.momentum)
            self.running_var.mul_(1 - self.momentum).add_(var * (count / (count - 1))
                                                          * self.momentum)
        shape = (1, channels) + (1,) * (x.dim() - 2)
        scale = torch.rsqrt(var + self.eps) * self.weight
        return (x - mean.view(shape)) * scale.view(shape) + self.bias.view(shape)


def sync_batchnorm(net, cuda):
    """BatchNorm statistics over the global batch: SyncBatchNorm on GPUs, else ours (for
    every BatchNorm1d and BatchNorm2d: AlexNet's head has a BatchNorm1d)."""
    if cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(net)
    for name, module in list(net.named_children()):
        if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d):
            replacement = GlobalBatchNorm(module.num_features, module.eps, module.momentum)
            replacement.load_state_dict(module.state_dict())
            setattr(net, name, replacement.to(module.weight.device))
        else:
            sync_batchnorm(module, cuda)
    return net
