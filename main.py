"""Super-AND: train an embedding without labels, evaluate it by weighted kNN.

    python3 main.py --dataset cifar10 --network resnet18           # the released schedule
    python3 main.py --resume ckpt_SAND.t7 --test_only              # kNN of a checkpoint
    python3 main.py --resume last.t7                               # continue a stopped run

The algorithm and every default are the released code's (see lib/config.py and SPEC.md).
"""
import argparse
import os
import sys
import time
from dataclasses import dataclass

import torch

import datasets
import models
from lib import checkpoint as ckpt
from lib.build import (build_model, build_optimizer, build_pipeline, build_trainer,
                       choose_device, distribute, load_data, normalisation)
from lib.config import DEFAULTS, RUN_DEFAULTS, TRAIN_LOG_EVERY
from lib.errors import UserError
from lib.progress import progress
from lib.recipes import COMPONENTS, RECIPES, describe, resolve
from lib.run_log import RunLog
from lib.distributed import World, broadcast_anchors, close_world, init_world
from lib.evaluate import embed, knn_correct
from lib.schedules import learning_rate, set_learning_rate, ue_weight
from lib.stopping import StopSignals
from lib.train import NonFiniteLoss

# Options that describe the run itself: on --resume they come from the checkpoint unless
# given again on the command line. The rest (where, how fast, what to do) never do.
NOT_RESUMED = {'resume', 'test_only', 'device', 'workers', 'model_dir', 'data_root',
               'stop_after', 'pipeline', 'precision', 'compile', 'quiet', 'tensorboard',
               'log_dir'}


# ----------------------------------------------------------------------------- flags
def checked(kind, test, requirement):
    def parse(text):
        value = kind(text)
        if not test(value):
            raise argparse.ArgumentTypeError(f'{text} is not {requirement}')
        return value
    return parse


POSITIVE_INT = checked(int, lambda v: v >= 1, 'an integer >= 1')
POSITIVE_FLOAT = checked(float, lambda v: v > 0, 'a number > 0')
NON_NEGATIVE_FLOAT = checked(float, lambda v: v >= 0, 'a number >= 0')


