"""A CIFAR-sized AlexNet with batch norm, optionally with the Super-AND Sobel branch.

Five conv layers and one hidden fully connected layer per branch (the paper's AlexNet rows):

    conv 5x5, 96  -> BN -> ReLU -> max-pool 3x3/2      32 -> 16 px
    conv 5x5, 192 -> BN -> ReLU -> max-pool 3x3/2      16 -> 8
    conv 3x3, 384 -> BN -> ReLU
    conv 3x3, 384 -> BN -> ReLU
    conv 3x3, 256 -> BN -> ReLU -> max-pool 3x3/2       8 -> 4
    average-pool to 4x4 -> fc 4096 -> 1024 -> BN -> ReLU

The 'imagenet' stem makes the first conv 11x11 with stride 4 (AlexNet's own), for large
images. The head concatenates the branches and maps linearly to `low_dim`, L2-normalised.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .resnet_cifar import sobel_filter

HIDDEN = 1024


def conv_bn(in_channels, out_channels, kernel, stride=1, pool=False):
    layers = [nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2,
                        bias=False),
              nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(3, 2, 1))
    return layers


def alexnet_trunk(in_channels, stem):
    first = conv_bn(in_channels, 96, 11, stride=4, pool=True) if stem == 'imagenet' \
        else conv_bn(in_channels, 96, 5, pool=True)
    features = nn.Sequential(*first, *conv_bn(96, 192, 5, pool=True), *conv_bn(192, 384, 3),
                             *conv_bn(384, 384, 3), *conv_bn(384, 256, 3, pool=True),
                             nn.AdaptiveAvgPool2d(4), nn.Flatten())
    fc = nn.Sequential(nn.Linear(256 * 16, HIDDEN, bias=False), nn.BatchNorm1d(HIDDEN),
                       nn.ReLU(inplace=True))
    return features, fc


class AlexNetwithSobel(nn.Module):
    def __init__(self, low_dim=128, sobel=True, stem='cifar'):
        super().__init__()
        self.features, self.fc = alexnet_trunk(3, stem)
        self.has_sobel = sobel
        if sobel:
            self.features_sobel, self.fc_sobel = alexnet_trunk(2, stem)
            self.sobel = sobel_filter()
        self.linear = nn.Linear(HIDDEN * (2 if sobel else 1), low_dim)

    def backbone(self, x):
        """The hidden fc outputs, both branches concatenated: the head's input."""
        out = self.fc(self.features(x))
        if self.has_sobel:
            out = torch.cat((out, self.fc_sobel(self.features_sobel(self.sobel(x)))), dim=1)
        return out

    def forward(self, x):
        return F.normalize(self.linear(self.backbone(x)).float(), dim=1)
