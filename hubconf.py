"""torch.hub entry points: the Super-AND embedding network, trained or untrained.

    import torch
    model = torch.hub.load(REPO_DIR, 'superand', source='local', checkpoint='checkpoint/ckpt.t7')
    with torch.no_grad():
        embeddings = model(images)      # B x 3 x H x W, normalised -> B x 128, unit length

`model.mean`, `model.std` and `model.image_size` are the normalisation and size the checkpoint
was trained with, and `model.transform` the matching test transform for an image file's path
or a PIL image of any mode: read upright (EXIF orientation), 16-bit images scaled to 8 bits,
resized and centre-cropped as runs read their test images.
`superand_backbone` gives the trunk without the projection head, for fine-tuning.

This project's packages have common names (`lib`, `models`, `datasets`: a user's own, or
HuggingFace's `datasets`). The entry points import them only while they run, and leave the
caller's modules of those names as they were. So keep the checkpoint file and load it again
with `checkpoint=`: pickling the whole module (`torch.save(model)`) would need those packages
importable by name, and a `state_dict()` holds the weights only: loaded into an untrained
model, it would keep that model's size, normalisation and transform (32 px, CIFAR-10's).
`checkpoint` may also be a run's folder, meaning its ckpt.t7 (as the tools' --ckpt).
"""
import contextlib
import os
import sys

dependencies = ['torch', 'torchvision']

PACKAGES = ('lib', 'models', 'datasets')        # this project's, as the entry points use them
HERE = os.path.dirname(os.path.abspath(__file__))
_KEPT = {}                  # this project's modules between calls, out of sys.modules


def _ours(name):
    return name.split('.')[0] in PACKAGES


@contextlib.contextmanager
def _this_project():
    """This project's packages under their names while the body runs; the caller's modules
    of those names are put back afterwards (ours are kept aside for the next call). What the
    entry points return imports nothing when used (no import runs after this context)."""
    theirs = {name: module for name, module in sys.modules.items() if _ours(name)}
    for name in theirs:
        del sys.modules[name]
    sys.modules.update(_KEPT)
    sys.path.insert(0, HERE)
    try:
        yield
    finally:
        sys.path.remove(HERE)
        _KEPT.clear()
        _KEPT.update({name: module for name, module in sys.modules.items() if _ours(name)})
        for name in _KEPT:
            del sys.modules[name]
        sys.modules.update(theirs)


def _load(checkpoint, network, low_dim, sobel, stem, backbone):
    with _this_project():
        import models
        from datasets import image_transform
        from lib.analysis import load_network
        from lib.cli import checkpoint_file         # (a run's folder: its ckpt.t7)
        loaded = load_network(checkpoint and checkpoint_file(checkpoint), 'cpu', network,
                              low_dim, sobel, stem)
        module = models.Backbone(loaded.net) if backbone else loaded.net
        module.mean, module.std = loaded.mean, loaded.std
        module.image_size = loaded.image_size
        module.transform = image_transform(loaded.mean, loaded.std, loaded.image_size)
        return module.eval()


def superand(checkpoint=None, network=None, low_dim=None, sobel=None, stem=None):
    """The Super-AND embedding network in eval mode: normalised images (B x 3 x H x W) ->
    B x low_dim unit-length embeddings.

    checkpoint: a ckpt.t7 / last.t7 of this project, a run's folder (its ckpt.t7) or a
    released file, whose shape is taken: `network`, `low_dim`, `sobel`, `stem` given with it
    must agree (a UserError names the one that does not). None gives an untrained network of
    the released shape (ResNet18 with the Sobel branch, 128-d), or of those keywords.
    """
    return _load(checkpoint, network, low_dim, sobel, stem, backbone=False)


def superand_backbone(checkpoint=None, network=None, low_dim=None, sobel=None, stem=None):
    """The same network without its projection head: normalised images -> the concatenated
    pooled trunk features (1024-d for ResNet18 with the Sobel branch), for fine-tuning."""
    return _load(checkpoint, network, low_dim, sobel, stem, backbone=True)
