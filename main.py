"""Super-AND: train an embedding without labels, evaluate it by weighted kNN.

    python3 main.py --dataset cifar10 --network resnet18           # the released schedule
    python3 main.py --model_dir checkpoint/run --resume last.t7    # continue a stopped run
    python3 main.py --resume checkpoint/run --test_only            # kNN of its best epoch
    python3 main.py --resume ckpt_SAND.t7 --test_only              # kNN of a released file
    python3 main.py --init-from ckpt_SAND.t7 --model_dir checkpoint/more   # a new run from it
    python3 main.py --dataset folder --data-root photos/           # your own unlabeled images

(ckpt_SAND.t7: the authors' trained checkpoint, downloaded from the released project's page.)

The algorithm is docs/ALGORITHM.md; every default is the released code's (lib/config.py).
This file holds the flags and the story of a run; the mechanics live in lib/.
"""
import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass

import datasets
import models
from lib import cli
from lib.cli import plural
from lib.config import BANK_STATS_ROWS, DEFAULTS, RUN_DEFAULTS, TRAIN_LOG_EVERY
from lib.cpu_estimate import cpu_hours_estimate
from lib.errors import UserError
from lib.progress import progress_bar
from lib.recipes import COMPONENTS, RECIPES, describe, resolve
from lib.run_log import RunLog, environment
from lib.schedules import SCHEDULES, Schedule, set_learning_rate
from lib.stopping import StopSignals

# Options that describe the run itself: on --resume they come from the checkpoint unless
# given again on the command line. The rest (where, how fast, what to do now) never do.
NOT_RESUMED = {'resume', 'init_from', 'test_only', 'device', 'workers', 'model_dir',
               'stop_after', 'pipeline', 'precision', 'compile', 'quiet', 'eval_precision'}
# What a resumed run may not change: its recipe (rounds may grow, to train on).
RECIPE_OPTIONS = ('method',) + tuple(name for name in COMPONENTS if name != 'rounds')


