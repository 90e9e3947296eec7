"""The run's configuration: every option of main.py declared once, parsed, resolved once and
then frozen.

Each option is declared in OPTIONS with both spellings of its flag (argparse's own option
strings: `--batch_size` and `--batch-size`), its default, its help, and whether a resumed run
takes it from its checkpoint (`resumed`: what the run is) or not (where it runs, how fast,
what to do now). Resolution (`resolve`) is done once per run:

1. the flags as typed (argparse knows which: every default is SUPPRESS, so the parsed
   namespace holds exactly the typed ones);
2. on --resume, the checkpoint's options for every resumed option not typed (so a resumed run
   keeps its own components, schedule and data);
3. the method's recipe for the components still unset (lib/core/recipes.py);
4. the defaults for the rest.

The result is a frozen RunConfig; nothing changes it afterwards. Importing this module does
not import torch, so flags are answered at once.
"""
import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass, field, make_dataclass

import datasets
import models

from . import cli
from .core.constants import ALGORITHM
from .core.recipes import COMPONENTS, RECIPES, RecipeError, components_of
from .core.schedules import SCHEDULES
from .errors import UserError

A = ALGORITHM


@dataclass(frozen=True)
class Option:
    """One option of main.py: `name` (its attribute), its flags, default and help, what argparse
    needs besides (`kind`: type, choices, action, nargs, metavar), and whether a resumed run
    takes it from its checkpoint."""
    name: str
    flags: tuple
    default: object
    help: str
    resumed: bool = True
    kind: dict = field(default_factory=dict)


def option(flag, default, help, resumed=True, extra=(), **kind):
    """An Option of the flag `flag` in both spellings (`--batch_size`, `--batch-size`), plus any
    `extra` flags."""
    return Option(flag[2:].replace('-', '_'), cli.spellings(flag, *extra), default, help,
                  resumed, kind)


ON_OFF = dict(action=cli.OnOff)
T_FLOAT = dict(type=cli.POSITIVE_FLOAT, metavar='T')

