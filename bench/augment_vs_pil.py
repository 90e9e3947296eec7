"""How far datasets/augment.py is from the released code's PIL-based augmentation, per op.

    python bench/augment_vs_pil.py [--data-root data] [--images 512] [--seed 0] [--first]

The released Super-AND code ran torchvision's transforms on PIL images: uint8 after every op,
PIL's own resize for the crop, PIL's integer HSV conversion for hue and Image.blend (which
truncates) for brightness / contrast / saturation. datasets/augment.py follows torchvision's
*tensor* ops on float images instead. This script draws one set of parameters per image with
``sample_params`` (seeded uniforms), then applies, to the same CIFAR training images,

  * ours: ``apply_params`` on float images in [0, 1], and
  * PIL:  torchvision.transforms.functional on PIL images (resized_crop with antialias,
          adjust_brightness / contrast / saturation / hue, rgb_to_grayscale, hflip), to_tensor,

once per op with every other op neutral (identity crop, factor 1, hue 0, no grayscale, no
flip), and once with the whole pipeline (all ops, in each image's sampled jitter order).
Flip and grayscale are forced on for every image in their own rows (sampled, they would hit
only 50 % and 20 % of the images). Differences are in grey levels (units of 1/255): max and
mean absolute difference over all output values, the share of values differing by more
than one grey level, and the signed mean difference (ours - PIL: a bias rather than noise).
A benchmark-style report, not a test; CPU only.
"""
import argparse
import glob
import os
import platform
import sys


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data-root', dest='data_root', default='data')
    p.add_argument('--images', type=int, default=512)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--first', action='store_true',
                   help='the first N images in sorted path order (default: a seeded random '
                        'choice over all training images, so every class is represented)')
    return p.parse_args()


if __name__ == '__main__':
    parse_args()        # --help and flag errors before torch is imported (seconds)

import PIL  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
import torchvision.transforms.functional as TF  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datasets  # noqa: E402
from datasets.augment import NUM_UNIFORMS, apply_params, sample_params  # noqa: E402

OUT_SIZE = 32
JITTER_OPS = ('brightness', 'contrast', 'saturation', 'hue')  # index = op id in params['order']
PIL_JITTER = {'brightness': TF.adjust_brightness, 'contrast': TF.adjust_contrast,
              'saturation': TF.adjust_saturation, 'hue': TF.adjust_hue}
CROP_KEYS = ('top', 'left', 'crop_h', 'crop_w')
# (row label, ops applied, params forced on for every image)
ROWS = (
    ('crop + resize', {'crop'}, {}),
    ('flip (every image)', {'flip'}, {'flip': True}),
    ('brightness', {'brightness'}, {}),
    ('contrast', {'contrast'}, {}),
    ('saturation', {'saturation'}, {}),
    ('hue', {'hue'}, {}),
    ('grayscale (every image)', {'grayscale'}, {'grayscale': True}),
    ('whole pipeline (sampled order)', {'crop', 'flip', *JITTER_OPS, 'grayscale'}, {}),
)


def load_images(root, count, seed, first):
    """`count` training images as a list of RGB PIL images."""
    paths = sorted(glob.glob(os.path.join(root, 'train', '*', '*.jpg')))
    if not paths:
        raise SystemExit(f'no images under {os.path.join(root, "train")}/<class>/*.jpg')
    if first:
        chosen = paths[:count]
    else:
        g = torch.Generator().manual_seed(seed)
        chosen = [paths[i] for i in torch.randperm(len(paths), generator=g)[:count].tolist()]
    return [datasets.to_rgb(datasets.open_image(p)) for p in chosen]   # as runs read them


def neutral_params(batch, height, width):
    """Parameters under which apply_params returns its input: identity crop, no jitter."""
    long = dict(dtype=torch.long)
    return {'top': torch.zeros(batch, **long), 'left': torch.zeros(batch, **long),
            'crop_h': torch.full((batch,), height, **long),
            'crop_w': torch.full((batch,), width, **long),
            'flip': torch.zeros(batch, dtype=torch.bool),
            'brightness': torch.ones(batch), 'contrast': torch.ones(batch),
            'saturation': torch.ones(batch), 'hue': torch.zeros(batch),
            'order': torch.arange(4).repeat(batch, 1),
            'grayscale': torch.zeros(batch, dtype=torch.bool)}


