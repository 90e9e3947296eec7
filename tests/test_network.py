"""The two-branch network of docs/ALGORITHM.md section 1."""
import pytest
import torch

import models
from lib.method_state import clean_state_dict

BN = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')


def released_resnet18_keys():
    """The released ResNet18withSobel state-dict keys, spelled out (docs/ALGORITHM.md 1)."""
    keys = ['linear.weight', 'linear.bias', 'sobel.0.weight', 'sobel.0.bias',
            'sobel.1.weight', 'sobel.1.bias']
    for s in ('', '_sobel'):
        keys += [f'conv1{s}.weight'] + [f'bn1{s}.{p}' for p in BN]
        for layer in range(1, 5):
            for block in range(2):
                pre = f'layer{layer}{s}.{block}.'
                keys += [pre + 'conv1.weight', pre + 'conv2.weight']
                keys += [pre + f'bn{i}.{p}' for i in (1, 2) for p in BN]
                if layer > 1 and block == 0:            # stride 2: projection shortcut
                    keys += [pre + 'shortcut.0.weight'] + [pre + f'shortcut.1.{p}' for p in BN]
    return set(keys)


@pytest.mark.parametrize('name', ['resnet18', 'resnet101'])
def test_output_shape_and_unit_norm(name):
    torch.manual_seed(0)
    net = models.build_network(name, low_dim=128).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 128)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)


def test_head_width_resnet101():
    net = models.build_network('resnet101')
    assert net.linear.in_features == 2 * 2048          # both trunks, Bottleneck expansion 4


def test_released_key_layout():
    assert set(models.build_network('resnet18').state_dict()) == released_resnet18_keys()


def test_sobel_filters_fixed_and_frozen():
    net = models.build_network('resnet18')
    gray, sobel = net.sobel[0], net.sobel[1]
    assert torch.all(gray.weight == 1 / 3) and torch.all(gray.bias == 0)
    assert sobel.weight[0, 0].tolist() == [[1, 0, -1], [2, 0, -2], [1, 0, -1]]
    assert sobel.weight[1, 0].tolist() == [[1, 2, 1], [0, 0, 0], [-1, -2, -1]]
    assert all(not p.requires_grad for p in net.sobel.parameters())
    before = {k: v.clone() for k, v in net.sobel.state_dict().items()}
    conv_before = net.conv1_sobel.weight.clone()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    net(torch.randn(4, 3, 32, 32)).sum().backward()
    optimizer.step()
    for k, v in net.sobel.state_dict().items():
        assert torch.equal(v, before[k])
    assert not torch.equal(net.conv1_sobel.weight, conv_before)   # the Sobel trunk learns


@pytest.mark.parametrize('prefix', ['', 'module.'])
def test_released_state_dict_loads(prefix):
    torch.manual_seed(1)
    source = models.build_network('resnet18').eval()
    released = {prefix + k: v for k, v in source.state_dict().items()}
    torch.manual_seed(2)
    target = models.build_network('resnet18').eval()
    target.load_state_dict(clean_state_dict(released))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(source(x), target(x))


def test_the_released_loader_reads_our_checkpoint(tmp_path):
    """The released code wraps its network in DataParallel and loads `net` and `npc` strictly:
    our ckpt.t7 must fit both as they are."""
    import main
    from conftest import fast_args, write_image_folder
    root = write_image_folder(tmp_path / 'data', classes=2, train_per_class=4)
    assert main.main(fast_args(root, tmp_path / 'ck', '--dataset', 'folder', '--rounds', '1',
                               '--epochs', '1', '--batch_size', '4', '--quiet',
                               '--no-tensorboard')) == 0
    state = torch.load(tmp_path / 'ck' / 'ckpt.t7', weights_only=True)
    released_net = torch.nn.DataParallel(models.build_network('resnet18'))
    released_net.load_state_dict(state['net'])              # strict, as released

    class ReleasedNPC(torch.nn.Module):                     # the released bank's two buffers
        def __init__(self):
            super().__init__()
            self.register_buffer('params', torch.tensor([0.1, 0.5]))
            self.register_buffer('memory', torch.zeros(8, 128))
    ReleasedNPC().load_state_dict(state['npc'])
