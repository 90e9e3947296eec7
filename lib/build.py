"""Building a run's parts from its configuration (a lib.config.RunConfig, or any object with
the same attributes): device settings, data and its pipelines, the optimizer, the losses'
weights, and the kNN evaluation of the run's data.

`main.py`, `bench/`, `experiments/` and the analysis loading (lib/analysis.py) all build through
here, so they train and evaluate the same thing.
"""
import math
import os
import time
from dataclasses import asdict, dataclass

import torch

import datasets

from . import console
from .config import DEFAULTS
from .core.knn import KnnData, knn_evaluate
from .distributed import cuda_wanted
from .errors import UserError
from .fast_path import compile_augmentation
from .pipelines import LoaderPipeline, TensorPipeline
from .progress import progress_bar

BANK_STATS_ROWS = 1024      # bank entries whose statistics runs without labels report: drawn
                            # once with the seed, a few hundredths of a second per epoch


@dataclass(frozen=True)
class DeviceSettings:
    """The device (this rank's GPU) and the choices `auto` leaves to it."""
    device: torch.device
    pipeline: str       # 'gpu' (device tensors, batched augmentation) or 'cpu' (loader)
    precision: str      # training arithmetic: 'bf16' autocast or 'fp32'
    compile: str        # 'none', 'default' or 'reduce-overhead'
    compile_why: str = 'as asked'       # or the default `auto` took

    @property
    def cuda(self):
        return self.device.type == 'cuda'

    def arithmetic(self):
        """What `auto` chose that a resume must keep to equal the unbroken run: the pipeline
        (its augmentations) and the precision (its rounding). Kept in checkpoints (the loop,
        lib/engine.py, adds the number of processes, for lib/resume.py note_changed_processes)."""
        return dict(pipeline=self.pipeline, precision=self.precision)


def pick_device(choice, cuda_index=0):
    """The torch.device of --device auto|cuda|cpu (auto: CUDA when present)."""
    if choice == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device cuda, but no CUDA device is available')
    return torch.device(f'cuda:{cuda_index}' if cuda_wanted(choice) else 'cpu')


def device_settings(opts, world=None):
    """Resolve --device, --pipeline, --precision and --compile, the one place that settles
    `auto`: the fast path on CUDA (its CUDA-graph-captured step is ~3x faster than eager bf16
    at batch 128, docs/ALGORITHM.md 9), the released arithmetic on the CPU. Options stay typed."""
    device = pick_device(opts.device, world.local_rank if world is not None else 0)
    cuda = device.type == 'cuda'
    pick = (lambda value, on_cuda, on_cpu: value if value != 'auto'
            else on_cuda if cuda else on_cpu)
    if cuda:
        torch.backends.cudnn.benchmark = True
    return DeviceSettings(device, pick(opts.pipeline, 'gpu', 'cpu'),
                          pick(opts.precision, 'bf16', 'fp32'),
                          pick(opts.compile, 'reduce-overhead', 'none'),
                          f'the default on {"CUDA" if cuda else "the CPU"}'
                          if opts.compile == 'auto' else 'as asked')


def image_reading(opts, say=None, show=False):
    """How image files are read (a datasets.Reading): through the image cache unless
    --no-cache, decoded by --workers processes when given (0: in this process), else by every
    core; `show`: a progress bar of the decoding; `say` gets the line said while another
    process fills the same cache. `opts`: a RunConfig, or a command's flags (cli's
    add_reading_options)."""
    cache = datasets.ImageCache(opts.cache_dir) if opts.cache else None
    typed = getattr(opts, 'typed', None)        # main.py: --workers counts only when typed
    workers = opts.workers if typed is None or 'workers' in typed else None
    return datasets.Reading(cache, workers, say=say, progress=lambda items, **bar: progress_bar(
        items, enabled=show, leave=False, **bar))