# ----------------------------------------------------------------------------- flags
def build_parser():
    d, r = DEFAULTS, RUN_DEFAULTS
    p = cli.Parser(description='Super-AND unsupervised embedding learning (Han et al. 2020): '
                   'train, evaluate by weighted kNN, resume. Every flag also takes the other '
                   'spelling (--batch-size for --batch_size, ...).')
    p.add_argument('--dataset', default=d['dataset'], choices=datasets.DATASETS,
                   help='training and evaluation data; folder = a train/<class>/*, '
                        'test/<class>/* tree, or any folder of unlabeled images, under '
                        '--data-root (default: %(default)s)')
    p.add_argument('--network', default=d['network'], choices=sorted(models.NETWORK_NAMES),
                   help='backbone of both branches (default: %(default)s)')
    p.add_argument('--method', default=r['method'], choices=sorted(RECIPES),
                   help='recipe of components (lib/recipes.py); the component flags below '
                        'override it (default: %(default)s)')
    flag = argparse.BooleanOptionalAction
    p.add_argument('--sobel', action=flag, default=None, help=COMPONENTS['sobel'])
    p.add_argument('--views', type=int, choices=(1, 2), default=None, help=COMPONENTS['views'])
    p.add_argument('--bank', action=flag, default=None, help=COMPONENTS['bank'])
    p.add_argument('--aug-loss', dest='aug_loss', action=flag, default=None,
                   help=COMPONENTS['aug_loss'])
    p.add_argument('--aug-input', dest='aug_input', default=None,
                   choices=('logits', 'features'), help=COMPONENTS['aug_input'])
    p.add_argument('--ue-loss', dest='ue_loss', action=flag, default=None,
                   help=COMPONENTS['ue_loss'])
    p.add_argument('--flip', action=flag, default=None, help=COMPONENTS['flip'])
    p.add_argument('--nesterov', action=flag, default=None, help=COMPONENTS['nesterov'])
    p.add_argument('--image-size', dest='image_size', default=r['image_size'],
                   type=cli.POSITIVE_INT,
                   help='side of the training crops and test images; other than 32 only for '
                        '--dataset folder, whose larger images are resized and centre-cropped '
                        'for test (default: %(default)s)')
    p.add_argument('--stem', default=r['stem'], choices=('auto', 'cifar', 'imagenet'),
                   help='first layers: cifar (3x3 stride 1) or imagenet (7x7 stride 2 + '
                        'max-pool); auto = imagenet above 64 px (default: %(default)s)')
    p.add_argument('--mean', type=cli.FINITE_FLOAT, nargs=3, default=None,
                   metavar=('R', 'G', 'B'),
                   help='normalisation mean (default: the dataset\'s, computed for folder)')
    p.add_argument('--std', type=cli.POSITIVE_FLOAT, nargs=3, default=None,
                   metavar=('R', 'G', 'B'),
                   help='normalisation std (default: the dataset\'s, computed for folder)')
    p.add_argument('--low_dim', default=d['low_dim'], type=cli.POSITIVE_INT,
                   help='embedding size D (default: %(default)s)')
    p.add_argument('--npc_t', default=d['npc_t'], type=cli.POSITIVE_FLOAT, metavar='T',
                   help='temperature of the memory-bank softmax (default: %(default)s)')
    p.add_argument('--npc_m', default=d['npc_m'], type=cli.checked(float, lambda v: 0 <= v < 1,
                   'a number in [0, 1)'),
                   help='momentum of the memory-bank update (default: %(default)s)')
    p.add_argument('--ANs_select_rate', default=d['ANs_select_rate'],
                   type=cli.checked(float, lambda v: 0 < v <= 1, 'a number in (0, 1]'),
                   help='share of the data added as anchors each round (default: %(default)s)')
    p.add_argument('--ANs_size', default=d['ANs_size'], type=cli.POSITIVE_INT,
                   help='neighbours per anchor, the anchor excluded (default: %(default)s)')
    p.add_argument('--lr', default=d['lr'], type=cli.POSITIVE_FLOAT,
                   help='learning rate at the start of each round (default: %(default)s)')
    p.add_argument('--momentum', default=d['momentum'], type=cli.NON_NEGATIVE_FLOAT,
                   help='SGD Nesterov momentum (default: %(default)s)')
    p.add_argument('--weight_decay', '--wd', default=d['weight_decay'],
                   type=cli.NON_NEGATIVE_FLOAT, help='SGD weight decay (default: %(default)s)')
    p.add_argument('--epochs', default=d['epochs'], type=cli.POSITIVE_INT,
                   help='epochs per round (default: %(default)s)')
    p.add_argument('--rounds', default=None, type=cli.POSITIVE_INT,
                   help='rounds, the first without anchors (default: the method\'s; '
                        f'{d["rounds"]} for super-and)')
    p.add_argument('--schedule', default=r['schedule'], choices=SCHEDULES,
                   help='lr steps (x0.1) and UE-weight steps (+0.2) inside each round: scaled '
                        'puts them at 0.6/0.8 and 0.4/0.8 of --epochs (at 200 epochs exactly '
                        'the released 120/160 and 80/160); released keeps those absolute '
                        'epochs whatever the round length (default: %(default)s)')
    p.add_argument('--batch_t', default=d['batch_t'], type=cli.POSITIVE_FLOAT, metavar='T',
                   help='temperature of the augmentation-invariance loss (default: %(default)s)')
    p.add_argument('--batch_m', default=d['batch_m'], type=cli.NON_NEGATIVE_FLOAT,
                   help='weight of that loss\'s negative terms (default: %(default)s)')
    p.add_argument('--batch_size', default=d['batch_size'],
                   type=cli.checked(int, lambda v: v >= 2, 'an integer >= 2'),
                   help='images per step, two views each (default: %(default)s)')
    p.add_argument('--model_dir', default=r['model_dir'],
                   help='where checkpoints and log.jsonl are written and --resume looks '
                        '(default: %(default)s)')
    p.add_argument('--resume', '-r', default='', metavar='NAME',
                   help='a checkpoint: a file in --model_dir (last.t7, ckpt.t7), a path, or a '
                        'model dir (its last.t7; with --test_only its ckpt.t7). last.t7 '
                        'continues its run exactly, in its own folder unless --model_dir is '
                        'given; with --test_only, any checkpoint (ckpt.t7, a released file) '
                        'is evaluated')
    p.add_argument('--init-from', dest='init_from', default=None, metavar='NAME',
                   help='start a new run from a checkpoint\'s weights, bank and anchors (at '
                        'its round, epoch 0; fresh optimizer and schedule): a file in '
                        '--model_dir, a path, or a model dir (its ckpt.t7), e.g. the '
                        'authors\' released ckpt_SAND.t7')
    p.add_argument('--test_only', action='store_true',
                   help='only print the kNN accuracy of the --resume checkpoint')
    p.add_argument('--seed', default=d['seed'], type=int,
                   help='random seed of initialisation, data order and augmentation '
                        '(default: %(default)s)')
    cli.add_data_options(p, data_root_default=r['data_root'])
    p.add_argument('--eval-root', dest='eval_root', default=None, metavar='DIR',
                   help='with unlabeled training images: a labelled train/<class>/*, '
                        'test/<class>/* tree to report kNN accuracy on (network embeddings)')
    p.add_argument('--pipeline', default=r['pipeline'], choices=('auto', 'gpu', 'cpu'),
                   help='gpu: data and augmentation as batched tensors on the device; cpu: '
                        'torchvision transforms in loader workers, as released; auto = gpu on '
                        'CUDA, cpu otherwise (default: %(default)s)')
    p.add_argument('--precision', default=r['precision'], choices=('auto', 'bf16', 'fp32'),
                   help='training arithmetic: bf16 autocast for the network (the bank, '
                        'softmaxes and losses stay float32) or fp32; auto = bf16 on CUDA '
                        '(default: %(default)s)')
    p.add_argument('--eval-precision', dest='eval_precision', default=r['eval_precision'],
                   choices=('fp32', 'bf16'),
                   help='arithmetic of the kNN evaluation\'s embeddings: fp32 (no TF32), so a '
                        'checkpoint scores the same on every device (default: %(default)s)')
    p.add_argument('--compile', default=r['compile'], choices=('auto', 'none', 'default',
                                                          'reduce-overhead'),
                   help='torch.compile the forward pass and losses (and the GPU augmentation); '
                        'reduce-overhead also captures CUDA graphs; auto = reduce-overhead on '
                        'CUDA, none on the CPU (default: %(default)s)')
    p.add_argument('--workers', default=r['workers'], type=cli.NON_NEGATIVE_INT,
                   help='data-loader processes of the cpu pipeline (default: %(default)s)')
    p.add_argument('--knn-k', dest='knn_k', default=r['knn_k'], type=cli.POSITIVE_INT,
                   help='kNN neighbours voting (default: %(default)s)')
    p.add_argument('--knn-sigma', dest='knn_sigma', default=r['knn_sigma'],
                   type=cli.POSITIVE_FLOAT,
                   help='kNN vote weight exp(similarity / sigma) (default: %(default)s)')
    cli.add_features_option(p, default=r['knn_features'])
    p.add_argument('--name', default=r['name'],
                   help='run name, the TensorBoard folder log_dir/name (default: '
                        'method-dataset-network-date-time)')
    p.add_argument('--log-dir', dest='log_dir', default=r['log_dir'],
                   help='TensorBoard root (default: %(default)s)')
    p.add_argument('--tensorboard', action=argparse.BooleanOptionalAction,
                   default=r['tensorboard'],
                   help='write TensorBoard events (default: on; log.jsonl is always written)')
    p.add_argument('--sync-bn', dest='sync_bn', action='store_true',
                   help='with several processes (torchrun), BatchNorm statistics over the global '
                        'batch: SyncBatchNorm on GPUs, an all-reduce version on the CPU')
    p.add_argument('--quiet', action='store_true',
                   help='no progress bars, epoch or round lines: only the start and the result')
    p.add_argument('--stop-after', dest='stop_after', default=None, type=cli.POSITIVE_INT,
                   metavar='EPOCHS', help='stop after this many epochs of this invocation, '
                   'checkpoints written; the run prints the command that continues it')
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    # Which options were typed (the rest may come from a resumed checkpoint).
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    args.given = set(vars(parser.parse_args(argv)))
    # As typed, for the commands that errors suggest (this one, with a flag changed).
    args.argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    if args.test_only and not args.resume:
        parser.error('--test_only needs --resume NAME')
    if args.resume and args.init_from:
        parser.error('--resume continues a run and --init-from starts a new one: give one')
    return args


