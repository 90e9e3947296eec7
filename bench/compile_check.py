"""The figures behind the first-step check of the compiled step (lib/agreement.py): how far the
compiled step is from the eager one in float32 and in bf16, how far two eager runs of one step
already are (contiguous against channels_last memory), and what the check costs against one
step and against a whole run.

    python bench/compile_check.py                       # the CPU, AlexNet, 16 images x 2 views
    python bench/compile_check.py --device cuda --network resnet18 --batch_size 128

Synthetic images; the state is the network's at initialisation and a random bank. A benchmark,
not a test: it prints figures.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    p.add_argument('--network', default='alexnet')
    p.add_argument('--batch_size', type=int, default=16)
    p.add_argument('--images', type=int, default=64, help='training images (bank entries)')
    return p.parse_args()


if __name__ == '__main__':
    parse_args()        # --help and flag errors before torch is imported (seconds)

import torch  # noqa: E402

from lib import agreement, fast_path  # noqa: E402
from lib.build import build_optimizer, device_settings  # noqa: E402
from lib.config import defaults  # noqa: E402
from lib.core.losses import loss_weights  # noqa: E402
from lib.core.schedules import Schedule  # noqa: E402
from lib.core.step import local_batch  # noqa: E402
from lib.fast_path import StepParts  # noqa: E402
from lib.method_state import MethodState  # noqa: E402

# A 200-epoch round of CIFAR-10 at batch 128: what the check's cost is compared with.
RUN_STEPS = 200 * (50_000 // 128)


def parts_of(config, method, optimizer, precision, channels_last, compile_mode):
    net = method.net
    if precision == 'bf16' or channels_last:
        net = fast_path.Autocast(net, bf16=precision == 'bf16', channels_last=channels_last)
    losses = fast_path.step_losses_of(config, method)
    if compile_mode != 'none':
        net = torch.compile(net, mode=compile_mode, dynamic=False)
        losses = torch.compile(losses, mode=compile_mode, dynamic=False)
    return StepParts(net, losses, optimizer, local_batch,
                     compile_mode == 'reduce-overhead' and config.device == 'cuda')


def main():
    args = parse_args()
    config = defaults(network=args.network, batch_size=args.batch_size, device=args.device)
    settings = device_settings(config)
    method = MethodState.build(config, args.images, settings.device)
    optimizer = build_optimizer(config, method.net)
    generator = torch.Generator().manual_seed(0)
    views = torch.randn(2 * args.batch_size, 3, 32, 32, generator=generator).to(settings.device)
    indexes = torch.randperm(args.images, generator=generator)[:args.batch_size]
    batch = (views, indexes.to(settings.device))
    weights = loss_weights(config, Schedule(200), 199)     # every loss weighs
    buffers = list(method.net.buffers())
    mode = 'reduce-overhead' if settings.cuda else 'default'
    print(f'{args.network}, {args.batch_size} images x 2 views on {settings.device}, torch '
          f'{torch.__version__}; compile {mode}')

    def show(label, found):
        worst = max(abs(c - e) / max(abs(e), 1e-3) for e, c in found.losses.values())
        print(f'  {label:<46s} losses rel {worst:.1e}, gradient cosine 1 - '
              f'{1 - found.grad_cosine:.1e}, norm ratio - 1 {found.grad_norm_ratio - 1:+.1e}')
        return found

    for precision in ('fp32', 'bf16'):
        eager = parts_of(config, method, optimizer, precision, settings.cuda, 'none')
        started = time.time()
        compiled = parts_of(config, method, optimizer, precision, settings.cuda, mode)
        # As a run checks: with CUDA graphs CAPTURE_RUNS compiled runs, else one.
        runs = agreement.CAPTURE_RUNS if compiled.cuda_graphs else 1
        first = agreement.agreement(eager, compiled, batch, weights, buffers, runs)
        compile_seconds = time.time() - started
        show(f'compiled against eager, {precision}', first)
        check = agreement.agreement(eager, compiled, batch, weights, buffers, runs)  # compiled
        started = time.time()
        agreement.agreement(eager, compiled, batch, weights, buffers, runs=1, compare=False)
        one_step = time.time() - started
        print(f'  {"":<46s} first check {compile_seconds:.1f} s (compiling), then '
              f'{check.seconds:.2f} s = {check.seconds / one_step:.1f} compiled steps; '
              f'{100 * check.seconds / (RUN_STEPS * one_step):.4f}% of a 200-epoch round')
        torch._dynamo.reset()
    contiguous = parts_of(config, method, optimizer, 'fp32', False, 'none')
    channels_last = parts_of(config, method, optimizer, 'fp32', True, 'none')
    show('two eager runs, contiguous / channels_last', agreement.agreement(
        contiguous, channels_last, batch, weights, buffers, runs=1))
    bf16 = parts_of(config, method, optimizer, 'bf16', settings.cuda, 'none')
    show('eager bf16 against eager fp32', agreement.agreement(contiguous, bf16, batch, weights,
                                                               buffers, runs=1))


if __name__ == '__main__':
    main()
