"""Seconds per epoch of each phase of Super-AND training, on the chosen device.

    python bench/epoch_speed.py --data-root data                       # CIFAR-10, the GPU path
    python bench/epoch_speed.py --synthetic-n 2048 --device cpu --steps 2 --batch_size 32
    python bench/epoch_speed.py --synthetic-n 1281167 --phases knn,ans  # ImageNet-sized bank

Each phase is timed on its own over `--steps` steps after `--warmup` steps (compilation,
CUDA-graph capture), with the device synchronised around it, and scaled to a whole epoch
(steps_per_epoch = N // batch_size). Phases:
  aug      the two augmented views of every batch (the pipeline alone)
  step     forward + losses + backward + SGD (the trainer step without its bank update)
  bank     the memory-bank update
  train    whole training steps as `main.py` runs them (pipeline + step + bank + meters)
  net      the network alone, forward + backward + SGD on fixed views, compiled as the step
           is: the floor the whole epoch is compared with (docs/ALGORITHM.md section 9: the
           released network took 3.2 s on an H100)
  knn      the kNN evaluation pass (test embeddings + weighted vote against the bank)
  ans      anchor discovery for the last round (entropy of every entry + neighbours)
It prints seconds per epoch, images per second, peak GPU memory and the ratio of the whole
epoch (train + knn) to the network-only time. A benchmark, not a test.
"""
import argparse
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datasets  # noqa: E402
from lib.core.constants import ALGORITHM  # noqa: E402
from lib.core.recipes import RECIPES  # noqa: E402

PHASES = ('aug', 'step', 'bank', 'train', 'net', 'knn', 'ans')


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--dataset', default='cifar10', choices=datasets.DATASETS)
    p.add_argument('--data-root', dest='data_root', default='./data')
    p.add_argument('--synthetic-n', dest='synthetic_n', type=int, default=None,
                   help='random images instead of a dataset: this many training images')
    p.add_argument('--synthetic-test', dest='synthetic_test', type=int, default=10000,
                   help='test images with --synthetic-n (default: %(default)s)')
    p.add_argument('--synthetic-classes', dest='synthetic_classes', type=int, default=10,
                   help='classes of the synthetic labels (default: %(default)s)')
    p.add_argument('--network', default='resnet18')
    p.add_argument('--method', default='super-and', choices=sorted(RECIPES))
    p.add_argument('--batch_size', type=int, default=ALGORITHM['batch_size'])
    p.add_argument('--device', default='auto', choices=('auto', 'cuda', 'cpu'))
    p.add_argument('--pipeline', default='auto', choices=('auto', 'gpu', 'cpu'))
    p.add_argument('--precision', default='auto', choices=('auto', 'bf16', 'fp32'))
    p.add_argument('--compile', default='auto',
                   choices=('auto', 'none', 'default', 'reduce-overhead'))
    p.add_argument('--workers', type=int, default=min(12, os.cpu_count() or 1),
                   help='loader processes of the cpu pipeline (default: %(default)s)')
    p.add_argument('--steps', type=int, default=None,
                   help='steps timed per phase (default: one epoch on CUDA, 4 on the CPU)')
    p.add_argument('--warmup', type=int, default=None,
                   help='untimed steps first (default: 20 on CUDA, 1 on the CPU)')
    p.add_argument('--phases', default=','.join(PHASES),
                   help='comma-separated subset of ' + ','.join(PHASES))
    p.add_argument('--ans-round', dest='ans_round', type=int, default=ALGORITHM['rounds'] - 1,
                   help='round whose anchors are discovered (default: %(default)s, the largest)')
    args = p.parse_args()
    args.phases = [x for x in args.phases.split(',') if x]
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        p.error(f'unknown phases {sorted(unknown)}')
    return args


if __name__ == '__main__':
    parse_args()        # --help and flag errors before torch is imported (seconds)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lib.build import (build_optimizer, build_pipeline, device_settings,  # noqa: E402
                       load_data, normalisation)