def options_record(args):
    """The run's options as stored in checkpoints, config.json and log.jsonl."""
    return {k: v for k, v in vars(args).items() if k not in ('given', 'argv')}


if __name__ == '__main__':
    cli.parse_first(parse_args)

# The engine, imported once the flags are known to be right (importing torch takes seconds).
import torch  # noqa: E402

from lib import checkpoint as ckpt  # noqa: E402
from lib.build import (DeviceSettings, build_optimizer, build_pipeline,  # noqa: E402
                       build_trainer, device_settings, distribute, load_data, load_eval_data,
                       normalisation)
from lib.distributed import World, close_world, init_world  # noqa: E402
from lib.evaluate import KnnData, knn_evaluate  # noqa: E402
from lib.method_state import MethodState  # noqa: E402
from lib.neighbourhoods import bank_statistics  # noqa: E402
from lib.train import NonFiniteLoss  # noqa: E402


# ----------------------------------------------------------------------------- commands to print
# Every command the program suggests is whole and quoted, names the run's folder or the
# checkpoint's whole path, and works as printed from the folder it was run in.
def command(*argv):
    return 'python3 main.py ' + shlex.join(str(a) for a in argv)


def continue_command(model_dir, *more):
    """The command that continues the run in `model_dir` from its last.t7."""
    return command('--model_dir', model_dir, '--resume', ckpt.LAST, *more)


def retyped(args, changes):
    """The command as the user typed it, with the flags of `changes` ({'--rounds': '3'}) given
    these values instead (in either spelling they were typed): what an error suggests."""
    spellings = {spelling for flag in changes
                 for spelling in (flag.replace('_', '-'), '--' + flag[2:].replace('-', '_'))}
    kept, skip = [], False
    for word in args.argv:
        if skip:                            # the value of a flag that changes
            skip = False
        elif word.split('=', 1)[0] in spellings:
            skip = '=' not in word
        else:
            kept.append(word)
    for flag, value in changes.items():
        kept += [flag, value]
    return command(*kept)


def unused_folder(model_dir):
    """`model_dir` with the first -2, -3, ... that names nothing yet: a new run's folder."""
    base = os.path.normpath(model_dir)
    number = 2
    while os.path.exists(f'{base}-{number}'):
        number += 1
    return f'{base}-{number}'


