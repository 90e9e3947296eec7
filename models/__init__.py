"""Networks. They know nothing of training: `build_network` is all `lib/` needs."""
from .alexnet_cifar import AlexNetwithSobel
from .resnet_cifar import (ResNetwithSobel, ResNet18withSobel, ResNet50withSobel,
                           ResNet101withSobel)

__all__ = ['NETWORKS', 'build_network', 'default_stem', 'AlexNetwithSobel',
           'ResNetwithSobel', 'ResNet18withSobel',
           'ResNet50withSobel', 'ResNet101withSobel']

NETWORKS = {
    'resnet18': ResNet18withSobel,
    'resnet50': ResNet50withSobel,
    'resnet101': ResNet101withSobel,
    'alexnet': AlexNetwithSobel,
}

LARGEST_CIFAR_STEM_SIZE = 64   # above this image size the ImageNet stem (strided conv + pool)


def default_stem(image_size):
    return 'cifar' if image_size <= LARGEST_CIFAR_STEM_SIZE else 'imagenet'


def build_network(name, low_dim=128, sobel=True, stem='cifar'):
    """The embedding network `name` (see NETWORKS) with a `low_dim` L2-normalised output,
    with or without the Sobel branch, with the CIFAR or the ImageNet stem."""
    return NETWORKS[name](low_dim=low_dim, sobel=sobel, stem=stem)