OPTIONS = (
    # ------------------------------------------------------------------ what is trained
    option('--dataset', A['dataset'], 'training and evaluation data; folder = a '
           'train/<class>/*, test/<class>/* tree, or any folder of unlabeled images, under '
           '--data-root', choices=datasets.DATASETS),
    option('--network', A['network'], 'backbone of both branches',
           choices=sorted(models.NETWORK_NAMES)),
    option('--method', 'super-and', 'recipe of components (lib/core/recipes.py); the component '
           'flags below override it', choices=sorted(RECIPES)),
    option('--sobel', None, COMPONENTS['sobel'], **ON_OFF),
    option('--views', None, COMPONENTS['views'], type=int, choices=(1, 2)),
    option('--bank', None, COMPONENTS['bank'], **ON_OFF),
    option('--aug-loss', None, COMPONENTS['aug_loss'], **ON_OFF),
    option('--aug-input', None, COMPONENTS['aug_input'], choices=('logits', 'features')),
    option('--ue-loss', None, COMPONENTS['ue_loss'], **ON_OFF),
    option('--flip', None, COMPONENTS['flip'], **ON_OFF),
    option('--nesterov', None, COMPONENTS['nesterov'], **ON_OFF),
    option('--rounds', None, f'rounds, the first without anchors (default: the method\'s; '
           f'{A["rounds"]} for super-and)', type=cli.POSITIVE_INT),
    option('--image-size', None, 'side of the training crops and test images (default: the '
           'dataset\'s, 32 px; 96 for stl10); another size only for --dataset folder, whose '
           'larger images are resized and centre-cropped for test',
           type=cli.POSITIVE_INT, metavar='PX'),
    option('--stem', 'auto', 'first layers: cifar (3x3 stride 1) or imagenet (7x7 stride 2 + '
           'max-pool); auto = imagenet above 64 px', choices=('auto', 'cifar', 'imagenet')),
    option('--mean', None, 'normalisation mean (default: the dataset\'s, computed for folder)',
           type=cli.FINITE_FLOAT, nargs=3, metavar=('R', 'G', 'B')),
    option('--std', None, 'normalisation std (default: the dataset\'s, computed for folder)',
           type=cli.POSITIVE_FLOAT, nargs=3, metavar=('R', 'G', 'B')),
    # ------------------------------------------------------------------ the algorithm's numbers
    option('--low_dim', A['low_dim'], 'embedding size D', type=cli.POSITIVE_INT, metavar='D'),
    option('--npc_t', A['npc_t'], 'temperature of the memory-bank softmax', **T_FLOAT),
    option('--npc_m', A['npc_m'], 'momentum of the memory-bank update', metavar='M',
           type=cli.checked(float, lambda v: 0 <= v < 1, 'a number in [0, 1)')),
    option('--ANs_select_rate', A['ANs_select_rate'], 'share of the data added as anchors each '
           'round', metavar='RATE',
           type=cli.checked(float, lambda v: 0 < v <= 1, 'a number in (0, 1]')),
    option('--ANs_size', A['ANs_size'], 'neighbours per anchor, the anchor excluded',
           type=cli.POSITIVE_INT, metavar='K'),
    option('--lr', A['lr'], 'learning rate at the start of each round', type=cli.POSITIVE_FLOAT),
    option('--momentum', A['momentum'], 'SGD momentum (Nesterov\'s where the recipe has '
           'nesterov)', metavar='M',
           type=cli.checked(float, lambda v: 0 <= v < 1, 'a number in [0, 1)')),
    option('--weight_decay', A['weight_decay'], 'SGD weight decay', extra=('--wd',),
           type=cli.NON_NEGATIVE_FLOAT, metavar='WD'),
    option('--epochs', A['epochs'], 'epochs per round', type=cli.POSITIVE_INT, metavar='E'),
    option('--schedule', 'scaled', 'lr steps (x0.1) and UE-weight steps (+0.2) inside each '
           'round: scaled puts them at 0.6/0.8 and 0.4/0.8 of --epochs (at 200 epochs exactly '
           'the released 120/160 and 80/160); released keeps those absolute epochs whatever the '
           'round length', choices=SCHEDULES),
    option('--batch_t', A['batch_t'], 'temperature of the augmentation-invariance loss',
           **T_FLOAT),
    option('--batch_m', A['batch_m'], 'weight of that loss\'s negative terms',
           type=cli.NON_NEGATIVE_FLOAT, metavar='M'),
    option('--batch_size', A['batch_size'], 'images per step, two views each', metavar='B',
           type=cli.checked(int, lambda v: v >= 2, 'an integer >= 2')),
    option('--seed', A['seed'], 'random seed of initialisation, data order and augmentation',
           type=cli.checked(int, lambda v: 0 <= v < 2 ** 64,      # (what torch takes)
                            'an integer from 0 to 2**64 - 1')),
    # ------------------------------------------------------------------ data and evaluation
    option('--data-root', './data', 'torchvision\'s files, an image-folder tree '
           'train/<class>/*, test/<class>/*, or (--dataset folder) a folder of unlabeled '
           'images', metavar='DIR'),
    option('--subset', None, cli.SUBSET_HELP + ' (default: all)', type=cli.POSITIVE_INT,
           metavar='N'),
    option('--eval-root', None, 'with unlabeled training images: a labelled train/<class>/*, '
           'test/<class>/* tree to report kNN accuracy on (network embeddings)', metavar='DIR'),
    option('--knn-k', A['knn_k'], 'kNN neighbours voting', type=cli.POSITIVE_INT, metavar='K'),
    option('--knn-sigma', A['knn_sigma'], 'kNN vote weight exp(similarity / sigma)',
           type=cli.POSITIVE_FLOAT, metavar='SIGMA'),
    option('--knn-features', 'bank', cli.FEATURES_HELP, choices=('bank', 'network')),
    # ------------------------------------------------------------------ the run's folder
    option('--model_dir', 'checkpoint/', 'where checkpoints and log.jsonl are written and '
           '--resume looks', resumed=False, metavar='DIR'),
    option('--resume', '', 'a checkpoint: a file in --model_dir (last.t7, ckpt.t7), a path, or '
           'a model dir (its last.t7; with --test_only its ckpt.t7). last.t7 continues its run '
           'exactly, in its own folder unless --model_dir is given; with --test_only, any '
           'checkpoint (ckpt.t7, a released file) is evaluated', resumed=False,
           extra=('-r',), metavar='NAME'),
    option('--init-from', None, 'start a new run from a checkpoint\'s weights, bank and '
           'anchors (at its round, epoch 0; fresh optimizer and schedule): a file in '
           '--model_dir, a path, or a model dir (its ckpt.t7), e.g. the authors\' released '
           'ckpt_SAND.t7', resumed=False, metavar='NAME'),
    option('--test_only', False, 'only print the kNN accuracy of the --resume checkpoint',
           resumed=False, action='store_true'),
    option('--stop-after', None, 'stop after this many epochs of this invocation, '
           'checkpoints written; the run prints the command that continues it',
           resumed=False, type=cli.POSITIVE_INT, metavar='EPOCHS'),
    option('--name', None, 'run name, the TensorBoard folder log_dir/name (default: '
           'method-dataset-network-date-time-pid)',     # (sweep/lr0.1 nests; .. would lead out)
           type=cli.checked(str, lambda v: v.strip('/') and not os.path.isabs(v) and '..' not in
                            v.split('/'), 'a folder under --log-dir (not empty or absolute, no ..)')),
    option('--log-dir', 'runs', 'TensorBoard root', metavar='DIR'),
    option('--tensorboard', True, 'write TensorBoard events (log.jsonl is always written)',
           **ON_OFF),
    option('--quiet', False, 'no progress bars, epoch or round lines: only the start and the '
           'result', resumed=False, action='store_true'),
    # ------------------------------------------------------------------ how it runs
    # (--pipeline, --precision and --compile are resumed as typed: a pipeline draws its own
    # augmentations and an arithmetic rounds its own way, so a resume on another one is not
    # the unbroken run. `auto` stays `auto`, choosing for the machine the run continues on;
    # lib/resume.py says when that changes the pipeline or the arithmetic.)
    option('--device', 'auto', cli.DEVICE_HELP, resumed=False, choices=cli.DEVICES),
    option('--pipeline', 'auto', 'gpu: data and augmentation as batched tensors on the device; '
           'cpu: torchvision transforms in loader workers, as released; auto = gpu on CUDA, cpu '
           'otherwise', choices=('auto', 'gpu', 'cpu')),
    option('--precision', 'auto', 'training arithmetic: bf16 autocast for the network (the '
           'bank, softmaxes and losses stay float32) or fp32 (no TF32); auto = bf16 on CUDA',
           choices=('auto', 'bf16', 'fp32')),
    option('--eval-precision', 'fp32', 'arithmetic of the kNN evaluation\'s embeddings: fp32 '
           '(no TF32), so a checkpoint scores the same on every device', resumed=False,
           choices=('fp32', 'bf16')),
    option('--compile', 'auto', 'torch.compile the network and the step\'s losses (and the GPU '
           'augmentation); reduce-overhead also captures CUDA graphs; auto = reduce-overhead on '
           'CUDA, none on the CPU', choices=('auto', 'none', 'default', 'reduce-overhead')),
    option('--compile-check', 'on', 'with compile on: before the first step, compare the '
           'compiled step with the eager one on that step\'s batch (losses and gradients) and '
           'fall back to a lower mode when they disagree; errors fall back either way',
           resumed=False, choices=('on', 'off')),
    option('--workers', 2, 'data-loader processes of the cpu pipeline; when given, also the '
           'processes that decode image files not in the image cache (otherwise every core)',
           resumed=False, type=cli.NON_NEGATIVE_INT, metavar='N'),
    option('--cache', True, 'keep decoded image files in the image cache, so that the next '
           'start (a run, a resume, an evaluation) maps them instead of decoding them again; '
           '--no-cache decodes them into memory', resumed=False, **ON_OFF),
    option('--cache-dir', None, 'the image cache\'s folder (default: $XDG_CACHE_HOME/super-and, '
           'else ~/.cache/super-and)', resumed=False, metavar='DIR'),
    option('--data-memory', None, 'the gpu pipeline holds the images on the device when they '
           'take at most this many GB, else streams each batch from the image cache (default: '
           'half the device\'s memory)', resumed=False, type=cli.POSITIVE_FLOAT, metavar='GB'),
    option('--sync-bn', False, 'with several processes (torchrun), BatchNorm statistics over the '
           'global batch: SyncBatchNorm on GPUs, an all-reduce version on the CPU',
           action='store_true'),
)
# How --help groups the options, in this order.
HELP_GROUPS = {
    'data': ('dataset', 'data_root', 'subset', 'image_size', 'mean', 'std', 'cache',
             'cache_dir'),
    'method': ('method', 'network', 'stem', 'sobel', 'views', 'bank', 'aug_loss', 'aug_input',
               'ue_loss', 'flip', 'nesterov', 'low_dim', 'npc_t', 'npc_m', 'ANs_select_rate',
               'ANs_size', 'batch_t', 'batch_m'),
    'schedule': ('rounds', 'epochs', 'schedule', 'batch_size', 'lr', 'momentum',
                 'weight_decay', 'seed'),
    'evaluation': ('knn_k', 'knn_sigma', 'knn_features', 'eval_root', 'eval_precision',
                   'test_only'),
    'run folder': ('model_dir', 'resume', 'init_from', 'stop_after', 'name', 'log_dir',
                   'tensorboard', 'quiet'),
    'speed': ('device', 'pipeline', 'precision', 'compile', 'compile_check', 'workers',
              'data_memory'),
    'processes (torchrun)': ('sync_bn',),
}
HELP_EXAMPLES = """examples:
  python3 main.py --dataset cifar10 --network resnet18 --model_dir checkpoint/released
  python3 main.py --data-root data --subset 500 --rounds 2 --epochs 2 --model_dir checkpoint/quick
  python3 main.py --model_dir checkpoint/quick --resume last.t7       # continue a stopped run
  python3 main.py --resume checkpoint/quick --test_only               # kNN of its best epoch
  python3 main.py --dataset folder --data-root photos --model_dir checkpoint/photos
The README has more (your own images, the figures, several GPUs)."""
DEFAULTS = {o.name: o.default for o in OPTIONS}
RESUMED = frozenset(o.name for o in OPTIONS if o.resumed)
# Where and how this machine runs a run, kept by no checkpoint: a continue command repeats them as
# typed (it sets the rest of the options that are not resumed itself).
MACHINE = frozenset(o.name for o in OPTIONS if not o.resumed) - {
    'model_dir', 'resume', 'init_from', 'test_only', 'stop_after'}