# ----------------------------------------------------------------------------- the checkpoint
def open_checkpoint(args, say):
    """The checkpoint of --resume or --init-from, read and checked against the flags (None for
    a fresh run); on --resume the run's options are taken from it unless typed again, and a
    continued run stays in its checkpoint's folder unless --model_dir is typed."""
    if os.path.exists(args.model_dir) and not os.path.isdir(args.model_dir):
        raise UserError(f'--model_dir {args.model_dir} is a file, not a folder')
    name = args.resume or args.init_from
    if not name:
        return None, None
    continuing = args.resume and not args.test_only
    path = ckpt.resolve_path(args.model_dir, name, ckpt.LAST if continuing else ckpt.BEST)
    state = ckpt.load(path)
    if args.init_from and os.path.abspath(path) in [os.path.abspath(os.path.join(
            args.model_dir, written)) for written in (ckpt.BEST, ckpt.LAST)]:
        elsewhere = retyped(args, {'--init-from': path,
                                   '--model_dir': unused_folder(args.model_dir)})
        raise UserError(f'--init-from {name} is {path}, a file this run would overwrite: '
                        f'start the new run in another folder: {elsewhere}')
    if args.resume:
        if continuing and not ckpt.can_continue(state):
            raise UserError(f'{path} holds no optimizer state (a best-kNN ckpt.t7 or a released '
                            f'checkpoint), so --resume cannot continue a run from it; '
                            f'--init-from {path} starts a new run from its weights, bank and '
                            f'anchors (in another --model_dir); to evaluate it: '
                            f'{command(*args.argv, "--test_only")}')
        if continuing and 'model_dir' not in args.given and \
                os.path.abspath(os.path.dirname(path)) != os.path.abspath(args.model_dir):
            # A run continues in its own folder, not in the default one (another run's).
            args.model_dir = os.path.dirname(path) or '.'
            say(f'continuing the run in {args.model_dir}, the folder of {path}')
        refuse_recipe_change(args, state.get('config') or {}, path)
        adopt_checkpoint_config(args, state, say)
        if not args.test_only:
            for note in ckpt.check_resume_position(state, vars(args), path):
                say(note)
    return state, path


def refuse_recipe_change(args, stored, path):
    for key in RECIPE_OPTIONS:
        if key in args.given and key in stored and stored[key] is not None \
                and getattr(args, key) != stored[key]:
            typed, name = getattr(args, key), key.replace('_', '-')
            flag = (f'--{name}' if typed else f'--no-{name}') if isinstance(typed, bool) \
                else f'--{name} {typed}'
            raise UserError(f'{flag} contradicts the run in {path} ({key} = {stored[key]}): a '
                            f'resumed run keeps its recipe; start a new run in another '
                            f'--model_dir, or one from its weights with --init-from {path}')


def adopt_checkpoint_config(args, state, say):
    """On --resume, take the run's own options from the checkpoint unless typed again."""
    stored = dict(state.get('config') or {})
    if stored.get('knn_features') == 'recompute':       # the word older checkpoints stored
        stored['knn_features'] = 'network'
    if stored and 'schedule' not in stored and 'schedule' not in args.given:
        stored['schedule'] = 'released'     # runs from before --schedule trained on it
        say('this run predates --schedule: it continues on the released (absolute) schedule')
    adopted = []
    for key, value in stored.items():
        if key in NOT_RESUMED or key in args.given or not hasattr(args, key):
            continue
        if getattr(args, key) != value and key not in (*COMPONENTS, 'mean', 'std'):
            adopted.append(f'{key}={value}')    # (components: the method line; mean, std: data)
        setattr(args, key, value)
    if adopted:
        say('options from the checkpoint: ' + ' '.join(adopted))


def already_finished(args, state, path, say):
    """Whether --resume names a run with nothing left to train (said, and nothing written)."""
    if state is None or args.test_only or not args.resume:
        return False
    progress = ckpt.progress_of(state)
    if progress.round < args.rounds:
        return False
    say(f'{path}: the run already finished ({plural(args.rounds, "round")} x '
        f'{plural(args.epochs, "epoch")}; best kNN top-1 {progress.best_text()}); nothing to '
        f'do; more rounds would train on: {retyped(args, {"--rounds": str(args.rounds + 1)})}')
    return True


# ----------------------------------------------------------------------------- a run
@dataclass
class Run:
    """What the steps of a run share."""
    args: argparse.Namespace
    settings: DeviceSettings
    world: World
    method: MethodState                 # network, bank, anchors
    net: torch.nn.Module                # the network as trained (DDP-wrapped with processes)
    pipeline: object
    knn: KnnData                        # None: no labels to evaluate with
    labels: torch.Tensor                # training labels (None when unlabeled): diagnostics
    fingerprint: dict                   # of the training data
    schedule: Schedule
    optimizer: object = None
    trainer: object = None
    writer: ckpt.CheckpointWriter = None
    log: RunLog = None
    progress: ckpt.Progress = None
    stats_rows: torch.Tensor = None     # bank entries sampled for the label-free statistics
    lock: object = None                 # rank 0's hold on model_dir (lib/run_lock.py)

    def say(self, text, always=False):
        self.log.line(text, always)


def describe_data(args, train, test):
    source = f'from {datasets.shown(train.source)}; {args.image_size} px'
    if not train.labelled:
        return (f'data: {plural(len(train), "unlabeled image")} (no classes, no test split), '
                f'{source}')
    return (f'data: {len(train)} training and {len(test)} test images, '
            f'{plural(len(train.classes), "class", "classes")}, {source}')


