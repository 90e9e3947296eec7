"""Batched, per-sample random augmentation on tensors (GPU or CPU).

This reproduces, one whole batch at a time, the torchvision training pipeline of the
released Super-AND code::

    RandomResizedCrop(size, scale=(0.2, 1.0), ratio=(3/4, 4/3))   # bilinear
    ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.4)
    RandomGrayscale(p=0.2)
    RandomHorizontalFlip(p=0.5)
    ToTensor(); Normalize(mean, std)

Why not torchvision per image, or kornia?  Per-image transforms in DataLoader workers
are the bottleneck for 32 px images, and kornia's batched augmentation measured
7.9 ms per batch of 128 on an H100, against 2.3 ms eager / 0.64 ms under
``torch.compile`` for the hand-fused version below.  To be fusable the code has:

* no Python loop over samples (the only loops are over the 4 jitter positions and
  the 10 crop attempts, both static and vectorised over the batch);
* no host sync (.item(), .tolist(), nonzero, boolean indexing) and fixed shapes;
* randomness passed in as a tensor of uniforms, ``(B, NUM_UNIFORMS)``, so a caller
  can draw one epoch's random numbers at once and slice them, and so that the
  output is a deterministic function of (images, uniforms).

The work is split into two pure functions that tests can check separately:
``sample_params`` (uniforms -> per-image parameters, following torchvision's
``get_params`` logic) and ``apply_params`` (parameters -> augmented images, matching
torchvision's tensor functional ops).

Fidelity notes:

* Crop + resize + flip is one bilinear ``grid_sample``.  It equals torchvision's
  ``resized_crop(..., antialias=True)`` when the crop is not larger than the output
  (upsampling or identity), which is always the case when ``out_size`` equals the
  image side as in Super-AND (CIFAR 32 -> 32).  When downsampling, torchvision
  (and PIL) antialias and this module does not.
* Colour ops follow torchvision's *tensor* functional ops on float images (tested to
  agree within 1e-4).  The released code ran them on PIL uint8 images, which truncate to
  uint8 after every op and convert hue through PIL's own 8-bit HSV.  Measured against PIL
  with the same parameters (``bench/augment_vs_pil.py``, 512 CIFAR-10 images, in grey
  levels of 1/255): crop + resize, brightness, contrast, saturation and grayscale each
  within about 1 level (PIL's truncation makes it about 0.45 levels darker on average),
  flip exact, hue up to 11 levels (mean 0.3); the whole pipeline differs by 1.35 levels
  on average (up to 16, on saturated pixels after a hue shift).
"""

import math

import torch
import torch.nn.functional as F

from .transforms import CROP_RATIO, CROP_SCALE, FLIP_P, GRAYSCALE_P, JITTER

__all__ = ["NUM_UNIFORMS", "UNIFORM_SLOTS", "BatchAugment", "sample_params", "apply_params"]

NUM_CROP_ATTEMPTS = 10  # as in torchvision's RandomResizedCrop.get_params

# Layout of the per-image uniforms.  Every random decision has its own slot, so
# slots are never reused and parameters are independent.
UNIFORM_SLOTS = {
    "area": slice(0, 10),        # crop attempt k: target area fraction
    "log_ratio": slice(10, 20),  # crop attempt k: log aspect ratio
    "top": 20,                   # crop offset, rows
    "left": 21,                  # crop offset, columns
    "jitter": slice(22, 26),     # brightness, contrast, saturation, hue factors
    "order": slice(26, 30),      # argsort of these 4 gives the jitter-op order
    "grayscale": 30,
    "flip": 31,
}
NUM_UNIFORMS = 32

# Jitter op ids, as in torchvision's ColorJitter (fn_idx = torch.randperm(4)).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


def _fallback_crop(height, width, ratio):
    """torchvision's central-crop fallback size (h, w) when all 10 attempts fail."""
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return h, w


