"""A trained checkpoint loaded for analysis: its network alone (torch.hub, embedding and
retrieval of any folder), or with the data it was trained on (the linear probe, export and
figures), built as the run built it.
"""
from dataclasses import dataclass, replace

import torch

import datasets
import models

from . import checkpoint as ckpt
from .build import build_pipeline, device_settings, image_reading, load_data, normalisation
from .config import RunConfig, defaults
from .core.constants import ALGORITHM
from .core.knn import KnnData, embed, training_features
from .errors import UserError
from .method_state import MethodState, clean_state_dict, refuse_non_finite
from .progress import progress_bar
from .resume import check_data


@dataclass
class LoadedNetwork:
    """A checkpoint's network (eval mode) and the input it was trained on."""
    net: torch.nn.Module
    mean: tuple
    std: tuple
    image_size: int
    config: dict            # the checkpoint's stored options ({} for a released file)


def load_network(path=None, device='cpu', network=None, low_dim=None, sobel=None, stem=None):
    """The network of the checkpoint at `path` (built from its stored options, else from what
    its weights show: released files), without its data; or, with no path, an untrained network
    of the given (else released) shape."""
    config, weights = {}, None
    if path is not None:
        state = ckpt.load(path)
        weights = clean_state_dict(state['net'])
        spec = models.weights_spec(weights)
        stored = {k: v for k, v in (state.get('config') or {}).items() if v is not None}
        config = {'network': spec['name'], 'sobel': spec['sobel'], 'stem': spec['stem'],
                  'low_dim': spec['low_dim'], **stored}
    image_size = config.get('image_size', 32)
    if path is not None:
        refuse_contradicting_shape(path, weights, config, image_size, network=network,
                                   low_dim=low_dim, sobel=sobel, stem=stem)
    stem = stem or config.get('stem') or 'auto'
    net = models.build_network(network or config.get('network') or ALGORITHM['network'],
                               low_dim or config.get('low_dim') or ALGORITHM['low_dim'],
                               sobel=config.get('sobel', True) if sobel is None else sobel,
                               stem=models.default_stem(image_size) if stem == 'auto' else stem)
    if weights is not None:
        try:
            net.load_state_dict(weights)
        except RuntimeError:
            raise UserError(f'checkpoint {path} holds {models.describe_weights(weights)}, which '
                            f'this program cannot build') from None
        refuse_non_finite(weights.values(), path)
    mean, std = datasets.MEAN_STD.get(config.get('dataset'), datasets.MEAN_STD['cifar10'])
    return LoadedNetwork(net.to(device).eval(), tuple(config.get('mean') or mean),
                         tuple(config.get('std') or std), image_size, config)



def refuse_contradicting_shape(path, weights, config, image_size, **asked):
    """A UserError where a shape asked for (network='resnet18', low_dim=64, ...; None and
    'auto' ask nothing) is not what the checkpoint at `path` holds: the file decides, and the
    line names the keyword that contradicts it, not the file."""
    stem = config.get('stem') or 'auto'
    held = {'network': config.get('network'), 'low_dim': config.get('low_dim'),
            'sobel': config.get('sobel', True),
            'stem': models.default_stem(image_size) if stem == 'auto' else stem}
    wrong = {name: value for name, value in asked.items()
             if value not in (None, 'auto') and value != held[name]}
    if wrong:
        raise UserError(f'checkpoint {path} holds {models.describe_weights(weights)}, but '
                        + ', '.join(f'{name}={value!r}' for name, value in wrong.items())
                        + ' was asked for: leave ' + ('it' if len(wrong) == 1 else 'them')
                        + ' out, or give what the checkpoint holds')


