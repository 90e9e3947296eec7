"""The networks by name, and the trunk without its head (torch; `models` imports this module
on first use)."""
import torch

from . import NETWORK_NAMES
from .alexnet_cifar import AlexNetwithSobel
from .resnet_cifar import ResNet18withSobel, ResNet50withSobel, ResNet101withSobel

# In the order of NETWORK_NAMES, which the command lines read without importing torch.
NETWORKS = dict(zip(NETWORK_NAMES, (ResNet18withSobel, ResNet50withSobel, ResNet101withSobel,
                                    AlexNetwithSobel)))


class Backbone(torch.nn.Module):
    """A network without its head: images -> the concatenated trunk features (the input of its
    last linear layer; 1024-d for ResNet18 with the Sobel branch), for fine-tuning."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.backbone(x)