def load_data(opts, root=None, reading=None):
    """(train, test) of the run's dataset (test None for an unlabeled folder), read through
    `reading` (default: image_reading(opts)), checked against the options that depend on its
    size."""
    if root is None and opts.eval_root and opts.dataset == 'folder':
        check_eval_root(opts)
    try:
        train, test = datasets.load_dataset(opts.dataset, root or opts.data_root,
                                            subset=opts.subset, seed=opts.seed,
                                            image_size=opts.image_size,
                                            reading=reading or image_reading(opts))
    except datasets.DataError as err:
        hint = '' if root else moved_folder_hint(opts, 'data_root')
        if not hint:
            raise
        raise UserError(f'{err}{hint}') from None
    if train.labelled and train.num_labelled == 0:     # (STL-10's unlabeled split only)
        chosen = f' of --subset {opts.subset}' if opts.subset else ''
        raise UserError(f'none of the {len(train)} training images{chosen} is labelled, so the '
                        f'kNN would have no votes and its accuracy no meaning'
                        + (': give a larger --subset' if opts.subset else ''))
    if opts.test_only:
        return train, test
    if len(train) < 2:              # (--batch_size is 2 or more: a step needs two images)
        raise UserError(f'a run needs at least 2 training images, and there '
                        f'{"is 1" if len(train) == 1 else "are none"}')
    if opts.batch_size > len(train):
        raise UserError(f'--batch_size {opts.batch_size} is larger than the {len(train)} '
                        f'training images')
    if opts.bank and opts.rounds > 1 and opts.ANs_size >= len(train):   # (anchors to find)
        raise UserError(f'--ANs_size {opts.ANs_size} needs more than {len(train)} training images')
    return train, test


def moved_folder_hint(opts, name):
    """' (... give their new place with --data-root DIR)' when the folder of the option `name`
    ('data_root', 'eval_root') is not there and was not typed but taken from the checkpoint
    (--resume, --test_only, the analysis commands; not the default, as for a released file
    without options): the user never typed the path that fails, so the error says where it
    came from. Else ''."""
    path = getattr(opts, name)
    if name in opts.typed or not (opts.resume or opts.test_only) or path == DEFAULTS[name] or \
            os.path.exists(path):
        return ''
    flag = '--' + name.replace('_', '-')
    return (f' ({flag} {path} is the run\'s own, from its checkpoint: if its '
            f'images have moved, give their new place with {flag} DIR)')


def load_eval_data(opts, reading=None):
    """(train, test) of --eval-root, a labelled tree that runs on unlabeled data are evaluated
    on (kNN of the network's embeddings), at the run's image size."""
    check_eval_root(opts)
    return datasets.load_dataset('folder', opts.eval_root, subset=opts.subset, seed=opts.seed,
                                 image_size=opts.image_size,
                                 reading=reading or image_reading(opts))


def check_eval_root(opts):
    """A UserError where --eval-root is not a labelled tree: said before the training images
    are read (minutes, for a large folder), and again where it is read."""
    if not os.path.isdir(opts.eval_root):
        raise UserError(f'--eval-root {opts.eval_root} ' + (
            'is a file, not a folder' if os.path.exists(opts.eval_root) else 'does not exist') +
            f': give a labelled tree, {opts.eval_root}/train/<class>/* and '
            f'{opts.eval_root}/test/<class>/*' + moved_folder_hint(opts, 'eval_root'))
    if datasets.folder_layout(opts.eval_root) != 'labelled':
        raise UserError(f'--eval-root {opts.eval_root} is not a labelled tree: it needs '
                        f'{opts.eval_root}/train/<class>/* and {opts.eval_root}/test/<class>/*')


CHANNELS = ('red', 'green', 'blue')


