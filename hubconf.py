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
"""
dependencies = ['torch', 'torchvision']

import models  # noqa: E402
from datasets import image_transform  # noqa: E402
from lib.analysis import load_network  # noqa: E402


def _with_input_settings(module, loaded):
    module.mean, module.std, module.image_size = loaded.mean, loaded.std, loaded.image_size
    module.transform = image_transform(loaded.mean, loaded.std, loaded.image_size)
    return module.eval()


def superand(checkpoint=None, network=None, low_dim=None, sobel=None, stem=None):
    """The Super-AND embedding network in eval mode: normalised images (B x 3 x H x W) ->
    B x low_dim unit-length embeddings.

    checkpoint: a ckpt.t7 / last.t7 of this project or a released file; None gives an
    untrained network of the released shape (ResNet18 with the Sobel branch, 128-d), or of
    `network`, `low_dim`, `sobel`, `stem` where given.
    """
    loaded = load_network(checkpoint, 'cpu', network, low_dim, sobel, stem)
    return _with_input_settings(loaded.net, loaded)


def superand_backbone(checkpoint=None, network=None, low_dim=None, sobel=None, stem=None):
    """The same network without its projection head: normalised images -> the concatenated
    pooled trunk features (1024-d for ResNet18 with the Sobel branch), for fine-tuning."""
    loaded = load_network(checkpoint, 'cpu', network, low_dim, sobel, stem)
    return _with_input_settings(models.Backbone(loaded.net), loaded)