def isolate(sampled, active, forced, height, width):
    """Neutral parameters with the sampled values of the `active` ops, and `forced` ones."""
    params = neutral_params(len(sampled['top']), height, width)
    for op in active:
        for key in (CROP_KEYS if op == 'crop' else (op,)):
            params[key] = sampled[key].clone()
    params['order'] = sampled['order'].clone()  # only matters when several jitter ops are on
    for key, value in forced.items():
        params[key] = torch.full_like(params[key], value)
    return params


def ours(images, params, active):
    """Our batched augmentation, (B, 3, 32, 32) float in [0, 1]."""
    color = bool(active & {*JITTER_OPS, 'grayscale'})
    with torch.no_grad():
        return apply_params(images, params, OUT_SIZE, color=color, apply_hue='hue' in active)


def pil_one(img, params, i, active):
    """The released pipeline on one PIL image, with image i's parameters, inactive ops skipped.

    Inactive ops must be skipped, not run with a neutral factor: PIL's hue round trip through
    HSV is lossy even for a zero shift (torchvision's ColorJitter skips hue when hue=0 too).
    """
    if 'crop' in active:
        top, left, h, w = (int(params[k][i]) for k in CROP_KEYS)
        img = TF.resized_crop(img, top, left, h, w, [OUT_SIZE, OUT_SIZE], antialias=True)
    for op_id in params['order'][i].tolist():  # ColorJitter's random op order
        op = JITTER_OPS[op_id]
        if op in active:
            img = PIL_JITTER[op](img, float(params[op][i]))
    if 'grayscale' in active and bool(params['grayscale'][i]):
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if 'flip' in active and bool(params['flip'][i]):
        img = TF.hflip(img)
    return TF.to_tensor(img)


def differences(ours_out, pil_out):
    """In grey levels: max and mean |ours - PIL|, the share of values more than 1 level
    apart, and the signed mean of ours - PIL (a bias, e.g. from PIL truncating)."""
    signed = (ours_out - pil_out).double() * 255.0
    levels = signed.abs()
    # A tolerance, so values exactly one level apart in float32 (e.g. 1.0000001) don't count.
    over_one = (levels > 1.0 + 1e-3).double().mean()
    return (levels.max().item(), levels.mean().item(), 100.0 * over_one.item(),
            signed.mean().item())


def main():
    args = parse_args()
    torch.set_num_threads(1)
    pil_images = load_images(args.data_root, args.images, args.seed, args.first)
    # As ToTensor: uint8 / 255, float32 as in training.
    batch = torch.stack([TF.to_tensor(img) for img in pil_images])
    n, _, height, width = batch.shape
    g = torch.Generator().manual_seed(args.seed)
    sampled = sample_params(torch.rand(n, NUM_UNIFORMS, generator=g), height, width)

    print(f'device: CPU ({platform.processor() or platform.machine()}), 1 thread')
    print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, '
          f'Pillow {PIL.__version__}')
    print(f'{n} CIFAR training images from {args.data_root} '
          f'({"first in sorted order" if args.first else f"seeded choice, seed {args.seed}"}), '
          f'{height}x{width} -> {OUT_SIZE}x{OUT_SIZE}; differences in grey levels (1/255)\n')
    print('| op | max abs diff | mean abs diff | values > 1 level apart | mean ours - PIL |')
    print('|---|---|---|---|---|')
    for label, active, forced in ROWS:
        params = isolate(sampled, active, forced, height, width)
        mine = ours(batch, params, active)
        theirs = torch.stack([pil_one(img, params, i, active) for i, img in enumerate(pil_images)])
        top, mean, share, bias = differences(mine, theirs)
        print(f'| {label} | {top:.2f} | {mean:.3f} | {share:.2f} % | {bias:+.3f} |')


if __name__ == '__main__':
    main()
