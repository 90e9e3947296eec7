"""torchvision transforms of the released code (docs/ALGORITHM.md section 2), and the
datasets that apply them for the `--pipeline cpu` loader path."""
import numpy as np
import torch
from PIL import Image

from . import import_torchvision
from .images import open_image, to_rgb

T = import_torchvision().transforms

# The released augmentation's constants; datasets/augment.py's batched version uses the same.
CROP_SCALE = (0.2, 1.0)         # RandomResizedCrop area fraction
CROP_RATIO = (3 / 4, 4 / 3)     # RandomResizedCrop aspect ratio (log-uniform)
JITTER = 0.4                    # ColorJitter brightness = contrast = saturation = hue strength
GRAYSCALE_P = 0.2               # RandomGrayscale probability
FLIP_P = 0.5                    # RandomHorizontalFlip probability
# Per-channel normalisation (mean, std). CIFAR: as released. Their std is the mean over images
# of each image's per-channel standard deviation (on our CIFAR-10 copy that gives 0.2005,
# 0.1984, 0.2002; the all-pixel std would be 0.245, 0.243, 0.260). SVHN: AND's released
# constants, of the same convention.
MEAN_STD = {
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    'cifar100': ((0.5071, 0.4866, 0.4409), (0.2009, 0.1984, 0.2023)),
    'svhn': ((0.4377, 0.4438, 0.4728), (0.1201, 0.1231, 0.1052)),
}


def train_transform(mean, std, size=32, flip=True, color=True):
    """RandomResizedCrop, ColorJitter(0.4 x4), RandomGrayscale(0.2), flip, ToTensor, Normalize."""
    steps = [T.RandomResizedCrop(size, scale=CROP_SCALE, ratio=CROP_RATIO)]
    if color:
        steps += [T.ColorJitter(JITTER, JITTER, JITTER, JITTER), T.RandomGrayscale(GRAYSCALE_P)]
    if flip:
        steps.append(T.RandomHorizontalFlip(FLIP_P))
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


def test_transform(mean, std, size=32):
    return T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])


class ReadRGB:
    """A transform step: an image file's path or a PIL image (as `Image.open` gives it, any
    mode) -> the RGB square that runs evaluate, read by datasets.images (upright, 8 bits,
    first frame), resized (shorter side) and centre-cropped to `size`. A large JPEG given by
    its path is decoded at a reduced scale still at least `size`, as runs decode their images
    (PIL's draft mode); a PIL image given is never changed, so it is decoded at full size."""

    def __init__(self, size):
        self.size = size

    def __call__(self, image):
        return to_rgb(open_image(image), self.size, draft=not isinstance(image, Image.Image))

    def __repr__(self):
        return f'{type(self).__name__}(size={self.size})'


def image_transform(mean, std, size=32):
    """For image files and images opened by PIL: what a run does to its test images
    (ReadRGB, ToTensor, Normalize) -> 3 x size x size float32."""
    return T.Compose([ReadRGB(size), T.ToTensor(), T.Normalize(mean, std)])


def sample_seed(epoch_seed, index):
    """A 63-bit seed of one image's augmentation in one epoch, a pure function of the two."""
    state = np.random.SeedSequence([epoch_seed, index]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


class AugmentedViews(torch.utils.data.Dataset):
    """Training images as `views` independently augmented tensors, the label and the index.

    Each image's views are drawn from a generator seeded by (epoch seed, index) alone
    (`set_epoch`), so the result does not depend on which loader process makes it or on where
    in the epoch a resumed run starts."""

    def __init__(self, image_set, transform, views=2):
        self.images, self.targets = image_set.images, image_set.targets
        self.transform, self.views = transform, views
        self.epoch_seed = 0

    def set_epoch(self, epoch_seed):
        self.epoch_seed = epoch_seed

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        img = Image.fromarray(self.images[index])
        # torchvision's transforms draw from the global generator: seed it for this image only,
        # and give the caller's state back afterwards.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.epoch_seed, index))
            views = [self.transform(img) for _ in range(self.views)]
        return (*views, int(self.targets[index]), index)


class Plain(torch.utils.data.Dataset):
    """Images through a deterministic transform, with label and index (test / feature pass)."""

    def __init__(self, image_set, transform):
        self.images, self.targets, self.transform = image_set.images, image_set.targets, transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.transform(Image.fromarray(self.images[index])), int(self.targets[index]), index