@dataclass
class Trained:
    """A checkpoint loaded with the data and network it was trained on, for analysis."""
    config: RunConfig
    state: dict
    method: MethodState
    train: datasets.ImageSet
    test: datasets.ImageSet            # None for a run on unlabeled images
    pipeline: object
    device: torch.device
    mean: tuple = None
    std: tuple = None

    @property
    def net(self):
        return self.method.net

    @property
    def bank(self):
        return self.method.bank

    def embeddings(self, split, source='network', show=False, labelled=False):
        """(N x D float32, N targets) of a split: the network's eval-mode embeddings of the
        test transform (float32), or for the training split also the memory bank
        (`source='bank'`). `labelled`: of the training split only the labelled images (all
        but STL-10's unlabeled split, which follows them). `show`: a progress bar on a
        terminal."""
        if split == 'test' and self.test is None:
            raise UserError('this checkpoint was trained on unlabeled images: there is no test '
                            'split')
        image_set = self.test if split == 'test' else self.train
        count = image_set.num_labelled if labelled and split == 'train' else len(image_set)
        labels = torch.from_numpy(image_set.targets[:count]).to(self.device)
        if source == 'bank':
            if split != 'train' or self.bank is None:
                raise UserError('bank features exist for the training split of a run with a '
                                'memory bank only')
            data = KnnData(self.pipeline, labels, len(self.train.classes), 'bank')
            return training_features(self.net, self.bank, data), labels
        batches = self.pipeline.eval_batches(split, (0, count))
        features, _ = embed(self.net, progress_bar(
            batches, total=-(-count // self.pipeline.eval_batch), desc=f'embed {split}',
            enabled=show, unit='batch'))
        return features, labels

    def knn_training_side(self, source='bank'):
        """(N x D, N labels) the kNN votes with: the bank (`source='bank'`, as released), or
        the network's embeddings of the training images ('network'); runs without a bank
        always use the network's. Only the labelled training images vote."""
        if source == 'bank' and self.bank is not None:
            return self.embeddings('train', 'bank', labelled=True)
        return self.embeddings('train', 'network', labelled=True)


def load_trained(path, say=print, **overrides):
    """Load the checkpoint at `path` with the options it was trained with (its stored config,
    else the released defaults), `overrides` (e.g. data_root, device) applied on top. Its bank
    is checked against the data found (the fingerprint); `say` gets the one note when a file
    has none."""
    state = ckpt.load(path)
    stored = ckpt.stored_options(state, path)
    # (the image cache and the memory budget are this machine's, not the run's)
    config = replace(defaults(**{
        **stored, 'test_only': True, 'compile': 'none', 'pipeline': 'auto', 'cache': True,
        'cache_dir': None, 'data_memory': None, **overrides}),
        typed=frozenset(overrides) & {'data_root'})     # (given: not the checkpoint's)
    settings = device_settings(config)
    reading = image_reading(config)
    train, test = load_data(config, reading=reading)
    note = check_data(state, train.fingerprint, path)
    if note:
        say(note)
    for line in train.notes:
        say(line)
    mean, std = normalisation(config, train, reading.cache)
    method = MethodState.build(config, len(train), settings.device)
    method.load(state, path)
    method.net.eval()
    pipeline = build_pipeline(config, settings, train, test, mean, std)
    return Trained(config, state, method, train, test, pipeline, settings.device, mean, std)


def labels_of(path, data_root=None):
    """Whether the checkpoint at `path` was trained on labelled data (a test split to
    evaluate on), read from its options and the data folder's layout, without reading any
    image: False for a folder of unlabeled images, True otherwise (a released file, CIFAR,
    a labelled tree). Raises UserError for a file that is no checkpoint."""
    stored = ckpt.stored_options(ckpt.load(path), path)
    root = data_root or stored.get('data_root')
    if stored.get('dataset') != 'folder' or not root:
        return True
    try:
        return datasets.folder_layout(root) == 'labelled'
    except datasets.DataError:
        return True                 # (the loading says what is wrong with the folder)


def unlabeled_text(path, data_root=None):
    """Why the checkpoint at `path` has no labels to analyse with (`labels_of` said False), in
    words that blame the right thing: the --data-root given, or the run's own data."""
    stored = ckpt.stored_options(ckpt.load(path), path)
    if data_root is not None:
        return (f'--data-root {datasets.shown(data_root)} holds unlabeled images (no '
                f'train/<class> and test/<class> folders)')
    held = ('; its --eval-root is labelled, but that is test images only' if
            stored.get('eval_root') else '')
    return (f'{path} was trained on unlabeled images ({datasets.shown(stored["data_root"])})'
            + held)


def load_for_analysis(path, data_root=None, subset=None, device='auto', say=print):
    """`load_trained` as the analysis commands (linear probe, export, figures) call it: the
    data root and subset are the checkpoint's unless given; no loader processes."""
    overrides = dict(device=device, workers=0)
    if data_root is not None:
        overrides['data_root'] = data_root
    if subset is not None:
        overrides['subset'] = subset
    return load_trained(path, say=say, **overrides)
