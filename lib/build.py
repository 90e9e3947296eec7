"""Building a run's parts from its options (an argparse namespace or any object with the
same attributes): device, data, network + bank + anchors, pipeline, optimizer, trainer.

`main.py`, `bench/` and `experiments/` all build through here, so they train the same thing.
"""
from dataclasses import dataclass
from types import SimpleNamespace

import torch

import datasets
import models

from . import checkpoint as ckpt
from .config import DEFAULTS, RUN_DEFAULTS
from .errors import UserError
from .evaluate import embed
from .memory_bank import MemoryBank
from .neighbourhoods import ANsDiscovery
from .pipelines import LoaderPipeline, TensorPipeline
from .recipes import COMPONENTS, resolve
from .train import Objective, Trainer


def default_options(**overrides):
    """A run's options as `main.py` would default them, with `overrides` applied."""
    # Components (rounds among them) stay None for the method's recipe to fill.
    return SimpleNamespace(**{**DEFAULTS, **RUN_DEFAULTS, **{name: None for name in COMPONENTS},
                              **overrides})


def choose_device(opts, world=None):
    """The device (this rank's GPU), with the choices `auto` leaves to it (pipeline,
    precision, compile)."""
    if opts.device == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device cuda, but no CUDA device is available')
    cuda_index = world.local_rank if world is not None else 0
    device = torch.device(f'cuda:{cuda_index}' if opts.device != 'cpu'
                          and torch.cuda.is_available() else 'cpu')
    cuda = device.type == 'cuda'
    if opts.pipeline == 'auto':
        opts.pipeline = 'gpu' if cuda else 'cpu'
    if opts.precision == 'auto':
        opts.precision = 'bf16' if cuda else 'fp32'
    if opts.compile == 'auto':
        # SPEC 9: the CUDA-graph-captured step is ~3x faster than eager bf16 at batch 128.
        opts.compile = 'reduce-overhead' if cuda else 'none'
    if cuda:
        torch.backends.cudnn.benchmark = True
    return device


def load_data(opts):
    train, test = datasets.load_dataset(opts.dataset, opts.data_root, subset=opts.subset,
                                        seed=opts.seed, image_size=opts.image_size)
    if opts.ANs_size >= len(train):
        raise UserError(f'--ANs_size {opts.ANs_size} needs more than {len(train)} training images')
    if opts.batch_size > len(train) and not opts.test_only:
        raise UserError(f'--batch_size {opts.batch_size} is larger than the {len(train)} '
                        f'training images')
    return train, test


def normalisation(opts, train):
    """(mean, std): given by flags, the dataset's constants, or computed from `train`."""
    mean, std = datasets.mean_std(opts.dataset, train)
    return tuple(opts.mean or mean), tuple(opts.std or std)


def build_model(opts, num_train, device):
    """Network, memory bank and anchor discovery, initialised from the seed on the CPU.
    Without the bank (isif) the bank and the anchors are None."""
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
    return net, bank, anchors


def build_pipeline(opts, train, test, device, mean, std, world=None):
    rank, size = (world.rank, world.size) if world is not None else (0, 1)
    if opts.batch_size % size:
        raise UserError(f'--batch_size {opts.batch_size} does not split over {size} processes')
    common = dict(train_set=train, test_set=test, mean=mean, std=std, image_size=opts.image_size,
                  views=opts.views, batch_size=opts.batch_size, device=device, seed=opts.seed,
                  flip=opts.flip, rank=rank, world_size=size)
    if opts.pipeline == 'gpu':
        return TensorPipeline(compile_mode=opts.compile, **common)
    return LoaderPipeline(workers=opts.workers, **common)


def build_optimizer(opts, net):
    params = [p for p in net.parameters() if p.requires_grad]   # the Sobel filters are frozen
    cuda = params[0].device.type == 'cuda'
    return torch.optim.SGD(params, opts.lr, momentum=opts.momentum,
                           weight_decay=opts.weight_decay,
                           nesterov=opts.nesterov and opts.momentum > 0,
                           fused=cuda or None)   # one kernel for all parameters on CUDA


def distribute(opts, net, world):
    """DistributedDataParallel over the world's processes (--sync-bn: BatchNorm statistics of
    the global batch); the network itself for a single process."""
    if world.size == 1:
        return net
    from .distributed import sync_batchnorm
    cuda = next(net.parameters()).device.type == 'cuda'
    if opts.sync_bn:
        net = sync_batchnorm(net, cuda)
    return torch.nn.parallel.DistributedDataParallel(
        net, device_ids=[world.local_rank] if cuda else None)


def build_trainer(opts, net, bank, anchors, optimizer, world=None):
    objective = Objective(views=opts.views, bank_loss=opts.bank, aug_loss=opts.aug_loss,
                          aug_input=opts.aug_input, ue_loss=opts.ue_loss, batch_t=opts.batch_t,
                          batch_m=opts.batch_m)
    cuda = next(net.parameters()).device.type == 'cuda'
    return Trainer(net, bank, anchors, optimizer, objective, precision=opts.precision,
                   channels_last=cuda, compile_mode=opts.compile, world=world)


@dataclass
class Trained:
    """A checkpoint loaded with the data and network it was trained on, for analysis."""
    opts: SimpleNamespace
    state: dict
    net: torch.nn.Module
    bank: MemoryBank
    train: datasets.ImageSet
    test: datasets.ImageSet
    pipeline: object
    device: torch.device

    def embeddings(self, split, source='network'):
        """(N x D float32, N targets) of a split: the network's eval-mode embeddings of the
        test transform, or for the training split also the memory bank (`source='bank'`)."""
        if source == 'bank':
            if split != 'train' or self.bank is None:
                raise UserError('bank features exist for the training split of a run with a '
                                'memory bank only')
            return self.bank.memory.float(), torch.from_numpy(self.train.targets).to(self.device)
        cuda = self.device.type == 'cuda'
        return embed(self.net, self.pipeline.eval_batches(split),
                     bf16=self.opts.precision == 'bf16', channels_last=cuda)


def load_trained(path, **overrides):
    """Load the checkpoint at `path` with the options it was trained with (its stored config,
    else the released defaults), `overrides` (e.g. data_root, device) applied on top."""
    state = ckpt.load(path)
    stored = {k: v for k, v in (state.get('config') or {}).items() if k != 'given'}
    opts = default_options(**{**stored, 'test_only': True, 'compile': 'none',
                              'pipeline': 'auto', **overrides})
    resolve(opts)
    device = choose_device(opts)
    train, test = load_data(opts)
    mean, std = normalisation(opts, train)
    net, bank, anchors = build_model(opts, len(train), device)
    ckpt.restore_model(state, path, net, bank, anchors)
    net.eval()
    pipeline = build_pipeline(opts, train, test, device, mean, std)
    return Trained(opts, state, net, bank, train, test, pipeline, device)


def load_for_analysis(path, data_root=None, subset=None, device='auto'):
    """`load_trained` as the analysis commands (linear probe, export, figures) call it: the
    data root and subset are the checkpoint's unless given; no loader processes."""
    overrides = dict(device=device, workers=0)
    if data_root is not None:
        overrides['data_root'] = data_root
    if subset is not None:
        overrides['subset'] = subset
    return load_trained(path, **overrides)