def report_reading(image_set, say):
    """The files that could not be read, named, and the notes on how the others were read."""
    for where, reason in image_set.skipped:
        say(f'skipped {datasets.shown(where)}: {reason}')
    if image_set.skipped:
        say(f'skipped {plural(len(image_set.skipped), "unreadable file")}')
    for note in image_set.notes:
        say(note)


def knn_warnings(args, knn):
    """Warnings for kNN settings whose accuracy means nothing."""
    if knn is None:
        return []
    found, count = [], len(knn.train_labels)
    if knn.num_classes < 2:
        found.append(f'warning: {plural(knn.num_classes, "class", "classes")}: every kNN vote '
                     f'goes to it, so the accuracy means nothing')
    if args.knn_k >= count:
        found.append(f'warning: --knn-k {args.knn_k} is at least the {count} training images: '
                     f'every test image is voted on by all of them, so the accuracy means '
                     f'little; use a smaller --knn-k')
    return found


def setup(args, world):
    """Everything a run needs, built (and restored from --resume or --init-from) in the same
    way on every process: the Run, and the checkpoint read and its path (or None). The Run is
    None when there is nothing to do."""
    say = print if world.main else (lambda *a, **k: None)
    state, path = open_checkpoint(args, say)
    settings = device_settings(args, world)
    resolve(args)
    say(describe(args))
    if already_finished(args, state, path, say):
        return None, None, None
    if args.init_from and int(state.get('round') or 0) >= args.rounds:
        raise UserError(f'{path} is at round {state.get("round")}; with --rounds {args.rounds} '
                        f'there is nothing left to train; with one more round: '
                        f'{retyped(args, {"--rounds": str(int(state.get("round")) + 1)})}')
    train, test = load_data(args)
    report_reading(train, say)
    mean, std = normalisation(args, train)
    args.mean, args.std = list(mean), list(std)   # stored: what the network was trained with
    say(describe_data(args, train, test) + f', mean {mean} std {std}')
    if args.eval_root and train.labelled:
        raise UserError('--eval-root is for runs on unlabeled images; this data has labels')
    method = MethodState.build(args, len(train), settings.device)
    if state is not None:
        note = ckpt.check_data(state, train.fingerprint, path)
        if note:
            say(note)
        method.load(state, path)
    pipeline = build_pipeline(args, settings, train, test, mean, std, world)
    knn = None
    if train.labelled:
        knn = KnnData(pipeline, torch.from_numpy(train.targets).to(settings.device),
                      len(train.classes), args.knn_features)
    elif args.eval_root:
        eval_train, eval_test = load_eval_data(args)
        classes = plural(len(eval_train.classes), 'class', 'classes')
        say(f'kNN evaluation on {datasets.shown(args.eval_root)}: {len(eval_train)} training '
            f'and {len(eval_test)} test images, {classes} (network embeddings)')
        report_reading(eval_train, say)
        eval_pipeline = build_pipeline(args, settings, eval_train, eval_test, mean, std, world)
        knn = KnnData(eval_pipeline, torch.from_numpy(eval_train.targets).to(settings.device),
                      len(eval_train.classes), 'network')
    for warning in knn_warnings(args, knn):
        say(warning)
    labels = (torch.from_numpy(train.targets).to(settings.device) if train.labelled else None)
    run = Run(args, settings, world, method, distribute(args, method.net, world), pipeline, knn,
              labels, train.fingerprint, Schedule(args.epochs, args.schedule))
    return run, state, path


def evaluate(run):
    """kNN top-1 and top-5 (fractions), or None without labels."""
    if run.knn is None:
        return None
    args = run.args
    return knn_evaluate(run.method.net, run.method.bank, run.knn, args.knn_k, args.knn_sigma,
                        run.world, args.eval_precision, not args.quiet and run.world.main)


def test_only(run, state, path):
    if run.knn is None:
        raise UserError('these training images have no labels, so there is no kNN accuracy: '
                        'give --eval-root DIR, a labelled train/<class>/*, test/<class>/* tree')
    top1, top5 = evaluate(run)
    where = f"round {state.get('round', '?')} epoch {state.get('epoch', '?')}"
    run.say(f'kNN accuracy of {path} ({where}): top-1 {100 * top1:.2f}% '
            f'top-5 {100 * top5:.2f}%', always=True)