def normalisation(opts, train, cache=None):
    """(mean, std): given by flags, the dataset's constants, or computed from `train` (kept in
    `cache`, an ImageCache, when given). A std that is not above 0 (a channel with one value
    in every training image, say) would divide by zero: a UserError naming the channel and
    --std."""
    computed_mean, computed_std = (opts.mean, opts.std) if opts.mean and opts.std else \
        datasets.mean_std(opts.dataset, train, cache)
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
    if opts.batch_size // size < 2:     # as one process needs (BatchNorm's batch statistics)
        raise UserError(f'--batch_size {opts.batch_size} over {size} processes leaves each '
                        f'process {opts.batch_size // size} image, and each needs at least 2, '
                        f'as one process does (BatchNorm\'s batch statistics): give '
                        f'--batch_size {2 * size} or more, a multiple of {size}')
    common = dict(train_set=train, test_set=test, mean=mean, std=std, image_size=opts.image_size,
                  views=opts.views, batch_size=opts.batch_size, device=settings.device,
                  seed=opts.seed, flip=opts.flip, rank=rank, world_size=size)
    if settings.pipeline == 'gpu':
        return TensorPipeline(memory_budget=data_memory_budget(opts, settings.device),
                              wrap_augment=lambda augment: compile_augmentation(
                                  augment, settings.compile), **common)
    return LoaderPipeline(workers=opts.workers, **common)


DEVICE_DATA_SHARE = 0.5        # of the device's memory the gpu pipeline may hold images in:
                                # the rest is the network's, the bank's and the compiler's


def data_memory_budget(opts, device):
    """Bytes of images the gpu pipeline may hold on `device`: --data-memory GB, else
    DEVICE_DATA_SHARE of the device's memory (a GPU's, or this machine's for the CPU)."""
    if opts.data_memory is not None:
        return int(opts.data_memory * 2 ** 30)
    total = torch.cuda.get_device_properties(device).total_memory if device.type == 'cuda' \
        else os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    return int(DEVICE_DATA_SHARE * total)


def build_optimizer(opts, net):
    """SGD over the network's trained weights (the Sobel filters are frozen): Nesterov, with
    momentum and weight decay (docs/ALGORITHM.md 6); fused into one kernel on CUDA."""
    params = [p for p in net.parameters() if p.requires_grad]
    return sgd(params, params[0].device.type == 'cuda', lr=opts.lr, momentum=opts.momentum,
               weight_decay=opts.weight_decay, nesterov=opts.nesterov and opts.momentum > 0)


def sgd(params, fused, **settings):
    """torch.optim.SGD, fused when asked and this PyTorch has it (a release without fused SGD
    raises TypeError; one that cannot fuse these parameters, RuntimeError): else the plain
    one, which computes the same update."""
    if fused:
        try:
            return torch.optim.SGD(params, fused=True, **settings)
        except (TypeError, RuntimeError):
            pass
    return torch.optim.SGD(params, **settings)


# ----------------------------------------------------------------------------- the run's data
@dataclass
class RunData:
    """The data of a run and what reads it."""
    train: datasets.ImageSet
    test: datasets.ImageSet         # None for unlabeled images
    mean: tuple                     # the normalisation the run uses
    std: tuple
    pipeline: object                # LoaderPipeline or TensorPipeline of train and test
    knn: KnnData                    # None: no labels to evaluate with
    labels: torch.Tensor            # training labels (None when unlabeled): diagnostics only
    stats_rows: torch.Tensor        # without labels: the bank entries whose statistics are said

    def record(self):
        """How the training images were read (datasets.ReadStats: files, from_cache, hashed,
        decoded, seconds, processes, cache) and where the pipeline holds them: the start
        record's `data`."""
        stats = self.train.read_stats
        held = ('device' if self.pipeline.resident else 'streamed') \
            if hasattr(self.pipeline, 'resident') else 'loader'
        return dict(reading=asdict(stats) if stats is not None else None, images=held,
                    bytes=int(self.train.images.nbytes))


