"""Networks. They know nothing of training: `build_network` is all `lib/` needs.

The network classes (torch) are imported on first use, so that their names can be read without
torch: the command lines parse their flags before importing it (seconds).
"""
import importlib

__all__ = ['NETWORK_NAMES', 'NETWORKS', 'Backbone', 'build_network', 'default_stem',
           'describe_weights', 'weights_spec', 'AlexNetwithSobel', 'ResNetwithSobel',
           'ResNet18withSobel', 'ResNet50withSobel', 'ResNet101withSobel']

NETWORK_NAMES = ('resnet18', 'resnet50', 'resnet101', 'alexnet')
LARGEST_CIFAR_STEM_SIZE = 64   # above this image size the ImageNet stem (strided conv + pool)


def default_stem(image_size):
    return 'cifar' if image_size <= LARGEST_CIFAR_STEM_SIZE else 'imagenet'


def build_network(name, low_dim=128, sobel=True, stem='cifar'):
    """The embedding network `name` (see NETWORKS) with a `low_dim` L2-normalised output,
    with or without the Sobel branch, with the CIFAR or the ImageNet stem."""
    from .networks import NETWORKS
    return NETWORKS[name](low_dim=low_dim, sobel=sobel, stem=stem)


# The torch parts, imported when first asked for (`models.NETWORKS`, `models.Backbone`, ...).
LAZY = {'NETWORKS': 'networks', 'Backbone': 'networks', 'AlexNetwithSobel': 'alexnet_cifar',
        **{name: 'resnet_cifar' for name in ('ResNetwithSobel', 'ResNet18withSobel',
                                             'ResNet50withSobel', 'ResNet101withSobel')}}


def __getattr__(name):
    if name in LAZY:
        return getattr(importlib.import_module(f'.{LAZY[name]}', __name__), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def weights_spec(state_dict):
    """The build_network arguments a state dict (prefixes such as `module.` removed) was made
    with, read from its keys and shapes: dict(name, sobel, stem, low_dim); name is None for an
    unknown layout. Released files name their network this way."""
    def blocks(layer):
        return len({k.split('.')[1] for k in state_dict if k.startswith(f'{layer}.')})
    if 'features.0.weight' in state_dict:
        name, first = 'alexnet', state_dict['features.0.weight']
    elif 'conv1.weight' in state_dict:
        bottleneck = 'layer1.0.conv3.weight' in state_dict
        counts = tuple(blocks(f'layer{i}') for i in range(1, 5))
        known = {(False, (2, 2, 2, 2)): 'resnet18', (True, (3, 4, 6, 3)): 'resnet50',
                 (True, (3, 4, 23, 3)): 'resnet101'}
        name, first = known.get((bottleneck, counts)), state_dict['conv1.weight']
    else:
        return dict(name=None, sobel=None, stem=None, low_dim=None)
    linear = state_dict.get('linear.weight')
    return dict(name=name, sobel=any(k.startswith('sobel.') for k in state_dict),
                stem='cifar' if first.shape[-1] in (3, 5) else 'imagenet',
                low_dim=int(linear.shape[0]) if linear is not None else None)


def describe_weights(state_dict):
    """Which network a state dict holds, in words, e.g. 'resnet18 with the Sobel branch,
    cifar stem, 128-d embedding'."""
    spec = weights_spec(state_dict)
    if spec['stem'] is None:
        return 'an unknown network (no conv1 or features layer)'
    name = spec['name'] or 'an unknown ResNet'
    width = f', {spec["low_dim"]}-d embedding' if spec['low_dim'] else ''
    return (f'{name} {"with" if spec["sobel"] else "without"} the Sobel branch, '
            f'{spec["stem"]} stem{width}')
