"""Building a run's parts from its options (an argparse namespace or any object with the
same attributes): device settings, data, the method's state, pipeline, optimizer, trainer;
and loading a checkpoint with its data for analysis.

`main.py`, `bench/`, `experiments/`, `hubconf.py` and the analysis commands all build through
here, so they train and evaluate the same thing.
"""
from dataclasses import dataclass
from types import SimpleNamespace

import torch

import datasets
import models

from . import checkpoint as ckpt
from .config import DEFAULTS, RUN_DEFAULTS
from .errors import UserError
from .evaluate import KnnData, embed, training_features
from .method_state import MethodState, clean_state_dict
from .pipelines import LoaderPipeline, TensorPipeline
from .progress import progress_bar
from .recipes import COMPONENTS, resolve
from .train import Objective, Trainer


def default_options(**overrides):
    """A run's options as `main.py` would default them, with `overrides` applied."""
    # Components (rounds among them) stay None for the method's recipe to fill.
    return SimpleNamespace(**{**DEFAULTS, **RUN_DEFAULTS, **{name: None for name in COMPONENTS},
                              **overrides})


@dataclass(frozen=True)
class DeviceSettings:
    """The device (this rank's GPU) and the choices `auto` leaves to it."""
    device: torch.device
    pipeline: str       # 'gpu' (device tensors, batched augmentation) or 'cpu' (loader)
    precision: str      # training arithmetic: 'bf16' autocast or 'fp32'
    compile: str        # 'none', 'default' or 'reduce-overhead'

    @property
    def cuda(self):
        return self.device.type == 'cuda'


def pick_device(choice, cuda_index=0):
    """The torch.device of --device auto|cuda|cpu (auto: CUDA when present)."""
    if choice == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device cuda, but no CUDA device is available')
    cuda = choice != 'cpu' and torch.cuda.is_available()
    return torch.device(f'cuda:{cuda_index}' if cuda else 'cpu')


def device_settings(opts, world=None):
    """Resolve --device, --pipeline, --precision and --compile (`auto`: the fast path on CUDA,
    the released arithmetic on the CPU). The options themselves are left as typed."""
    device = pick_device(opts.device, world.local_rank if world is not None else 0)
    cuda = device.type == 'cuda'
    pick = (lambda value, on_cuda, on_cpu: value if value != 'auto'
            else on_cuda if cuda else on_cpu)
    if cuda:
        torch.backends.cudnn.benchmark = True
    # The CUDA-graph-captured step is ~3x faster than eager bf16 at batch 128
    # (docs/ALGORITHM.md section 9).
    return DeviceSettings(device, pick(opts.pipeline, 'gpu', 'cpu'),
                          pick(opts.precision, 'bf16', 'fp32'),
                          pick(opts.compile, 'reduce-overhead', 'none'))


def load_data(opts, root=None):
    """(train, test) of the run's dataset (test None for an unlabeled folder), checked against
    the options that depend on its size."""
    train, test = datasets.load_dataset(opts.dataset, root or opts.data_root,
                                        subset=opts.subset, seed=opts.seed,
                                        image_size=opts.image_size)
    if opts.ANs_size >= len(train):
        raise UserError(f'--ANs_size {opts.ANs_size} needs more than {len(train)} training images')
    if opts.batch_size > len(train) and not opts.test_only:
        raise UserError(f'--batch_size {opts.batch_size} is larger than the {len(train)} '
                        f'training images')
    return train, test


def load_eval_data(opts):
    """(train, test) of --eval-root, a labelled tree that runs on unlabeled data are evaluated
    on (kNN of the network's embeddings), at the run's image size."""
    if datasets.folder_layout(opts.eval_root) != 'labelled':
        raise UserError(f'--eval-root {opts.eval_root} is not a labelled tree: it needs '
                        f'{opts.eval_root}/train/<class>/* and {opts.eval_root}/test/<class>/*')
    return datasets.load_dataset('folder', opts.eval_root, subset=opts.subset, seed=opts.seed,
                                 image_size=opts.image_size)


CHANNELS = ('red', 'green', 'blue')


def normalisation(opts, train):
    """(mean, std): given by flags, the dataset's constants, or computed from `train`. A std
    that is not above 0 (a channel with one value in every training image, say) would divide
    by zero: a UserError naming the channel and --std."""
    computed_mean, computed_std = datasets.mean_std(opts.dataset, train)
    mean, std = tuple(opts.mean or computed_mean), tuple(opts.std or computed_std)
    for channel, value in zip(CHANNELS, std):
        if not value > 0:           # also NaN
            origin = (f'--std gives {value:g}' if opts.std else
                      f'the training images give {value:g} (to 4 decimals: each of them holds '
                      f'one {channel} value throughout, or nearly)')
            raise UserError(f'the std of the {channel} channel must be above 0, but {origin}, '
                            f'and normalising by it would divide by zero: give --std R G B with '
                            f'three values above 0')
    return mean, std


def build_pipeline(opts, settings, train, test, mean, std, world=None):
    rank, size = (world.rank, world.size) if world is not None else (0, 1)
    if opts.batch_size % size:
        raise UserError(f'--batch_size {opts.batch_size} does not split over {size} processes')
    common = dict(train_set=train, test_set=test, mean=mean, std=std, image_size=opts.image_size,
                  views=opts.views, batch_size=opts.batch_size, device=settings.device,
                  seed=opts.seed, flip=opts.flip, rank=rank, world_size=size)
    if settings.pipeline == 'gpu':
        return TensorPipeline(compile_mode=settings.compile, **common)
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