def run_data(opts, settings, world, say):
    """The RunData of a run, with the lines that describe it said: files skipped and how the
    others were read, the data line, --eval-root's data, warnings about the kNN."""
    reading = image_reading(opts, say, show=not opts.quiet and world.main)
    train, test = load_data(opts, reading=reading)
    console.report_reading(train, say)
    mean, std = normalisation(opts, train, reading.cache)
    say(console.data_line(opts, train, test, mean, std))
    if opts.subset and len(train) < opts.subset:
        say(f'note: --subset {opts.subset} is more than the {len(train)} training images '
            f'there are: all of them are used')
    if opts.eval_root and train.labelled:
        raise UserError('--eval-root is for runs on unlabeled images; this data has labels')
    pipeline = build_pipeline(opts, settings, train, test, mean, std, world)
    if settings.pipeline == 'gpu':
        say(console.device_data_line(pipeline))
    elif opts.data_memory is not None:
        say('note: --data-memory is the gpu pipeline\'s budget; the cpu pipeline reads each '
            'image from the image cache as it needs it')
    device = settings.device
    knn = labels = stats_rows = None
    if train.labelled:
        labels = torch.from_numpy(train.targets).to(device)
        knn = KnnData(pipeline, labels[:train.num_labelled], len(train.classes),
                      opts.knn_features)
    elif opts.eval_root:
        eval_train, eval_test = load_eval_data(opts, reading)
        say(console.eval_root_line(opts, eval_train, eval_test))
        console.report_reading(eval_train, say)
        eval_pipeline = build_pipeline(opts, settings, eval_train, eval_test, mean, std, world)
        knn = KnnData(eval_pipeline, torch.from_numpy(eval_train.targets).to(device),
                      len(eval_train.classes), 'network')
    if knn is None and opts.test_only:
        raise UserError('these training images have no labels, so there is no kNN accuracy: '
                        'give --eval-root DIR, a labelled train/<class>/*, test/<class>/* tree')
    if not train.labelled:      # (with --eval-root too: the accuracy adds to them)
        generator = torch.Generator().manual_seed(opts.seed)
        rows = torch.randperm(len(train), generator=generator)[:BANK_STATS_ROWS]
        stats_rows = rows.sort().values.to(device)
    for warning in console.knn_warnings(opts, knn):
        say(warning)
    return RunData(train, test, mean, std, pipeline, knn, labels, stats_rows)


def check_same_data(data, world):
    """With several processes (on several machines each reads its own copy of the data):
    every process's training and test images must be rank 0's (their fingerprints), else every
    process stops with one line naming the ones that differ, before the first step."""
    if world.size == 1:
        return
    everyone, differing = world.unlike_main(
        (data.train.fingerprint, data.test.fingerprint if data.test is not None else None))
    if differing:
        rank = differing[0]
        split = 'training' if everyone[rank][0] != everyone[0][0] else 'test'
        index = 0 if split == 'training' else 1
        others = ', '.join(world.where(r) for r in differing)
        raise UserError(f'{others} {"reads" if len(differing) == 1 else "read"} other data than '
                        f'{world.where(0)}: {split} images '
                        f'{datasets.describe_fingerprint(everyone[rank][index])} against '
                        f'{datasets.describe_fingerprint(everyone[0][index])}; every node needs '
                        f'the same data under its --data-root')


def evaluate(opts, method, data, world):
    """kNN top-1 and top-5 (fractions) of the run's evaluation data, or None without labels."""
    if data.knn is None:
        return None
    show = not opts.quiet and world.main
    return knn_evaluate(method.net, method.bank, data.knn, opts.knn_k, opts.knn_sigma, world,
                        opts.eval_precision,
                        lambda batches, desc: progress_bar(batches, desc=desc, enabled=show))


def anchor_discovery(method, round_index, labels, world):
    """Discover this round's anchors (MethodState.discover_anchors); returns the round's
    record: how many, the (anchor, neighbour) label consistency (%, None without labelled
    pairs), their mean cosine in the bank (None without anchors), seconds."""
    started = time.time()
    method.discover_anchors(round_index, labels, world)
    anchors = method.anchors
    consistency = 100 * float(anchors.consistency) if labels is not None else math.nan
    similarity = anchors.neighbour_similarity(method.bank.memory)
    return dict(round=round_index, anchors=anchors.num_anchors, entries=anchors.num_entries,
                consistency=consistency if math.isfinite(consistency) else None,
                neighbour_similarity=similarity if math.isfinite(similarity) else None,
                seconds=time.time() - started)