def _sample_crops(u, height, width, scale, ratio):
    """Vectorised ``RandomResizedCrop.get_params``.

    Args:
        u: (B, NUM_UNIFORMS) float64 uniforms.
    Returns:
        top, left, crop_h, crop_w: (B,) long.
    """
    s = UNIFORM_SLOTS
    # float64 so rounding w, h agrees with torchvision's Python-float arithmetic.
    target_area = (height * width) * (scale[0] + (scale[1] - scale[0]) * u[:, s["area"]])  # (B, 10)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, s["log_ratio"]])  # (B, 10)
    # torch.round is round-half-to-even, like Python's round().
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (B, 10)

    # The first valid attempt: argmax returns the first maximal index.  Where none is
    # valid it returns 0, which the fallback below overrides.
    first = valid.to(torch.int32).argmax(dim=1, keepdim=True)  # (B, 1)
    any_valid = valid.any(dim=1)  # (B,)
    fb_h, fb_w = _fallback_crop(height, width, ratio)
    crop_h = torch.where(any_valid, h.gather(1, first).squeeze(1), float(fb_h))
    crop_w = torch.where(any_valid, w.gather(1, first).squeeze(1), float(fb_w))

    # randint(0, n) == floor(U * n); the clamp guards against U * n rounding up to n.
    n_top = height - crop_h + 1
    n_left = width - crop_w + 1
    top = torch.minimum(torch.floor(u[:, s["top"]] * n_top), n_top - 1)
    left = torch.minimum(torch.floor(u[:, s["left"]] * n_left), n_left - 1)
    # The fallback crop is centred.
    top = torch.where(any_valid, top, torch.div(height - crop_h, 2, rounding_mode="floor"))
    left = torch.where(any_valid, left, torch.div(width - crop_w, 2, rounding_mode="floor"))
    return top.long(), left.long(), crop_h.long(), crop_w.long()


def sample_params(uniforms, height, width, scale=CROP_SCALE, ratio=CROP_RATIO,
                  brightness=JITTER, contrast=JITTER, saturation=JITTER, hue=JITTER,
                  grayscale_p=GRAYSCALE_P, flip_p=FLIP_P, flip=True, color=True):
    """Turn uniforms into per-image augmentation parameters.

    Args:
        uniforms: (B, NUM_UNIFORMS) float in [0, 1), laid out as in ``UNIFORM_SLOTS``.
        height, width: input image size (Python ints).
        scale, ratio: RandomResizedCrop ranges.
        brightness, contrast, saturation: jitter strength x, factor ~ U(max(0, 1-x), 1+x).
        hue: hue shift ~ U(-hue, hue), hue <= 0.5.
        grayscale_p, flip_p: probabilities of RandomGrayscale and RandomHorizontalFlip.
        flip: False disables flipping.  color: False disables jitter and grayscale
            (factors become 1, hue 0, grayscale False).
    Returns:
        dict of per-image tensors on ``uniforms.device``:
        ``top, left, crop_h, crop_w``: (B,) long;  ``flip``, ``grayscale``: (B,) bool;
        ``brightness, contrast, saturation, hue``: (B,) float;
        ``order``: (B, 4) long, a random permutation of the op ids 0..3
        (0 brightness, 1 contrast, 2 saturation, 3 hue), applied left to right.
    """
    s = UNIFORM_SLOTS
    fdtype = uniforms.dtype if uniforms.is_floating_point() else torch.float32
    u = uniforms.to(fdtype)
    batch = u.shape[0]

    top, left, crop_h, crop_w = _sample_crops(u.to(torch.float64), height, width, scale, ratio)

    jit = u[:, s["jitter"]]  # (B, 4)

    def factor(x, col):  # torchvision: uniform on [max(0, 1 - x), 1 + x]
        lo, hi = max(0.0, 1.0 - x), 1.0 + x
        return lo + (hi - lo) * jit[:, col]

    if color:
        b, c, sat = factor(brightness, 0), factor(contrast, 1), factor(saturation, 2)
        h = -hue + 2.0 * hue * jit[:, 3]
        gray = u[:, s["grayscale"]] < grayscale_p
    else:
        b = c = sat = torch.ones(batch, dtype=fdtype, device=u.device)
        h = torch.zeros(batch, dtype=fdtype, device=u.device)
        gray = torch.zeros(batch, dtype=torch.bool, device=u.device)

    # argsort of i.i.d. uniforms is a uniformly random permutation (like randperm).
    order = torch.argsort(u[:, s["order"]], dim=1)
    if flip:
        flipped = u[:, s["flip"]] < flip_p
    else:
        flipped = torch.zeros(batch, dtype=torch.bool, device=u.device)

    return {"top": top, "left": left, "crop_h": crop_h, "crop_w": crop_w, "flip": flipped,
            "brightness": b, "contrast": c, "saturation": sat, "hue": h,
            "order": order, "grayscale": gray}


