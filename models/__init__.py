"""Networks. They know nothing of training: `build_network` is all `lib/` needs."""
from .resnet_cifar import (ResNetwithSobel, ResNet18withSobel, ResNet50withSobel,
                           ResNet101withSobel)

__all__ = ['NETWORKS', 'build_network', 'ResNetwithSobel', 'ResNet18withSobel',
           'ResNet50withSobel', 'ResNet101withSobel']

NETWORKS = {
    'resnet18': ResNet18withSobel,
    'resnet50': ResNet50withSobel,
    'resnet101': ResNet101withSobel,
}


def build_network(name, low_dim=128, sobel=True, stem='cifar'):
    """The embedding network `name` (see NETWORKS) with a `low_dim` L2-normalised output."""
    return NETWORKS[name](low_dim=low_dim, sobel=sobel, stem=stem)