# ----------------------------------------------------------------------------- training
def prepare_training(run, state, path):
    """Check the model dir, build optimizer and trainer, open the logs, and restore where the
    run continues (last.t7), or start it (fresh, or from --init-from's weights)."""
    args, world = run.args, run.world
    problem = None
    if world.main:      # checked (and locked: one live run per folder) once; all ranks stop
        try:
            run.lock = ckpt.prepare_model_dir(args.model_dir, run.method.checkpoint_bytes())
        except UserError as err:
            problem = str(err)
    problem = world.share(problem)
    if problem:
        raise UserError(problem)
    run.optimizer = build_optimizer(args, run.net)
    run.trainer = build_trainer(args, run.settings, run.net, run.method, run.optimizer, world)
    run.writer = ckpt.CheckpointWriter()
    args.name = args.name or (f'{args.method}-{args.dataset}-{args.network}-'
                              f'{time.strftime("%Y%m%d-%H%M%S")}')
    run.log = RunLog(args.model_dir, args.log_dir, args.name, args.tensorboard, args.quiet,
                     enabled=world.main, after=run.writer.then)
    if run.lock is not None and run.lock.note:
        run.say(run.lock.note, always=True)
    if run.knn is None:
        generator = torch.Generator().manual_seed(args.seed)
        rows = torch.randperm(run.fingerprint['images'], generator=generator)[:BANK_STATS_ROWS]
        run.stats_rows = rows.sort().values.to(run.settings.device)
    if state is not None and args.resume:
        run.progress = ckpt.restore_training(state, run.optimizer)
        where = f' step {run.progress.step}' if run.progress.step else ''
        run.say(f'resuming at round {run.progress.round} epoch {run.progress.epoch}{where} '
                f'from {path} (best kNN top-1 so far: {run.progress.best_text()})', always=True)
        repeated = ckpt.repeated_epoch_note(path, run.progress) if world.main else None
        if repeated:
            run.say(repeated, always=True)
    elif state is not None:
        start_round = int(state.get('round') or 0)
        run.progress = ckpt.Progress(round=start_round)
        anchors = run.method.anchors.num_anchors if run.method.anchors is not None else 0
        run.say(f'initialised from {path} (round {state.get("round")} epoch '
                f'{state.get("epoch")}): weights, bank and {plural(anchors, "anchor")} taken; '
                f'optimizer and schedule fresh; training starts at round {start_round} '
                f'epoch 0', always=True)
    else:
        run.progress = ckpt.Progress()
    config = options_record(args)
    if world.main:
        with open(os.path.join(args.model_dir, 'config.json'), 'w') as f:
            json.dump(config, f, indent=1, sort_keys=True)
    run.log.start(config, run.fingerprint, environment(run.settings.device),
                  resumed_from=path if args.resume else None)


def announce_training(run):
    args, world, settings = run.args, run.world, run.settings
    where = run.log.jsonl_path + (f' and {os.path.join(args.log_dir, args.name)}'
                                  if run.log.writer is not None else '')
    run.say(run.schedule.describe(args.lr, args.ue_loss), always=True)
    if args.ue_loss and not run.schedule.ue_ever_on():
        run.say(f'warning: the UE loss is on, but its weight stays 0 in every epoch of these '
                f'{args.epochs}-epoch rounds (--schedule {args.schedule}), so it trains '
                f'nothing; use --schedule scaled or more --epochs', always=True)
    steps = run.pipeline.steps_per_epoch
    run.say(f'training {args.network} on {args.dataset} ({settings.device}, '
            f'{plural(world.size, "process", "processes")}, {settings.pipeline} pipeline, '
            f'{settings.precision}, compile {settings.compile}): '
            f'{plural(args.rounds, "round")} x {plural(args.epochs, "epoch")}, '
            f'{plural(steps, "step")} of {args.batch_size} images; logs in {where}',
            always=True)
    if not settings.cuda:
        hours = cpu_hours_estimate(args.network, args.sobel, args.views, args.image_size,
                                   args.rounds * args.epochs * steps * args.batch_size,
                                   run.knn.pipeline.num_test if run.knn else 0,
                                   args.rounds * args.epochs)
        if hours > 1:
            days = f' ({hours / 24:,.0f} days)' if hours > 48 else ''
            run.say(f'estimated time on this CPU: about {hours:,.0f} hours{days}, from a rate '
                    f'measured on 2 cores; one GPU is meant to take about 1.5 hours for the '
                    f'released 5 x 200 epochs of CIFAR-10 (an estimate: README)', always=True)


def train_epoch(run, round_index, epoch, stop):
    """Train one epoch (from the resumed step if any), evaluate it and save the checkpoints;
    returns the epoch's record, or None when a stop signal ended it early (last.t7 then holds
    the step to continue from)."""
    args, progress = run.args, run.progress
    start = time.time()
    first_step, sums = progress.step, progress.loss_sums
    progress.step, progress.loss_sums = 0, None
    lr, weight = run.schedule.learning_rate(args.lr, epoch), run.schedule.ue_weight(epoch)
    set_learning_rate(run.optimizer, lr)
    batches = progress_bar(run.pipeline.train_batches(round_index, epoch, first_step),
                           total=run.pipeline.steps_per_epoch, initial=first_step,
                           desc=f'round {round_index} epoch {epoch}',
                           enabled=not args.quiet and run.world.main)
    try:
        result = run.trainer.train_epoch(batches, weight, TRAIN_LOG_EVERY, first_step, sums,
                                         stop)
    except NonFiniteLoss as bad:
        raise non_finite_loss(run, round_index, epoch, bad.step) from None
    if result.stopped:
        save_stopped(run, round_index, epoch, result, stop.name)
        return None
    accuracy = evaluate(run)
    is_best = progress.record(round_index, epoch, accuracy[0] if accuracy else None)
    nxt = ckpt.following(round_index, epoch, args.epochs)
    save(run, is_best, dict(round=nxt[0], epoch=nxt[1], step=0))
    global_epoch = round_index * args.epochs + epoch
    run.log.steps(global_epoch * run.pipeline.steps_per_epoch, result.samples, lr)
    record = epoch_record(run, round_index, epoch, lr, weight, result.losses, accuracy)
    record['seconds'] = time.time() - start
    return record