from lib.config import defaults  # noqa: E402
from lib.core.knn import KnnData, exact_float32, knn_evaluate  # noqa: E402
from lib.core.losses import loss_weights  # noqa: E402
from lib.core.schedules import Schedule  # noqa: E402
from lib.core.step import train_step  # noqa: E402
from lib.engine import run_epoch  # noqa: E402
from lib.fast_path import step_parts  # noqa: E402
from lib.distributed import World  # noqa: E402
from lib.method_state import MethodState  # noqa: E402


def options(args):
    """The run's configuration as lib.build expects it: the released defaults, the method's
    recipe and this script's choices."""
    return defaults(**vars(args))      # (defaults() keeps only the run's options)


def synthetic_sets(n_train, n_test, train_images=True, classes=10, seed=0):
    """Random images and labels. Without `train_images` the training images are one black
    image repeated (a view, no memory): bank-only phases at ImageNet size need no pixels."""
    rng = np.random.default_rng(seed)

    def make(n, what, pixels=True):
        images = (rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8) if pixels else
                  np.broadcast_to(np.zeros((1, 32, 32, 3), np.uint8), (n, 32, 32, 3)))
        return datasets.ImageSet(images, rng.integers(0, classes, size=n).astype(np.int64),
                                 [str(c) for c in range(classes)], what)
    return make(n_train, 'synthetic train', train_images), make(n_test, 'synthetic test')


class Timer:
    def __init__(self, device):
        self.cuda = device.type == 'cuda'

    def __call__(self, fn, steps, warmup):
        for _ in range(warmup):
            fn()
        self.sync()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        self.sync()
        return (time.perf_counter() - start) / max(steps, 1)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def endless_batches(pipeline):
    """The pipeline's batches, epoch after epoch."""
    for epoch in itertools.count():
        yield from pipeline.train_batches(0, epoch)


def network_only_step(opts, settings, net):
    """The network alone, compiled like the training step: forward, a cheap loss, backward,
    fused SGD. Returns a callable doing one step on fixed views."""
    device = settings.device
    views = torch.randn(2 * opts.batch_size, 3, 32, 32, device=device)
    if device.type == 'cuda':
        views = views.contiguous(memory_format=torch.channels_last)
    target = torch.randn(2 * opts.batch_size, opts.low_dim, device=device)
    optimizer = build_optimizer(opts, net)
    bf16 = settings.precision == 'bf16'

    def forward():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return (net(views) * target).sum()
    compiled = (forward if settings.compile == 'none'
                else torch.compile(forward, mode=settings.compile))
    cuda_graphs = settings.compile == 'reduce-overhead' and device.type == 'cuda'

    def step():
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss = compiled()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def main():
    args = parse_args()
    opts = options(args)
    settings = device_settings(opts)
    with exact_float32(settings.device, settings.precision):   # as main.py trains: fp32, no TF32
        measure(args, opts, settings)