def _source_coords(start, length, size, out_size, dtype):
    """Pixel coordinates sampled by a bilinear resize of a crop, in grid_sample units.

    Args:
        start, length: (B,) long, crop offset and extent along one axis.
        size: image extent along that axis.
    Returns:
        (B, out_size) coordinates normalised for ``grid_sample(align_corners=False)``.
    """
    start = start.to(dtype)[:, None]
    length = length.to(dtype)[:, None]
    u = torch.arange(out_size, dtype=dtype, device=start.device)
    # Same formula as F.interpolate(align_corners=False): src = scale * (dst + 0.5) - 0.5.
    x = (length / out_size) * (u + 0.5) - 0.5
    # torchvision crops first, so it clamps at the crop's edges, not the image's.
    x = torch.minimum(torch.clamp(x, min=0.0), length - 1) + start
    return (x + 0.5) * (2.0 / size) - 1.0


def _grayscale(img):
    """(B, 3, H, W) -> (B, 1, H, W), torchvision's ITU-R 601-2 luma weights."""
    r, g, b = img.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _adjust_hue(img, shift):
    """torchvision's tensor adjust_hue, per image: RGB -> HSV, h = (h + shift) mod 1, -> RGB.

    Args:
        img: (B, 3, H, W) float in [0, 1].  shift: (B,) in [-0.5, 0.5].
    """
    # RGB -> HSV, as torchvision's _rgb2hsv.
    r, g, b = img.unbind(dim=1)
    maxc = img.amax(dim=1)
    minc = img.amin(dim=1)
    eqc = maxc == minc  # grey pixels: S = 0 and H = 0; avoid 0/0
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc = (maxc - r) / cr_divisor
    gc = (maxc - g) / cr_divisor
    bc = (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    v = maxc

    h = (h + shift.view(-1, 1, 1)) % 1.0

    # HSV -> RGB, as torchvision's _hsv2rgb.  torchvision selects the sector with a
    # one-hot einsum; a where-chain picks the same values exactly and fuses better.
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int32) % 6
    p = torch.clamp(v * (1.0 - s), 0.0, 1.0)
    q = torch.clamp(v * (1.0 - s * f), 0.0, 1.0)
    t = torch.clamp(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)

    def pick(by_sector):  # by_sector[k] is the channel value in hue sector k
        out = by_sector[5]
        for k in range(5):
            out = torch.where(i == k, by_sector[k], out)
        return out

    return torch.stack((pick((v, q, p, p, t, v)),
                        pick((t, v, v, q, p, p)),
                        pick((p, p, t, v, v, q))), dim=1)


def _color_jitter(img, params, apply_hue=True):
    """ColorJitter with a per-image op order, then RandomGrayscale.  img: (B, 3, H, W)."""
    batch = img.shape[0]
    dtype = img.dtype
    # Column j holds the factor of op j; the hue column is a dummy (the blend result
    # is discarded for hue).
    factors = torch.stack((params["brightness"], params["contrast"], params["saturation"],
                           torch.ones_like(params["brightness"])), dim=1).to(dtype)  # (B, 4)
    order = params["order"]
    hue = params["hue"].to(dtype)

    for k in range(4):
        op = order[:, k].view(batch, 1, 1, 1)
        f = factors.gather(1, order[:, k:k + 1]).view(batch, 1, 1, 1)
        # Brightness, contrast and saturation are all torchvision's
        # _blend(img, target, f) = clamp(f * img + (1 - f) * target, 0, 1)
        # with target 0, mean grey level, or the grey image.
        gray = _grayscale(img)  # (B, 1, H, W)
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
        target = torch.where(op == BRIGHTNESS, torch.zeros_like(gray),
                             torch.where(op == CONTRAST, mean.expand_as(gray), gray))
        blended = (f * img + (1.0 - f) * target).clamp(0.0, 1.0)
        # Computing hue for every image and selecting keeps shapes fixed; images
        # whose op is not hue pass through torch.where unchanged, bit for bit.
        hued = _adjust_hue(img, hue) if apply_hue else img
        img = torch.where(op == HUE, hued, blended)

    gray3 = _grayscale(img).expand_as(img)
    return torch.where(params["grayscale"].view(batch, 1, 1, 1), gray3, img)