def non_finite_loss(run, round_index, epoch, step):
    """The UserError of a NaN or infinite loss, once the checkpoint it names is on disk."""
    run.writer.wait()
    args, saved = run.args, run.progress.saved
    lower = f'{args.lr / 10:g}'
    if saved:
        kept = (f'{os.path.join(args.model_dir, ckpt.LAST)} still holds the last good epoch '
                f'(round {saved[0]} epoch {saved[1]}); a lower learning rate may help: '
                f'{continue_command(args.model_dir, "--lr", lower)}')
    else:
        kept = (f'no checkpoint had been written yet; a lower learning rate may help: '
                f'{retyped(args, {"--lr": lower})}')
    return UserError(f'non-finite loss (NaN or infinite) at round {round_index} epoch {epoch} '
                     f'step {step}: stopped; {kept}')


def last_checkpoint(run):
    """What last.t7 holds, and the command that continues from it (for an early exit)."""
    at = run.progress.resumes_at
    if at is None:
        return 'no checkpoint was written yet'
    step = f' step {at[2]}' if at[2] else ''
    return (f'{os.path.join(run.args.model_dir, ckpt.LAST)} continues from round {at[0]} '
            f'epoch {at[1]}{step}: {continue_command(run.args.model_dir)}')


def save_stopped(run, round_index, epoch, result, signal_name):
    """A stop signal ended the epoch at `result.steps`: last.t7 continues from there."""
    run.progress.round, run.progress.epoch = round_index, epoch
    save(run, False, dict(round=round_index, epoch=epoch, step=result.steps,
                          loss_sums=result.sums))
    run.writer.wait()
    run.say(f'stopped by {signal_name} at round {round_index} epoch {epoch} step '
            f'{result.steps}: {os.path.join(run.args.model_dir, ckpt.LAST)} written; continue '
            f'with: {continue_command(run.args.model_dir)}', always=True)


def epoch_record(run, round_index, epoch, lr, ue_weight, losses, accuracy):
    """What log.jsonl keeps of an epoch: only the losses and weights the run has, the kNN
    accuracy, or without labels the bank's statistics."""
    args, method = run.args, run.method
    record = dict(round=round_index, epoch=epoch, global_epoch=round_index * args.epochs + epoch,
                  lr=lr, loss={name: losses[name] for name in active_losses(args)})
    if args.ue_loss:
        record['ue_weight'] = ue_weight
    if accuracy is not None:
        record.update(knn_top1=100 * accuracy[0], knn_top5=100 * accuracy[1],
                      best_top1=100 * run.progress.best_acc)
    elif method.bank is not None and run.world.main:
        record['bank'] = bank_statistics(method.bank.memory, method.bank.temperature,
                                         run.stats_rows)
        if method.anchors is not None and method.anchors.num_anchors:
            record['bank']['anchor_similarity'] = method.anchors.neighbour_similarity(
                method.bank.memory)
    return record


def active_losses(args):
    return [name for name, on in (('and', args.bank), ('aug', args.aug_loss),
                                  ('ue', args.ue_loss)) if on]


def save(run, is_best, next_position):
    """last.t7 (to continue from `next_position`), and ckpt.t7 when `is_best`; rank 0 only."""
    if run.world.main:
        ckpt.write(run.writer, run.args.model_dir, run.method, run.optimizer, run.progress,
                   next_position, options_record(run.args), run.fingerprint, is_best)


# The losses as the epoch line names them (log.jsonl keeps the short keys): 'loss and 7.94'
# read as English.
LOSS_NAMES = {'and': 'AND loss', 'aug': 'aug loss', 'ue': 'UE loss'}


def epoch_line(args, record):
    losses = ', '.join(f'{LOSS_NAMES[name]} {value:.4f}' for name, value in record['loss'].items())
    parts = [f"round {record['round']} epoch {record['epoch']:3d}/{args.epochs}",
             f"lr {record['lr']:.5f}"]
    if 'ue_weight' in record:
        parts.append(f"UE weight {record['ue_weight']:.1f}")
    parts.append(losses)
    if 'knn_top1' in record:
        parts += [f"kNN top-1 {record['knn_top1']:.2f}% top-5 {record['knn_top5']:.2f}%",
                  f"best {record['best_top1']:.2f}%"]
    if 'bank' in record:
        bank = record['bank']
        text = (f"bank entropy {bank['entropy_mean']:.3f} ({bank['entropy_min']:.3f}-"
                f"{bank['entropy_max']:.3f}), nearest cos {bank['nearest_similarity']:.3f}")
        if 'anchor_similarity' in bank:
            text += f", anchor-neighbour cos {bank['anchor_similarity']:.3f}"
        parts.append(text)
    parts.append(f"{record['seconds']:.1f} s")
    return ' | '.join(parts)