def build_parser():
    d, r = DEFAULTS, RUN_DEFAULTS
    p = argparse.ArgumentParser(description='Super-AND unsupervised embedding learning '
                                '(Han et al. 2020): train, evaluate by weighted kNN, resume.')
    p.add_argument('--dataset', default=d['dataset'], choices=datasets.DATASETS,
                   help='training and evaluation data; folder = any train/<class>/*, '
                        'test/<class>/* tree under --data-root (default: %(default)s)')
    p.add_argument('--network', default=d['network'], choices=sorted(models.NETWORKS),
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
    p.add_argument('--image-size', dest='image_size', default=r['image_size'], type=POSITIVE_INT,
                   help='side of the training crops and test images; other than 32 only for '
                        '--dataset folder, whose larger images are resized and centre-cropped '
                        'for test (default: %(default)s)')
    p.add_argument('--stem', default=r['stem'], choices=('auto', 'cifar', 'imagenet'),
                   help='first layers: cifar (3x3 stride 1) or imagenet (7x7 stride 2 + '
                        'max-pool); auto = imagenet above 64 px (default: %(default)s)')
    p.add_argument('--mean', type=float, nargs=3, default=None, metavar=('R', 'G', 'B'),
                   help='normalisation mean (default: the dataset\'s, computed for folder)')
    p.add_argument('--std', type=float, nargs=3, default=None, metavar=('R', 'G', 'B'),
                   help='normalisation std (default: the dataset\'s, computed for folder)')
    p.add_argument('--low_dim', default=d['low_dim'], type=POSITIVE_INT,
                   help='embedding size D (default: %(default)s)')
    p.add_argument('--npc_t', default=d['npc_t'], type=POSITIVE_FLOAT, metavar='T',
                   help='temperature of the memory-bank softmax (default: %(default)s)')
    p.add_argument('--npc_m', default=d['npc_m'], type=checked(float, lambda v: 0 <= v < 1,
                   'in [0, 1)'), help='momentum of the memory-bank update (default: %(default)s)')
    p.add_argument('--ANs_select_rate', default=d['ANs_select_rate'],
                   type=checked(float, lambda v: 0 < v <= 1, 'in (0, 1]'),
                   help='share of the data added as anchors each round (default: %(default)s)')
    p.add_argument('--ANs_size', default=d['ANs_size'], type=POSITIVE_INT,
                   help='neighbours per anchor, the anchor excluded (default: %(default)s)')
    p.add_argument('--lr', default=d['lr'], type=POSITIVE_FLOAT,
                   help='learning rate at the start of each round (default: %(default)s)')
    p.add_argument('--momentum', default=d['momentum'], type=NON_NEGATIVE_FLOAT,
                   help='SGD Nesterov momentum (default: %(default)s)')
    p.add_argument('--weight_decay', '--wd', default=d['weight_decay'], type=NON_NEGATIVE_FLOAT,
                   help='SGD weight decay (default: %(default)s)')
    p.add_argument('--epochs', default=d['epochs'], type=POSITIVE_INT,
                   help='epochs per round (default: %(default)s)')
    p.add_argument('--rounds', default=None, type=POSITIVE_INT,
                   help='rounds, the first without anchors (default: the method\'s; '
                        f'{d["rounds"]} for super-and)')
    p.add_argument('--batch_t', default=d['batch_t'], type=POSITIVE_FLOAT, metavar='T',
                   help='temperature of the augmentation-invariance loss (default: %(default)s)')
    p.add_argument('--batch_m', default=d['batch_m'], type=NON_NEGATIVE_FLOAT,
                   help='weight of that loss\'s negative terms (default: %(default)s)')
    p.add_argument('--batch_size', default=d['batch_size'],
                   type=checked(int, lambda v: v >= 2, 'an integer >= 2'),
                   help='images per step, two views each (default: %(default)s)')
    p.add_argument('--model_dir', default=r['model_dir'],
                   help='where checkpoints are written and --resume looks (default: %(default)s)')
    p.add_argument('--resume', '-r', default='', metavar='NAME',
                   help='checkpoint in model_dir to load: last.t7 continues a run, ckpt.t7 or '
                        'a released file with --test_only evaluates it')
    p.add_argument('--test_only', action='store_true',
                   help='only print the kNN accuracy of the --resume checkpoint')
    p.add_argument('--seed', default=d['seed'], type=int,
                   help='random seed of initialisation, data order and augmentation '
                        '(default: %(default)s)')
    p.add_argument('--data-root', dest='data_root', default=r['data_root'],
                   help='torchvision\'s files, or an image-folder tree train/<class>/*, '
                        'test/<class>/* (default: %(default)s)')
    p.add_argument('--device', default=r['device'], choices=('auto', 'cuda', 'cpu'),
                   help='auto = CUDA when present (default: %(default)s)')
    p.add_argument('--pipeline', default=r['pipeline'], choices=('auto', 'gpu', 'cpu'),
                   help='gpu: data and augmentation as batched tensors on the device; cpu: '
                        'torchvision transforms in loader workers, as released; auto = gpu on '
                        'CUDA, cpu otherwise (default: %(default)s)')
    p.add_argument('--precision', default=r['precision'], choices=('auto', 'bf16', 'fp32'),
                   help='network arithmetic: bf16 autocast (the bank, softmaxes and losses stay '
                        'float32) or fp32; auto = bf16 on CUDA (default: %(default)s)')
    p.add_argument('--compile', default=r['compile'], choices=('auto', 'none', 'default',
                                                          'reduce-overhead'),
                   help='torch.compile the forward pass and losses (and the GPU augmentation); '
                        'reduce-overhead also captures CUDA graphs; auto = reduce-overhead on '
                        'CUDA, none on the CPU (default: %(default)s)')
    p.add_argument('--workers', default=r['workers'],
                   type=checked(int, lambda v: v >= 0, '>= 0'),
                   help='data-loader processes of the cpu pipeline (default: %(default)s)')
    p.add_argument('--knn-k', dest='knn_k', default=r['knn_k'], type=POSITIVE_INT,
                   help='kNN neighbours voting (default: %(default)s)')
    p.add_argument('--knn-sigma', dest='knn_sigma', default=r['knn_sigma'], type=POSITIVE_FLOAT,
                   help='kNN vote weight exp(similarity / sigma) (default: %(default)s)')
    p.add_argument('--knn-features', dest='knn_features', default=r['knn_features'],
                   choices=('bank', 'recompute'),
                   help='kNN training side: the memory bank as released, or embeddings '
                        'recomputed by the network (test transform, eval mode); runs without a '
                        'bank always recompute (default: %(default)s)')
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
    p.add_argument('--subset', default=None, type=POSITIVE_INT, metavar='N',
                   help='train and test on seeded random subsets of N images each (quick runs)')
    p.add_argument('--stop-after', dest='stop_after', default=None, type=POSITIVE_INT,
                   metavar='EPOCHS', help='stop after this many epochs of this invocation, '
                   'checkpoints written (continue with --resume last.t7)')
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    # Which options were typed (the rest may come from a resumed checkpoint).
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    args.given = set(vars(parser.parse_args(argv)))
    if args.test_only and not args.resume:
        parser.error('--test_only needs --resume NAME')
    return args


# ----------------------------------------------------------------------------- building
def adopt_checkpoint_config(args, state, say=print):
    """On --resume, take the run's own options from the checkpoint unless typed again."""
    stored = state.get('config') or {}
    adopted = []
    for key, value in stored.items():
        if key in NOT_RESUMED or key in args.given or not hasattr(args, key):
            continue
        if getattr(args, key) != value and key not in COMPONENTS:   # those: the method line
            adopted.append(f'{key}={value}')
        setattr(args, key, value)
    if adopted:
        say('options from the checkpoint: ' + ' '.join(adopted))


# ----------------------------------------------------------------------------- steps of a run
@dataclass
class Run:
    """What the steps of a run share."""
    args: argparse.Namespace
    world: World
    net: torch.nn.Module               # DistributedDataParallel-wrapped with several processes
    bank: object                       # MemoryBank, or None (isif)
    anchors: object                    # ANsDiscovery, or None
    pipeline: object
    train_labels: torch.Tensor
    num_classes: int
    optimizer: object = None
    trainer: object = None
    log: RunLog = None
    status: dict = None                # where the run is, its last and best accuracy

    @property
    def model(self):
        return getattr(self.net, 'module', self.net)


def evaluate(run):
    """kNN top-1 and top-5 of the test set against the bank, or against training embeddings
    recomputed with the test transform (--knn-features recompute, or runs without a bank).
    With several processes each embeds a share of the images and the counts are summed."""
    args, world, model = run.args, run.world, run.model
    cuda = next(model.parameters()).device.type == 'cuda'
    bf16, show = args.precision == 'bf16', not args.quiet and world.main
    if run.bank is not None and args.knn_features == 'bank':
        train_features = run.bank.memory
    else:
        count = len(run.train_labels)
        batches = run.pipeline.eval_batches('train', world.shard(count))
        features, _ = embed(model, progress(batches, desc='embed train', enabled=show), bf16,
                            cuda)
        train_features = world.gather_rows(features, count)
    count = run.pipeline.num_test
    batches = run.pipeline.eval_batches('test', world.shard(count))
    test_features, test_targets = embed(model, progress(batches, desc='embed test',
                                                        enabled=show), bf16, cuda)
    correct = knn_correct(test_features, test_targets, train_features, run.train_labels,
                          run.num_classes, args.knn_k, args.knn_sigma)
    top1, top5 = (world.sum(correct) / count).tolist()
    return top1, top5


def discover_anchors(run, round_index):
    """This round's anchors, found on rank 0 and copied to the others."""
    start = time.time()
    if run.world.main:
        run.anchors.update(round_index, run.bank.memory, run.bank.temperature, run.train_labels)
    broadcast_anchors(run.anchors, round_index, run.world)
    consistency, seconds = 100 * float(run.anchors.consistency), time.time() - start
    n, count = run.anchors.num_entries, run.anchors.num_anchors
    run.log.line(f'round {round_index}: {count} anchors ({100 * count / n:.1f}% of {n}), label '
                 f'consistency of (anchor, neighbour) pairs {consistency:.2f}% ({seconds:.1f} s)')
    run.log.round(dict(round=round_index, anchors=count, consistency=consistency,
                       seconds=seconds), entropy=run.anchors.entropy)


def save_checkpoints(run, is_best, next_position):
    """last.t7 (to continue from `next_position`), and ckpt.t7 when the kNN is the best yet.
    Rank 0 only; every write is atomic."""
    if not run.world.main:
        return
    args, status = run.args, run.status
    state = ckpt.model_state(run.model, run.bank, run.anchors, status['acc'], status['round'],
                             status['epoch'])
    state['config'] = {k: v for k, v in vars(args).items() if k != 'given'}
    if is_best:
        ckpt.save_atomic(state, os.path.join(args.model_dir, 'ckpt.t7'))
    state.update(optimizer=run.optimizer.state_dict(), rng=ckpt.rng_state(), next=next_position,
                 best={k: status[f'best_{k}'] for k in ('acc', 'round', 'epoch')})
    ckpt.save_atomic(state, os.path.join(args.model_dir, 'last.t7'))


def restore_progress(run, state):
    """Where a resumed run continues (round, epoch, and step within it after a stop signal),
    and its best so far; fresh runs start at (0, 0, 0)."""
    # best_acc starts below any accuracy, so the first epoch always writes ckpt.t7
    status = dict(round=0, epoch=0, step=0, loss_sums=None, acc=0.0, best_acc=-1.0,
                  best_round=-1, best_epoch=-1)
    if state is not None:
        if 'optimizer' in state:
            run.optimizer.load_state_dict(state['optimizer'])
            ckpt.set_rng_state(state.get('rng'))
        nxt = state.get('next', {'round': state['round'], 'epoch': state['epoch'] + 1})
        best = state.get('best', {'acc': state['acc'], 'round': state['round'],
                                  'epoch': state['epoch']})
        status.update(nxt, acc=state['acc'], saved=(state['round'], state['epoch']),
                      **{f'best_{k}': v for k, v in best.items()})
        where = f" step {status['step']}" if status['step'] else ''
        run.log.line(f"resuming at round {status['round']} epoch {status['epoch']}{where} "
                     f"(best so far {100 * status['best_acc']:.2f}%)", always=True)
    return status


def epoch_line(args, record):
    active = [name for name, on in (('and', args.bank), ('aug', args.aug_loss),
                                    ('ue', args.ue_loss)) if on]
    losses = ' '.join(f'{name} {record["loss"][name]:.4f}' for name in active)
    return (f"round {record['round']} epoch {record['epoch']:3d}/{args.epochs} | "
            f"lr {record['lr']:.5f} | ue weight {record['ue_weight']:.1f} | loss {losses} | "
            f"kNN top-1 {record['knn_top1']:.2f}% top-5 {record['knn_top5']:.2f}% | "
            f"best {record['best_top1']:.2f}% | {record['seconds']:.1f} s")


def train_epoch(run, round_index, epoch, stop):
    """Train one epoch (from the resumed step if any); None when a stop signal ended it early
    (last.t7 then holds the step to continue from), else the epoch's record."""
    args, status = run.args, run.status
    start = time.time()
    first_step, sums = status.pop('step', 0), status.pop('loss_sums', None)
    lr, weight = learning_rate(args.lr, epoch), ue_weight(epoch)
    set_learning_rate(run.optimizer, lr)
    steps = run.pipeline.steps_per_epoch
    batches = progress(run.pipeline.train_batches(round_index, epoch, first_step),
                       total=steps - first_step, desc=f'round {round_index} epoch {epoch}',
                       enabled=not args.quiet and run.world.main)
    try:
        result = run.trainer.train_epoch(batches, weight, TRAIN_LOG_EVERY, first_step, sums,
                                         stop)
    except NonFiniteLoss as bad:
        saved = status.get('saved')
        kept = (f'{args.model_dir}/last.t7 still holds the last good epoch (round {saved[0]} '
                f'epoch {saved[1]})' if saved else 'no checkpoint had been written yet')
        raise UserError(f'non-finite loss (NaN or infinite) at round {round_index} epoch '
                        f'{epoch} step {bad.step}: stopped; {kept}; a lower --lr may '
                        f'help') from None
    if result.stopped:
        status.update(round=round_index, epoch=epoch)
        save_checkpoints(run, False, dict(round=round_index, epoch=epoch, step=result.steps,
                                          loss_sums=result.sums))
        run.log.line(f'stopped by {stop.name} at round {round_index} epoch {epoch} step '
                     f'{result.steps}: last.t7 written; continue with --resume last.t7',
                     always=True)
        return None
    top1, top5 = evaluate(run)
    is_best = top1 > status['best_acc']
    status.update(round=round_index, epoch=epoch, acc=top1)
    if is_best:
        status.update(best_acc=top1, best_round=round_index, best_epoch=epoch)
    following = (round_index, epoch + 1) if epoch + 1 < args.epochs else (round_index + 1, 0)
    save_checkpoints(run, is_best, dict(round=following[0], epoch=following[1], step=0))
    status['saved'] = (round_index, epoch)
    global_epoch = round_index * args.epochs + epoch
    run.log.steps(global_epoch * steps, result.samples, lr)
    return dict(round=round_index, epoch=epoch, global_epoch=global_epoch, lr=lr,
                ue_weight=weight, loss=result.losses, knn_top1=100 * top1, knn_top5=100 * top5,
                best_top1=100 * status['best_acc'], seconds=time.time() - start)


def train_rounds(run, stop):
    """The rounds and epochs: anchors at each round's start, then train, evaluate, save and
    report every epoch. Returns False when a stop signal or --stop-after ended it early."""
    args, status = run.args, run.status
    epochs_run = 0
    for round_index in range(status['round'], args.rounds):
        first_epoch = status['epoch'] if round_index == status['round'] else 0
        resuming_mid_epoch = round_index == status['round'] and status.get('step', 0) > 0
        if round_index > 0 and first_epoch == 0 and not resuming_mid_epoch \
                and run.anchors is not None:
            discover_anchors(run, round_index)
        for epoch in range(first_epoch, args.epochs):
            record = train_epoch(run, round_index, epoch, stop)
            if record is None:
                return False
            run.log.epoch(record)
            run.log.line(epoch_line(args, record))
            epochs_run += 1
            if args.stop_after and epochs_run >= args.stop_after:
                run.log.line(f'stopping after {epochs_run} epochs (--stop-after); continue '
                             f'with --resume last.t7', always=True)
                return False
    return True


def test_only(run, state):
    top1, top5 = evaluate(run)
    where = f"round {state.get('round', '?')} epoch {state.get('epoch', '?')}"
    run.log.line(f'kNN accuracy of {run.args.resume} ({where}): top-1 {100 * top1:.2f}% '
                 f'top-5 {100 * top5:.2f}%', always=True)


# ----------------------------------------------------------------------------- the run
def setup(args, world):
    """Everything a run needs, built (and restored from --resume) in the same way on every
    process: the Run, and the checkpoint it was resumed from (or None)."""
    say = print if world.main else (lambda *a, **k: None)
    device = choose_device(args, world)
    state, path = None, None
    if args.resume:
        path = ckpt.resolve_path(args.model_dir, args.resume)
        state = ckpt.load(path)
        adopt_checkpoint_config(args, state, say)
    say(describe(args, resolve(args)))
    train, test = load_data(args)
    mean, std = normalisation(args, train)
    say(f'data: {len(train)} training and {len(test)} test images, {len(train.classes)} '
        f'classes, from {train.source}; {args.image_size} px, mean {mean} std {std}')
    net, bank, anchors = build_model(args, len(train), device)
    if state is not None:
        ckpt.restore_model(state, path, net, bank, anchors)
    pipeline = build_pipeline(args, train, test, device, mean, std, world)
    run = Run(args, world, distribute(args, net, world), bank, anchors, pipeline,
              torch.from_numpy(train.targets).to(device), len(train.classes))
    return run, state


def train(run, state):
    args, world = run.args, run.world
    problem = None
    if world.main:      # checked once, but every rank stops if it fails
        try:
            ckpt.prepare_model_dir(args.model_dir,
                                   3 * ckpt.estimated_size(run.model, run.bank, run.anchors))
        except UserError as err:
            problem = str(err)
    problem = world.share(problem)
    if problem:
        raise UserError(problem)
    run.optimizer = build_optimizer(args, run.net)
    run.trainer = build_trainer(args, run.net, run.bank, run.anchors, run.optimizer, world)
    args.name = args.name or (f'{args.method}-{args.dataset}-{args.network}-'
                              f'{time.strftime("%Y%m%d-%H%M%S")}')
    run.log = RunLog(args.model_dir, args.log_dir, args.name, args.tensorboard, args.quiet,
                     enabled=world.main)
    run.status = restore_progress(run, state)
    where = f'{args.model_dir}/log.jsonl' + (f' and {args.log_dir}/{args.name}'
                                             if run.log.writer is not None else '')
    run.log.line(f'training {args.network} on {args.dataset} ({run.pipeline.device}, '
                 f'{world.size} process{"es" if world.size > 1 else ""}, {args.pipeline} '
                 f'pipeline, {args.precision}, compile {args.compile}): {args.rounds} rounds x '
                 f'{args.epochs} epochs, {run.pipeline.steps_per_epoch} steps of '
                 f'{args.batch_size} images; logs in {where}', always=True)
    with StopSignals() as stop:
        finished = train_rounds(run, stop)
    run.log.close()
    status = run.status
    if finished:
        run.log.line(f"done: best kNN top-1 {100 * status['best_acc']:.2f}% (round "
                     f"{status['best_round']} epoch {status['best_epoch']}, best-on-test as "
                     f"released), final {100 * status['acc']:.2f}%", always=True)


def main(argv=None):
    args = parse_args(argv)
    world = None
    try:
        world = init_world(args.device)
        run_once(args, world)
    except (UserError, datasets.DataError) as err:
        if world is None or world.main:
            print(f'error: {err}', file=sys.stderr)
        return 2
    finally:
        if world is not None:
            close_world(world)
    return 0


def run_once(args, world):
    """Train or evaluate. Returns only once the Run (and its DistributedDataParallel, whose
    reducer holds communication work) is gone, so the process group closes last."""
    run, state = setup(args, world)
    if args.test_only:
        run.log = RunLog(args.model_dir, args.log_dir, '', tensorboard=False, enabled=world.main)
        test_only(run, state)
    else:
        train(run, state)


if __name__ == '__main__':
    sys.exit(main())