# Resumed to train on as the run trained; an evaluation (--test_only) chooses for this machine.
HOW_IT_TRAINS = ('pipeline', 'precision', 'compile')


@dataclass(frozen=True)
class Flags:
    """What was typed: {name: value} of the options given, and the words as typed (for the
    commands that messages suggest)."""
    typed: dict
    argv: tuple


def build_parser():
    """main.py's parser. Every default is SUPPRESS, so that a parsed namespace holds exactly
    the options typed; the defaults are written into the help instead."""
    parser = cli.Parser(description='Super-AND unsupervised embedding learning (Han et al. '
                        '2020): train, evaluate by weighted kNN, resume.',
                        epilog=HELP_EXAMPLES,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    by_name = {o.name: o for o in OPTIONS}
    for title, names in HELP_GROUPS.items():
        group = parser.add_argument_group(title)
        for o in (by_name[name] for name in names):
            default = {True: 'on', False: 'off'}.get(o.default, o.default) \
                if isinstance(o.default, bool) else o.default
            shown = '' if o.default in (None, '') or o.kind.get('action') == 'store_true' \
                else f' (default: {default})'
            group.add_argument(*o.flags, dest=o.name, default=argparse.SUPPRESS,
                               help=o.help + shown, **o.kind)
    return parser


def parse(argv=None) -> Flags:
    """The typed flags of `argv` (default: sys.argv); SystemExit on --help (0) or a flag error
    (2, one line)."""
    parser = build_parser()
    typed = vars(parser.parse_args(argv))
    if typed.get('test_only') and not typed.get('resume'):
        parser.error('--test_only needs --resume NAME')
    if typed.get('resume') and typed.get('init_from'):
        parser.error('--resume continues a run and --init-from starts a new one: give one')
    return Flags(typed, tuple(str(a) for a in (sys.argv[1:] if argv is None else argv)))


def typed_words(argv, names):
    """The words of `argv` (as typed) that give the options `names`, each flag in the spelling
    or alias it was typed in (`-r`, `--wd`, `--flag=value`, `-rNAME`) with the values after it."""
    actions = build_parser()._option_string_actions
    kept, taking = [], False
    for word in argv:
        action = actions.get(word.split('=', 1)[0])
        if action is None and word[:1] == '-' and word[1:2] not in ('-', ''):
            action = actions.get(word[:2])      # a short flag with its value attached
        if action is not None:
            taking = action.dest in names
        if taking:
            kept.append(word)
    return kept


# ----------------------------------------------------------------------------- the run's config
class _RunConfig:
    """Every option of a run, resolved (see the module's docstring): a field per entry of
    OPTIONS, in its order. `typed` names the options given as flags, `argv` the words typed;
    neither is stored with the run."""

    def record(self, mean=None, std=None) -> dict:
        """The options as checkpoints, config.json and log.jsonl keep them, with the
        normalisation the run used (`mean`, `std`) where given."""
        stored = {k: v for k, v in asdict(self).items() if k not in ('typed', 'argv')}
        if mean is not None:
            stored.update(mean=list(mean), std=list(std))
        return stored


# Generated from OPTIONS, so that an option is declared once.
RunConfig = make_dataclass(
    'RunConfig', [(o.name, object) for o in OPTIONS] + [
        ('typed', frozenset, field(default=frozenset())), ('argv', tuple, field(default=()))],
    bases=(_RunConfig,), namespace={'__doc__': _RunConfig.__doc__}, frozen=True)
RunConfig.__module__ = __name__     # (make_dataclass names another: pickle finds it here)


def defaults(**overrides) -> RunConfig:
    """A RunConfig of the defaults (the method's recipe filling the components), `overrides`
    applied first: what the scripts (bench/, experiments/) and the analysis loading build on.
    Raises UserError for components that do not fit together."""
    values = dict(DEFAULTS)
    values.update(overrides)
    return _freeze(values, frozenset(), ())


def _freeze(values, typed, argv):
    try:
        values.update(components_of(values['method'],
                                    {name: values.get(name) for name in COMPONENTS}))
    except RecipeError as err:
        raise UserError(str(err)) from None
    for name in ('mean', 'std'):
        if values.get(name) is not None:
            values[name] = tuple(values[name])
    if values.get('image_size') is None:        # the dataset's own size
        values['image_size'] = datasets.FIXED_SIZE.get(values.get('dataset'), 32)
    return RunConfig(**{o.name: values[o.name] for o in OPTIONS}, typed=typed, argv=argv)


def resolve(flags: Flags, stored=None, say=print, model_dir=None) -> RunConfig:
    """The frozen RunConfig of a run: the typed flags, on --resume the checkpoint's options
    `stored` (its config) for the resumed options not typed, the method's recipe for the
    components still unset, the defaults for the rest; `model_dir` where the resume policy
    moved the run (lib/resume.py). Says which options came from the checkpoint.

    Raises:
        UserError: components that do not fit together.
    """
    values = dict(DEFAULTS)
    if stored:
        stored = dict(stored)
        if 'schedule' not in stored and 'schedule' not in flags.typed:
            stored['schedule'] = 'released'     # runs from before --schedule trained on it
            say('this run predates --schedule: it continues on the released (absolute) schedule')
        adopted = []
        for key, value in stored.items():
            if key not in RESUMED or key in flags.typed or \
                    (flags.typed.get('test_only') and key in HOW_IT_TRAINS):
                continue
            default = (datasets.FIXED_SIZE.get(stored.get('dataset'), 32) if key == 'image_size'
                       else values[key])            # (the dataset's own size: no news)
            if value != default and key not in (*COMPONENTS, 'mean', 'std'):
                adopted.append(f'{key}={value}')    # (components: the method line; data: its)
            values[key] = value
        if adopted:
            say('options from the checkpoint: ' + ' '.join(adopted))
    values.update(flags.typed)
    if model_dir is not None:
        values['model_dir'] = model_dir
    if values['name'] is None:      # (the process id: runs started in one second, a sweep's,
        # would share a TensorBoard folder and event file, one run's curves lost)
        values['name'] = (f'{values["method"]}-{values["dataset"]}-{values["network"]}-'
                          f'{time.strftime("%Y%m%d-%H%M%S")}-{os.getpid()}')
    return _freeze(values, frozenset(flags.typed), flags.argv)


def log_folder(config: RunConfig) -> str:
    """The TensorBoard folder of a run."""
    return os.path.join(config.log_dir, config.name)