def build_trainer(opts, settings, net, method, optimizer, world=None):
    """The Trainer of `net` (the network, or its DDP wrapper) and the method's bank and
    anchors."""
    objective = Objective(views=opts.views, bank_loss=opts.bank, aug_loss=opts.aug_loss,
                          aug_input=opts.aug_input, ue_loss=opts.ue_loss, batch_t=opts.batch_t,
                          batch_m=opts.batch_m)
    return Trainer(net, method.bank, method.anchors, optimizer, objective,
                   precision=settings.precision, channels_last=settings.cuda,
                   compile_mode=settings.compile, world=world)


# ----------------------------------------------------------------------------- analysis
@dataclass
class LoadedNetwork:
    """A checkpoint's network (eval mode) and the input it was trained on."""
    net: torch.nn.Module
    mean: tuple
    std: tuple
    image_size: int
    config: dict            # the checkpoint's stored options ({} for a released file)


def load_network(path=None, device='cpu', network=None, low_dim=None, sobel=None, stem=None):
    """The network of the checkpoint at `path` (built from its stored options, else from what
    its weights show: released files), without its data; or, with no path, an untrained network
    of the given (else released) shape."""
    config, weights = {}, None
    if path is not None:
        state = ckpt.load(path)
        weights = clean_state_dict(state['net'])
        spec = models.weights_spec(weights)
        stored = {k: v for k, v in (state.get('config') or {}).items() if v is not None}
        config = {'network': spec['name'], 'sobel': spec['sobel'], 'stem': spec['stem'],
                  'low_dim': spec['low_dim'], **stored}
    image_size = config.get('image_size', RUN_DEFAULTS['image_size'])
    stem = stem or config.get('stem') or 'auto'
    net = models.build_network(network or config.get('network') or DEFAULTS['network'],
                               low_dim or config.get('low_dim') or DEFAULTS['low_dim'],
                               sobel=config.get('sobel', True) if sobel is None else sobel,
                               stem=models.default_stem(image_size) if stem == 'auto' else stem)
    if weights is not None:
        try:
            net.load_state_dict(weights)
        except RuntimeError:
            raise UserError(f'checkpoint {path} holds {models.describe_weights(weights)}, which '
                            f'this program cannot build') from None
    mean, std = datasets.MEAN_STD.get(config.get('dataset'), datasets.MEAN_STD['cifar10'])
    return LoadedNetwork(net.to(device).eval(), tuple(config.get('mean') or mean),
                         tuple(config.get('std') or std), image_size, config)



@dataclass
class Trained:
    """A checkpoint loaded with the data and network it was trained on, for analysis."""
    opts: SimpleNamespace
    state: dict
    method: MethodState
    train: datasets.ImageSet
    test: datasets.ImageSet            # None for a run on unlabeled images
    pipeline: object
    device: torch.device
    mean: tuple = None
    std: tuple = None

    @property
    def net(self):
        return self.method.net

    @property
    def bank(self):
        return self.method.bank

    def embeddings(self, split, source='network', show=False):
        """(N x D float32, N targets) of a split: the network's eval-mode embeddings of the
        test transform (float32), or for the training split also the memory bank
        (`source='bank'`). `show`: a progress bar on a terminal."""
        if source == 'bank':
            if split != 'train' or self.bank is None:
                raise UserError('bank features exist for the training split of a run with a '
                                'memory bank only')
            labels = torch.from_numpy(self.train.targets).to(self.device)
            data = KnnData(self.pipeline, labels, len(self.train.classes), 'bank')
            return training_features(self.net, self.bank, data), labels
        if split == 'test' and self.test is None:
            raise UserError('this checkpoint was trained on unlabeled images: there is no test '
                            'split')
        count = len(self.test if split == 'test' else self.train)
        return embed(self.net, progress_bar(self.pipeline.eval_batches(split),
                                            total=-(-count // self.pipeline.eval_batch),
                                            desc=f'embed {split}', enabled=show, unit='batch'))


def load_trained(path, say=print, **overrides):
    """Load the checkpoint at `path` with the options it was trained with (its stored config,
    else the released defaults), `overrides` (e.g. data_root, device) applied on top. Its bank
    is checked against the data found (the fingerprint); `say` gets the one note when a file
    has none."""
    state = ckpt.load(path)
    stored = {k: v for k, v in (state.get('config') or {}).items() if k != 'given'}
    opts = default_options(**{**stored, 'test_only': True, 'compile': 'none', 'pipeline': 'auto',
                              **overrides})
    if opts.knn_features == 'recompute':          # the word older checkpoints stored
        opts.knn_features = 'network'
    resolve(opts)
    settings = device_settings(opts)
    train, test = load_data(opts)
    note = ckpt.check_data(state, train.fingerprint, path)
    if note:
        say(note)
    for line in train.notes:
        say(line)
    mean, std = normalisation(opts, train)
    method = MethodState.build(opts, len(train), settings.device)
    method.load(state, path)
    method.net.eval()
    pipeline = build_pipeline(opts, settings, train, test, mean, std)
    return Trained(opts, state, method, train, test, pipeline, settings.device, mean, std)


def load_for_analysis(path, data_root=None, subset=None, device='auto', say=print):
    """`load_trained` as the analysis commands (linear probe, export, figures) call it: the
    data root and subset are the checkpoint's unless given; no loader processes."""
    overrides = dict(device=device, workers=0)
    if data_root is not None:
        overrides['data_root'] = data_root
    if subset is not None:
        overrides['subset'] = subset
    return load_trained(path, say=say, **overrides)
