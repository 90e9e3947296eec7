"""hubconf.py: torch.hub.load gives the trained embedding network, its backbone, or an untrained
network, in eval mode."""
import pytest
import torch

from conftest import ROOT, fast_args
from lib.analysis import load_trained


@pytest.fixture(scope='module')
def trained_checkpoint(tiny_folder, tmp_path_factory):
    import main
    model_dir = tmp_path_factory.mktemp('hub')
    assert main.main(fast_args(tiny_folder, model_dir, '--rounds', '1', '--epochs', '1',
                               '--quiet', '--no-tensorboard')) == 0
    return str(model_dir / 'ckpt.t7')


def test_hub_model_embeds_as_the_trained_network(trained_checkpoint, tiny_folder):
    model = torch.hub.load(ROOT, 'superand', source='local', checkpoint=trained_checkpoint)
    assert isinstance(model, torch.nn.Module) and not model.training
    trained = load_trained(trained_checkpoint, data_root=tiny_folder, workers=0)
    images = next(trained.pipeline.eval_batches('test'))[0][:4]
    with torch.no_grad():
        out = model(images)
        want = trained.net(images)
    assert out.shape == (4, 128)
    assert torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(out, want, atol=1e-6)
    assert model.mean == pytest.approx(trained.mean) and model.image_size == 32


def test_a_runs_folder_means_its_best_checkpoint(trained_checkpoint):
    import os
    by_folder = torch.hub.load(ROOT, 'superand', source='local',
                               checkpoint=os.path.dirname(trained_checkpoint))
    by_file = torch.hub.load(ROOT, 'superand', source='local', checkpoint=trained_checkpoint)
    assert torch.equal(by_folder.linear.weight, by_file.linear.weight)


def test_hub_backbone_and_untrained_model(trained_checkpoint):
    backbone = torch.hub.load(ROOT, 'superand_backbone', source='local',
                              checkpoint=trained_checkpoint)
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 1024) and not backbone.training
    untrained = torch.hub.load(ROOT, 'superand', source='local')
    trained = torch.hub.load(ROOT, 'superand', source='local', checkpoint=trained_checkpoint)
    assert not torch.equal(untrained.linear.weight, trained.linear.weight)
    small = torch.hub.load(ROOT, 'superand', source='local', network='alexnet', low_dim=64,
                           sobel=False)
    with torch.no_grad():
        assert small(torch.randn(2, 3, 32, 32)).shape == (2, 64)


def test_hub_leaves_the_callers_modules_of_the_same_names(trained_checkpoint, tmp_path,
                                                           monkeypatch):
    """A caller with modules of its own called models, datasets (HuggingFace's name) and lib:
    the hub loads this project's all the same, the caller's stay as they were, and the model
    and its transform work once the load is over."""
    import sys
    import types
    from PIL import Image
    theirs = {name: types.ModuleType(name) for name in ('models', 'datasets', 'lib',
                                                        'lib.analysis')}
    for name, module in theirs.items():
        monkeypatch.setitem(sys.modules, name, module)
    before = {name: module for name, module in sys.modules.items()
              if name.split('.')[0] in ('models', 'datasets', 'lib')}
    model = torch.hub.load(ROOT, 'superand', source='local', checkpoint=trained_checkpoint)
    after = {name: module for name, module in sys.modules.items()
             if name.split('.')[0] in ('models', 'datasets', 'lib')}
    assert after == before and all(sys.modules[name] is theirs[name] for name in theirs)
    Image.new('RGB', (40, 30), (200, 10, 10)).save(tmp_path / 'a.png')
    with torch.no_grad():
        out = model(model.transform(str(tmp_path / 'a.png'))[None])
    assert out.shape == (1, 128)
    backbone = torch.hub.load(ROOT, 'superand_backbone', source='local')
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 1024)


@pytest.mark.parametrize('asked, said', [
    ({'network': 'alexnet'}, "network='alexnet' was asked for: leave it out"),
    ({'low_dim': 64, 'stem': 'imagenet'},
     "low_dim=64, stem='imagenet' was asked for: leave them out"),
    ({'sobel': False}, 'sobel=False was asked for: leave it out')])
def test_a_keyword_that_contradicts_the_checkpoint_is_named(trained_checkpoint, asked, said):
    """The checkpoint (ResNet18 with the Sobel branch, cifar stem, 128-d) decides its shape; a
    keyword that says otherwise is named, where the file used to be called unbuildable. The
    ones it holds are taken."""
    with pytest.raises(Exception) as raised:     # (hub's own copy of lib.errors.UserError)
        torch.hub.load(ROOT, 'superand', source='local', checkpoint=trained_checkpoint, **asked)
    assert type(raised.value).__name__ == 'UserError'
    assert str(raised.value) == (f'checkpoint {trained_checkpoint} holds resnet18 with the Sobel '
                                 f'branch, cifar stem, 128-d embedding, but {said}, or give what '
                                 f'the checkpoint holds')
    same = torch.hub.load(ROOT, 'superand', source='local', checkpoint=trained_checkpoint,
                          network='resnet18', low_dim=128, sobel=True, stem='cifar')
    assert same.linear.out_features == 128
