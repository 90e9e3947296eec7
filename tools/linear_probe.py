"""Linear evaluation: a linear classifier trained on frozen features of a checkpoint.

    python -m tools.linear_probe --ckpt checkpoint/ckpt.t7 --data-root data

The network embeds the training and test splits once (eval mode, the test transform; features
cached in memory), then a softmax-regression layer is trained on the training features with
SGD (momentum 0.9, cosine learning rate, mini-batches from a seeded shuffle) and its test top-1
and top-5 are reported. `--layer backbone` (default) probes the concatenated pooled trunk
outputs, the input of the network's last linear layer (1024-d for ResNet18 with Sobel);
`--layer embedding` the L2-normalised 128-d embedding kNN uses. Features are standardised with
the training split's mean and std.
"""
import os
import sys

if not __package__:     # run by its path, python3 tools/<name>.py: the project's packages
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = 'tools'

from lib import cli  # noqa: E402

PROBE_DEFAULTS = dict(epochs=50, lr=0.1, batch_size=256, weight_decay=0.0, seed=0)


def build_parser():
    d = PROBE_DEFAULTS
    p = cli.Parser(prog='python -m tools.linear_probe',
                   description='Linear probe on frozen features of a checkpoint.')
    cli.add_checkpoint_option(p)
    cli.add_data_options(p)
    p.add_argument('--layer', default='backbone', choices=('backbone', 'embedding'),
                   help='features probed: the trunk\'s pooled outputs (the input of the last '
                        'linear layer) or the 128-d embedding (default: %(default)s)')
    p.add_argument('--epochs', type=cli.POSITIVE_INT, default=d['epochs'],
                   help='passes over the training features (default: %(default)s)')
    p.add_argument('--lr', type=cli.POSITIVE_FLOAT, default=d['lr'],
                   help='SGD learning rate, cosine-annealed to 0 (default: %(default)s)')
    p.add_argument(*cli.spellings('--batch-size'), dest='batch_size', type=cli.POSITIVE_INT,
                   default=d['batch_size'],
                   help='training features per SGD step (default: %(default)s)')
    p.add_argument(*cli.spellings('--weight-decay'), dest='weight_decay', type=cli.NON_NEGATIVE_FLOAT,
                   default=d['weight_decay'],
                   help='SGD weight decay of the linear layer (default: %(default)s)')
    p.add_argument('--seed', type=int, default=d['seed'],
                   help='initialisation and shuffling (default: %(default)s)')
    cli.add_quiet_option(p)
    return p


if __name__ == '__main__':
    cli.parse_first(lambda: build_parser().parse_args())

# The engine, imported once the flags are known to be right (importing torch takes seconds).
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lib.core.knn import topk_correct  # noqa: E402
from lib.progress import progress_bar  # noqa: E402


@torch.no_grad()
def probe_features(trained, split, layer, show=False):
    """(N x F features, N targets) of a split's labelled images: the embedding, or the input
    of `net.linear` (`show`: a progress bar on a terminal)."""
    if layer == 'embedding':
        return trained.embeddings(split, show=show, labelled=True)
    captured = []
    hook = trained.net.linear.register_forward_hook(
        lambda module, inputs, output: captured.append(inputs[0].float()))
    try:
        _, targets = trained.embeddings(split, show=show, labelled=True)
    finally:
        hook.remove()
    return torch.cat(captured), targets


def train_linear_probe(train_x, train_y, test_x, test_y, num_classes, epochs=50, lr=0.1,
                       batch_size=256, weight_decay=0.0, seed=0, show=False):
    """Softmax regression on fixed features; returns test top-1/top-5 and train top-1 (%).

    train_x: N x F, train_y: N, test_x: M x F, test_y: M (on one device). `show`: a progress
    bar over the epochs on a terminal.
    """
    generator = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    layer = torch.nn.Linear(train_x.shape[1], num_classes).to(train_x.device)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.01)
        layer.bias.zero_()
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9,
                                weight_decay=weight_decay)
    steps_per_epoch = max(1, -(-len(train_x) // batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    for _ in progress_bar(range(epochs), desc='linear probe', enabled=show, unit='epoch'):
        order = torch.randperm(len(train_x), generator=generator).to(train_x.device)
        for start in range(0, len(train_x), batch_size):
            batch = order[start:start + batch_size]
            loss = F.cross_entropy(layer(train_x[batch]), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():
        # Class probabilities, every one above 0 (the tiniest float where one underflows), so
        # the kNN's top-k counts every class, in the logits' order.
        tiny = torch.finfo(torch.float32).tiny
        test_p, train_p = (layer(x).softmax(1).clamp_min(tiny) for x in (test_x, train_x))
        top1, top5 = (c.item() / len(test_y) for c in topk_correct(test_p, test_y))
        train_top1 = topk_correct(train_p, train_y, ks=(1,))[0].item() / len(train_y)
    return dict(top1=100 * top1, top5=100 * top5, train_top1=100 * train_top1)


def probe(argv):
    from lib.analysis import labels_of, load_for_analysis, unlabeled_text
    from lib.console import top5_note
    from lib.errors import UserError
    args = build_parser().parse_args(argv)

    def unlabeled():
        return UserError(f'a linear probe trains on labelled training images, and '
                         f'{unlabeled_text(args.ckpt, args.data_root)}')
    if not labels_of(args.ckpt, args.data_root):       # said before the data is read
        raise unlabeled()
    trained = load_for_analysis(args.ckpt, args.data_root, args.subset, args.device)
    if trained.test is None:
        raise unlabeled()
    if not args.quiet:
        print(f'linear probe of {args.ckpt}: embedding {trained.train.num_labelled} training and '
              f'{len(trained.test)} test images ({trained.device.type}), then '
              f'{cli.plural(args.epochs, "epoch")} of SGD on the {args.layer} features',
              flush=True)
    show = not args.quiet
    torch.manual_seed(args.seed)
    train_x, train_y = probe_features(trained, 'train', args.layer, show)
    test_x, test_y = probe_features(trained, 'test', args.layer, show)
    result = train_linear_probe(train_x, train_y, test_x, test_y, len(trained.train.classes),
                                args.epochs, args.lr, args.batch_size, args.weight_decay,
                                args.seed, show)
    print(f'linear probe on {args.layer} features ({train_x.shape[1]}-d, {len(train_x)} train / '
          f'{len(test_x)} test images, {cli.plural(args.epochs, "epoch")}): test top-1 '
          f'{result["top1"]:.2f}% top-5 {result["top5"]:.2f}% (train top-1 '
          f'{result["train_top1"]:.2f}%)')
    note = top5_note(len(trained.train.classes))
    if note:
        print(note)


def main(argv=None):
    return cli.run(probe, argv)


if __name__ == '__main__':
    cli.exit_program(main())