def discover_anchors(run, round_index):
    start = time.time()
    method = run.method
    method.discover_anchors(round_index, run.labels, run.world)
    seconds = time.time() - start
    anchors = method.anchors
    n, count = anchors.num_entries, anchors.num_anchors
    similarity = anchors.neighbour_similarity(method.bank.memory)
    if run.labels is not None:
        consistency = 100 * float(anchors.consistency)
        detail = f'label consistency of (anchor, neighbour) pairs {consistency:.2f}%'
    else:
        consistency = None
        detail = f'mean (anchor, neighbour) cosine {similarity:.3f}'
    run.say(f'round {round_index}: {plural(count, "anchor")} ({100 * count / n:.1f}% of {n}), '
            f'{detail} ({seconds:.1f} s)')
    run.log.round(dict(round=round_index, anchors=count, consistency=consistency,
                       neighbour_similarity=similarity, seconds=seconds),
                  entropy=anchors.entropy)


def train_rounds(run, stop):
    """The rounds and epochs: anchors at each round's start, then train, evaluate, save and
    report every epoch. Returns False when a stop signal or --stop-after ended it early."""
    args, progress = run.args, run.progress
    epochs_run = 0
    start_round, start_epoch, mid_epoch = progress.round, progress.epoch, progress.step > 0
    initialised = args.init_from is not None
    for round_index in range(start_round, args.rounds):
        first_epoch = start_epoch if round_index == start_round else 0
        continuing = round_index == start_round and (mid_epoch or initialised)
        if round_index > 0 and first_epoch == 0 and not continuing \
                and run.method.anchors is not None:
            discover_anchors(run, round_index)
        for epoch in range(first_epoch, args.epochs):
            record = train_epoch(run, round_index, epoch, stop)
            if record is None:
                return False
            run.log.epoch(record)
            run.say(epoch_line(args, record))
            epochs_run += 1
            if args.stop_after and epochs_run >= args.stop_after \
                    and (round_index, epoch) != (args.rounds - 1, args.epochs - 1):
                run.say(f'stopping after {plural(epochs_run, "epoch")} (--stop-after); '
                        f'continue with: {continue_command(args.model_dir)}', always=True)
                return False
    return True


def train(run, state, path):
    start = time.time()
    prepare_training(run, state, path)
    announce_training(run)
    try:
        with StopSignals(lambda text: run.say(text, always=True)) as stop:
            finished = train_rounds(run, stop)
    except KeyboardInterrupt:       # a second Ctrl-C: out at once, saying what last.t7 holds
        run.writer.wait()
        raise KeyboardInterrupt(f'interrupted: stopped at once (a second Ctrl-C); '
                                f'{last_checkpoint(run)}') from None
    finally:
        run.writer.wait()           # every checkpoint whole on disk before anything is said
        run.log.close()
    if not finished:
        return
    progress, args = run.progress, run.args
    best, last = (os.path.join(args.model_dir, name) for name in (ckpt.BEST, ckpt.LAST))
    if progress.best_acc is not None:
        run.say(f'done: best kNN top-1 {100 * progress.best_acc:.2f}% (round '
                f'{progress.best_round} epoch {progress.best_epoch}, best-on-test as '
                f'released), final {100 * progress.acc:.2f}%', always=True)
        run.say(f'files: {best} holds the best epoch (round {progress.best_round} epoch '
                f'{progress.best_epoch}), {last} the last (round {progress.round} epoch '
                f'{progress.epoch}); the log is {run.log.jsonl_path}', always=True)
    else:
        run.say(f'done: {plural(args.rounds, "round")} x {plural(args.epochs, "epoch")} '
                f'without labels (no kNN accuracy)', always=True)
        run.say(f'files: {best} and {last} hold the last epoch (round {progress.round} epoch '
                f'{progress.epoch}; without labels there is no best); the log is '
                f'{run.log.jsonl_path}', always=True)
    run.log.end(dict(best_top1=None if progress.best_acc is None else 100 * progress.best_acc,
                     best_round=progress.best_round, best_epoch=progress.best_epoch,
                     final_top1=None if progress.acc is None else 100 * progress.acc,
                     seconds=time.time() - start))


# ----------------------------------------------------------------------------- entry point
def run_once(args, world):
    """Train or evaluate. The Run (and its DistributedDataParallel, whose reducer holds the
    process group) is released when this returns, so the group closes last."""
    run, state, path = setup(args, world)
    if run is None:
        return
    if args.test_only:
        run.log = RunLog(args.model_dir, tensorboard=False, enabled=world.main)
        test_only(run, state, path)
        return
    try:
        train(run, state, path)
    finally:            # in-process callers (tests) run again in the same folder
        if run.lock is not None:
            run.lock.release()


def main(argv=None):
    try:
        args = parse_args(argv)
    except SystemExit as exit_:        # -h, or a flag error already printed
        return exit_.code
    world = init_world(args.device)
    label = 'error' if world.size == 1 else f'error (rank {world.rank})'
    code = cli.run(lambda _: run_once(args, world), error_label=label)
    close_world(world, clean=code == 0)
    return code


if __name__ == '__main__':
    sys.exit(main())
