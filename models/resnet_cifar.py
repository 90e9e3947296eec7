"""CIFAR-style ResNets with the Super-AND Sobel branch (docs/ALGORITHM.md section 1).

The module and parameter names follow the released code exactly (`conv1`, `bn1`,
`layer1..4`, `conv1_sobel`, ..., `linear`, `sobel.0`, `sobel.1`, blocks with
`shortcut.0/1`), so released checkpoints load with `load_state_dict`.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def shortcut(in_planes, out_planes, stride):
    """Identity, or a strided 1x1 conv + BN where the block changes shape (`shortcut.0/1`)."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False),
                         nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


def sobel_filter():
    """Frozen grayscale (1x1, weights 1/3) + Sobel (3x3, Gx and Gy) convolutions.

    Applied to the *normalised* input, as released. Kept as parameters with
    requires_grad=False (not buffers) so the state-dict keys are `sobel.0.weight`, ...
    """
    grayscale = nn.Conv2d(3, 1, kernel_size=1)
    sobel = nn.Conv2d(1, 2, kernel_size=3, padding=1)
    with torch.no_grad():
        grayscale.weight.fill_(1.0 / 3.0)
        grayscale.bias.zero_()
        sobel.weight[0, 0] = torch.tensor([[1., 0., -1.], [2., 0., -2.], [1., 0., -1.]])
        sobel.weight[1, 0] = torch.tensor([[1., 2., 1.], [0., 0., 0.], [-1., -2., -1.]])
        sobel.bias.zero_()
    layers = nn.Sequential(grayscale, sobel)
    for p in layers.parameters():
        p.requires_grad = False
    return layers


class ResNetwithSobel(nn.Module):
    """Two ResNet trunks (RGB and Sobel edges), concatenated, linear to `low_dim`, L2-normalised.

    stem 'cifar': 3x3 stride-1 first conv, no max-pool (the released network);
    stem 'imagenet': 7x7 stride-2 conv + 3x3 stride-2 max-pool, for larger images.
    `sobel=False` drops the Sobel trunk (an ablation; the head then takes one trunk).
    """

    def __init__(self, block, num_blocks, low_dim=128, sobel=True, stem='cifar'):
        super().__init__()
        if stem not in ('cifar', 'imagenet'):
            raise ValueError(f'unknown stem {stem!r}')
        self.stem = stem
        self.conv1, self.bn1, trunk = self._trunk(block, num_blocks, in_channels=3)
        self.layer1, self.layer2, self.layer3, self.layer4 = trunk
        self.has_sobel = sobel
        if sobel:
            self.conv1_sobel, self.bn1_sobel, trunk = self._trunk(block, num_blocks, in_channels=2)
            self.layer1_sobel, self.layer2_sobel, self.layer3_sobel, self.layer4_sobel = trunk
            self.sobel = sobel_filter()
        branches = 2 if sobel else 1
        self.linear = nn.Linear(512 * block.expansion * branches, low_dim)

    def _trunk(self, block, num_blocks, in_channels):
        if self.stem == 'cifar':
            conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        else:
            conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        in_planes, layers = 64, []
        for planes, n, stride in zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2)):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(block(in_planes, planes, s))
                in_planes = planes * block.expansion
            layers.append(nn.Sequential(*blocks))
        return conv1, nn.BatchNorm2d(64), layers

    def _run_trunk(self, x, suffix):
        m = lambda name: getattr(self, name + suffix)  # noqa: E731
        out = F.relu(m('bn1')(m('conv1')(x)))
        if self.stem == 'imagenet':
            out = F.max_pool2d(out, 3, 2, 1)
        for i in range(1, 5):
            out = m(f'layer{i}')(out)
        # 4x4 average pool on 32 px CIFAR input, as released; adaptive for other sizes.
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def backbone(self, x):
        """The pooled trunk outputs, both branches concatenated: the head's input."""
        out = self._run_trunk(x, '')
        if self.has_sobel:
            out = torch.cat((out, self._run_trunk(self.sobel(x), '_sobel')), dim=1)
        return out

    def forward(self, x):
        # float32 before normalising: under bf16 autocast the head output is bf16.
        return F.normalize(self.linear(self.backbone(x)).float(), dim=1)


def ResNet18withSobel(low_dim=128, sobel=True, stem='cifar'):
    return ResNetwithSobel(BasicBlock, [2, 2, 2, 2], low_dim, sobel, stem)


def ResNet50withSobel(low_dim=128, sobel=True, stem='cifar'):
    return ResNetwithSobel(Bottleneck, [3, 4, 6, 3], low_dim, sobel, stem)


def ResNet101withSobel(low_dim=128, sobel=True, stem='cifar'):
    return ResNetwithSobel(Bottleneck, [3, 4, 23, 3], low_dim, sobel, stem)