def measure(args, opts, settings):
    """Time each phase asked for and print the table."""
    device, cuda = settings.device, settings.cuda
    steps_default, warmup_default = (None, 20) if cuda else (4, 1)
    warmup = args.warmup if args.warmup is not None else warmup_default
    if args.synthetic_n:
        needs_pixels = bool({'aug', 'step', 'bank', 'train'} & set(args.phases))
        train, test = synthetic_sets(args.synthetic_n, args.synthetic_test, needs_pixels,
                                     args.synthetic_classes)
    else:
        train, test = load_data(opts)
    steps_per_epoch = len(train) // opts.batch_size
    steps = min(args.steps or steps_default or steps_per_epoch, steps_per_epoch)
    scale = steps_per_epoch
    name = torch.cuda.get_device_name(device) if cuda else 'CPU'
    print(f'device: {name} | torch {torch.__version__} | N = {len(train)} train, {len(test)} '
          f'test | batch {opts.batch_size} x 2 views, {steps_per_epoch} steps/epoch, '
          f'{steps} timed per phase after {warmup} warm-up | {settings.pipeline} pipeline, '
          f'{settings.precision}, compile {settings.compile}', flush=True)

    method = MethodState.build(opts, len(train), device)
    net, bank, anchors = method.net, method.bank, method.anchors
    if bank is None:
        print('  (no memory bank in this method: the bank, knn and ans phases are skipped)')
        args.phases = [p for p in args.phases if p not in ('bank', 'knn', 'ans')]
    labels = torch.from_numpy(train.targets).to(device)
    training = {'aug', 'step', 'bank', 'train'} & set(args.phases)
    pipeline = None
    if training or 'knn' in args.phases:
        # kNN alone needs only the test images on the device (and the train labels).
        pipeline = build_pipeline(opts, settings, train if training else train.subset([0]),
                                  test, *normalisation(opts, train))
    timer = Timer(device)
    seconds = {}

    def report(phase, label, per_epoch):
        seconds[phase] = per_epoch
        print(f'  {label:<44s} {per_epoch:8.3f} s/epoch', flush=True)

    if training:
        optimizer = build_optimizer(opts, net)
        parts, _ = step_parts(opts, settings, method, optimizer, World())
        weights = loss_weights(opts, Schedule(opts.epochs, opts.schedule), 0)
        net.train()
        stream = endless_batches(pipeline)
        views, indexes = next(stream)
        pairs = views.shape[0] // indexes.shape[0]   # views per image
    if 'aug' in args.phases:
        report('aug', f'augmentation ({settings.pipeline} pipeline, 2 views)',
               timer(lambda: next(stream), steps, warmup) * scale)
    if 'bank' in args.phases:
        features = torch.nn.functional.normalize(torch.randn(pairs * opts.batch_size, opts.low_dim,
                                                             device=device), dim=1)
        report('bank', 'memory-bank update', timer(lambda: bank.update(features, indexes), steps,
                                                   warmup) * scale)
    if 'step' in args.phases:
        def one_step():
            if parts.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            train_step(parts.net, parts.step_losses, optimizer, views, indexes, weights,
                       parts.gather)
        per_step = timer(one_step, steps, warmup)
        report('step', 'forward + losses + backward + SGD', per_step * scale
               - seconds.get('bank', 0.0))
    if 'train' in args.phases:
        def train_steps():
            run_epoch(parts, itertools.islice(stream, steps), weights)
        per_call = timer(train_steps, 1, 1)
        report('train', 'whole training steps (as main.py)', per_call / steps * steps_per_epoch)
        print(f'  {"images per second (training)":<44s} {len(train) / seconds["train"]:8.0f}')
    if 'net' in args.phases:
        step = network_only_step(opts, settings, net)
        report('net', f'network only (compile {settings.compile})',
               timer(step, steps, warmup) * scale)
    if 'knn' in args.phases:
        data = KnnData(pipeline, labels, len(train.classes), 'bank')

        def knn():
            knn_evaluate(net, bank, data, opts.knn_k, opts.knn_sigma)
        report('knn', f'kNN pass ({len(test)} test x {len(train)} bank)', timer(knn, 1, 1))
    if 'ans' in args.phases:
        report('ans', f'ANs discovery (round {args.ans_round}, '
               f'{anchors.anchors_in_round(args.ans_round)} anchors)',
               timer(lambda: anchors.update(args.ans_round, bank.memory, bank.temperature,
                                            labels), 1, 1 if len(train) < 200_000 else 0))
    if 'train' in seconds and 'knn' in seconds:
        whole = seconds['train'] + seconds['knn']
        print(f'  {"whole epoch (training + kNN)":<44s} {whole:8.3f} s/epoch')
        if 'net' in seconds:
            print(f'  {"ratio whole epoch / network only":<44s} {whole / seconds["net"]:8.2f}')
    if cuda:
        print(f'  {"peak GPU memory":<44s} {torch.cuda.max_memory_allocated() / 2**30:8.2f} GiB')
    if bank is not None:
        print(f'  {"memory bank (N x D float32)":<44s} {bank.memory.numel() * 4 / 2**20:8.1f} MiB')


if __name__ == '__main__':
    main()