def apply_params(images, params, out_size, color=True, apply_hue=True):
    """Apply per-image parameters from ``sample_params``.

    Order as in torchvision: crop+resize, colour jitter, grayscale, flip.  The flip is
    folded into the sampling grid; it commutes with the pixel-wise colour ops and
    leaves the contrast op's image mean unchanged.

    Args:
        images: (B, 3, H, W) float in [0, 1].
        params: dict from ``sample_params`` (tensors on the images' device).
        out_size: side of the square output.
        color: False skips jitter and grayscale entirely.
        apply_hue: False skips the hue op (torchvision skips it when hue=0).
    Returns:
        (B, 3, out_size, out_size) float in [0, 1], before normalisation.
    """
    batch, _, height, width = images.shape
    dtype = images.dtype
    # One grid_sample does crop, resize and flip.  Rows and columns are separable,
    # so the grid is the outer combination of per-image x and y coordinates.
    gx = _source_coords(params["left"], params["crop_w"], width, out_size, dtype)  # (B, out)
    gy = _source_coords(params["top"], params["crop_h"], height, out_size, dtype)  # (B, out)
    # Flip: output column u samples where column out-1-u would have.
    gx = torch.where(params["flip"][:, None], gx.flip(1), gx)
    grid = torch.stack((gx[:, None, :].expand(batch, out_size, out_size),
                        gy[:, :, None].expand(batch, out_size, out_size)), dim=-1)
    # Coordinates are already clamped inside the crop; 'border' only matters for the
    # zero-weight neighbour of the last pixel.
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if color:
        out = _color_jitter(out, params, apply_hue=apply_hue)
    return out


class BatchAugment(torch.nn.Module):
    """The Super-AND training augmentation for a whole batch, random per image.

    ``forward(images, uniforms)``:
        images: (B, 3, H, W) uint8, or float in [0, 1].
        uniforms: (B, NUM_UNIFORMS) float in [0, 1); same uniforms -> same output.
        returns: (B, 3, out_size, out_size) float32, normalised with mean/std.
    """

    def __init__(self, out_size, mean, std, scale=CROP_SCALE, ratio=CROP_RATIO,
                 brightness=JITTER, contrast=JITTER, saturation=JITTER, hue=JITTER,
                 grayscale_p=GRAYSCALE_P, flip_p=FLIP_P, flip=True, color=True):
        super().__init__()
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue}")
        self.out_size = int(out_size)
        self.cfg = dict(scale=tuple(scale), ratio=tuple(ratio), brightness=brightness,
                        contrast=contrast, saturation=saturation, hue=hue,
                        grayscale_p=grayscale_p, flip_p=flip_p, flip=flip, color=color)
        self.color = color
        self.apply_hue = hue > 0
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images, uniforms):
        if images.dtype == torch.uint8:
            x = images.to(torch.float32) / 255.0  # as ToTensor
        else:
            x = images.to(torch.float32)
        _, _, height, width = x.shape
        params = sample_params(uniforms, height, width, **self.cfg)
        out = apply_params(x, params, self.out_size, color=self.color, apply_hue=self.apply_hue)
        return (out - self.mean) / self.std

    def extra_repr(self):
        return f"out_size={self.out_size}, " + ", ".join(f"{k}={v}" for k, v in self.cfg.items())
