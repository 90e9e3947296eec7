"""The figures' command line: one PNG per command (default `fig/<command>-<run folders>.png`,
so the figures of other runs never land on one file; a file replaced is said so).

    python -m tools.visualize retrieval --ckpt and.t7 super-and.t7 --labels AND Super-AND
    python -m tools.visualize probabilities --ckpt checkpoint/ckpt.t7 --queries 4
    python -m tools.visualize embedding --ckpt checkpoint/ckpt.t7 --points 2000
    python -m tools.visualize curve --log checkpoint/run1 checkpoint/run2 --published

The figures themselves, importable from a notebook, are in `tools.figures`.
"""
import os
import sys

if not __package__:     # run by its path, python3 tools/<name>.py: the project's packages
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = 'tools'

from lib import cli  # noqa: E402
from tools.layout import (CELL, DEFAULT_OUT_DIR, DEFAULT_QUERIES, DEFAULT_TOPK, FRAME, LABEL_WIDTH,
                     TSNE_PERPLEXITY)

# The commands, each with its line in the help and in the list that no command prints.
COMMANDS = {
    'retrieval': 'top-k training images of test queries, wrong classes framed red',
    'probabilities': 'kNN class probabilities of test images',
    'embedding': '2-D map (t-SNE or UMAP) of the test embeddings, by class',
    'curve': 'kNN top-1 (the loss, for runs without labels) per epoch, from training logs',
}


def add_checkpoint_options(p):
    cli.add_checkpoint_option(p, many=True)
    p.add_argument('--labels', nargs='+', default=None,
                   help='one label per checkpoint (default: each checkpoint\'s method, with '
                        'its run\'s folder where two share a method)')
    cli.add_data_options(p)


def add_query_options(p):
    choice = p.add_mutually_exclusive_group()
    choice.add_argument('--queries', type=cli.POSITIVE_INT, default=DEFAULT_QUERIES, metavar='Q',
                        help='test images drawn at random with --seed (default: %(default)s)')
    choice.add_argument(*cli.spellings('--query-index'), dest='query_index', type=cli.NON_NEGATIVE_INT, nargs='+',
                        default=None, metavar='I',
                        help='these test-set positions instead of random ones')
    cli.add_features_option(p, '--features')


def add_common_options(p, seed=True):
    if seed:        # (the curve draws nothing at random)
        p.add_argument('--seed', type=int, default=0,
                       help='seed of the random choices of the figure (default: %(default)s)')
    p.add_argument('--out', default=None, metavar='PATH',
                   type=cli.output_file('.png', '.pdf', '.svg', '.jpg', '.jpeg'),
                   help=f'the figure to write, .png, .pdf, .svg or .jpg (default: '
                        f'{DEFAULT_OUT_DIR}/<command>-<run folders>.png)')


def build_parser():
    p = cli.Parser(prog='python -m tools.visualize',
                      description='Figures of trained Super-AND runs, written as PNG files.')
    commands = p.add_subparsers(dest='command', metavar='COMMAND')

    r = commands.add_parser('retrieval', help=COMMANDS['retrieval'],
                            description='For each query test image, its top-k most similar '
                            'training images under each checkpoint; wrong classes framed red '
                            '(the paper\'s Figure 1).')
    add_checkpoint_options(r)
    add_query_options(r)
    r.add_argument('--topk', type=cli.POSITIVE_INT, default=DEFAULT_TOPK,
                   help='retrievals per query (default: %(default)s)')
    r.add_argument('--cell', type=cli.POSITIVE_INT, default=CELL,
                   help='image side in pixels (nearest upscaling) (default: %(default)s)')
    r.add_argument('--frame', type=cli.NON_NEGATIVE_INT, default=FRAME,
                   help='frame width in pixels (default: %(default)s)')
    r.add_argument(*cli.spellings('--label-width'), dest='label_width', type=cli.POSITIVE_INT, default=LABEL_WIDTH,
                   help='width of the label strip in pixels (default: %(default)s)')
    add_common_options(r)

    q = commands.add_parser('probabilities', help=COMMANDS['probabilities'],
                            description='Bar charts of the weighted-kNN class probabilities '
                            '(scores / sum) of test images: true class green, a wrong top '
                            'class yellow.')
    add_checkpoint_options(q)
    add_query_options(q)
    add_common_options(q)

    e = commands.add_parser('embedding', help=COMMANDS['embedding'],
                            description='t-SNE (or UMAP) map of the network\'s test embeddings, '
                            'coloured by class, one panel per checkpoint.')
    add_checkpoint_options(e)
    e.add_argument('--method', default='tsne', choices=('tsne', 'umap'),
                   help='tsne (scikit-learn) or umap (needs umap-learn) (default: %(default)s)')
    e.add_argument('--perplexity', type=cli.POSITIVE_FLOAT, default=TSNE_PERPLEXITY,
                   help='t-SNE perplexity, clipped below the number of points '
                        '(default: %(default)s)')
    e.add_argument('--points', type=cli.POSITIVE_INT, default=None, metavar='N',
                   help='a random subset of N test images, drawn with --seed (default: all)')
    add_common_options(e)

    c = commands.add_parser('curve', help=COMMANDS['curve'],
                            description='kNN top-1 per epoch from JSON-lines training logs '
                            '(the mean loss for runs without labels), dashed lines at round '
                            'starts.')
    c.add_argument('--log', nargs='+', required=True, metavar='PATH',
                   help='log.jsonl files, or model dirs holding one')
    c.add_argument('--labels', nargs='+', default=None,
                   help='one label per log (default: the folder holding each log)')
    c.add_argument('--published', action='store_true',
                   help='add the released run\'s kNN curve (rounds 0-4) for reference')
    add_common_options(c, seed=False)
    return p


def parse_args(argv=None):
    """The flags; with no command, the list of commands (exit code 2)."""
    args = build_parser().parse_args(argv)
    if args.command is None:
        listed = '\n'.join(f'  {name:<14} {text}' for name, text in COMMANDS.items())
        print(f'usage: python -m tools.visualize COMMAND [options]  (COMMAND -h lists its '
              f'options)\n{listed}', file=sys.stderr)
        raise SystemExit(cli.one_line_error('no command given: choose one of '
                                            + ', '.join(COMMANDS)))
    return args


if __name__ == '__main__':
    cli.parse_first(parse_args)

# The engine, imported once the flags are known to be right (importing torch takes seconds).
import numpy as np  # noqa: E402

from lib.errors import UserError  # noqa: E402
from tools.figures import (DPI, check_same_test_set,  # noqa: E402
                           curve_figure, embedding_figure, plt, probabilities_figure,
                           retrieval_figure, select_queries, unlabeled_figure)
from lib.run_folder import BEST  # noqa: E402
from lib.run_log import epoch_records, log_path  # noqa: E402


def labels_for(names, labels, what):
    """`labels` when given (one per item), else the default `names`."""
    if labels is None:
        return names
    if len(labels) != len(names):
        raise UserError(f'--labels gives {len(labels)} labels; {what} given: {len(names)}')
    return labels


def load_checkpoints(args):
    """Trained objects of --ckpt, and their labels."""
    from lib.analysis import labels_of, load_for_analysis, unlabeled_text
    if args.labels is not None:
        labels_for(args.ckpt, args.labels, 'checkpoints')      # fail before the slow loading
    for path in args.ckpt:
        if not labels_of(path, args.data_root):
            raise UserError(unlabeled_figure(unlabeled_text(path, args.data_root)))
    checkpoints = []
    for path in args.ckpt:
        trained = load_for_analysis(path, args.data_root, args.subset, args.device)
        data = (f'{len(trained.train)} training / {len(trained.test)} test images, '
                f'{len(trained.train.classes)} classes' if trained.test is not None
                else f'{len(trained.train)} unlabeled images')
        print(f'{path}: {trained.config.method}, {data}'
              + ('' if trained.bank is not None else ' (no memory bank: network features)'))
        checkpoints.append(trained)
    methods = [t.config.method for t in checkpoints]
    named = [method if methods.count(method) == 1 else f'{method} ({run})'   # (told apart)
             for method, run in zip(methods, run_names(args.ckpt))]
    return checkpoints, labels_for(named, args.labels, 'checkpoints')


def queries_of(args, checkpoints):
    return select_queries(len(checkpoints[0].test), args.queries, args.query_index, args.seed)


def run_command(args):
    """Draw the figure of `args.command`; returns (figure, kind) with kind 'pil' or 'mpl'."""
    if args.command == 'curve':
        paths = [log_path(p) for p in args.log]
        names = [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths]
        labels = labels_for(names, args.labels, 'logs')
        logs = [(label, epoch_records(p)) for label, p in zip(labels, paths)]
        return curve_figure(logs, args.published), 'mpl'
    checkpoints, labels = load_checkpoints(args)
    check_same_test_set(checkpoints)
    if args.command == 'retrieval':
        return retrieval_figure(checkpoints, labels, queries_of(args, checkpoints), args.topk,
                                args.knn_features, args.cell, args.frame,
                                args.label_width), 'pil'
    if args.command == 'probabilities':
        return probabilities_figure(checkpoints, labels, queries_of(args, checkpoints),
                                    args.knn_features), 'mpl'
    if args.points is not None and args.points > len(checkpoints[0].test):
        print(f'note: --points {args.points} is more than the {len(checkpoints[0].test)} test '
              f'images: all of them are drawn')
    return embedding_figure(checkpoints, labels, args.method, args.seed, args.perplexity,
                            args.points), 'mpl'


def save(figure, kind, out):
    """Write the figure in the format `out` names (.png, .jpg, .pdf, .svg); matplotlib figures
    at DPI without bbox cropping, so the size stays the documented one; a PIL image (the
    retrieval grid) in a .pdf or .svg goes in as a picture of its pixels. Returns (width,
    height) in pixels (of the figure at DPI, for .pdf and .svg)."""
    if kind == 'pil':
        if not out.lower().endswith(('.pdf', '.svg')):
            with cli.writing(out):
                figure.save(out)
            return figure.size
        pixels = figure
        figure = plt.figure(figsize=(pixels.size[0] / DPI, pixels.size[1] / DPI), dpi=DPI)
        figure.figimage(np.asarray(pixels.convert('RGB')), resize=False)
    size = tuple(int(round(side)) for side in figure.get_size_inches() * DPI)
    try:
        with cli.writing(out):
            figure.savefig(out, dpi=DPI)
    finally:
        plt.close(figure)
    return size


def run_names(paths, logs=False):
    """Each run of `paths` named by its folder (the checkpoint's or the log's); a checkpoint
    other than its folder's ckpt.t7 with its own name added (run-last)."""
    names = []
    for path in paths:
        folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        name = os.path.basename(os.path.normpath(folder)) or 'run'
        names.append(name if logs or os.path.basename(path) in (BEST, '') else
                     f'{name}-{os.path.splitext(os.path.basename(path))[0]}')
    return names


def default_out(args):
    """fig/<command>-<runs>.png (`run_names`), so the figures of other runs never land on one
    file."""
    names = run_names(args.log if args.command == 'curve' else args.ckpt,
                      logs=args.command == 'curve')
    joined = '+'.join(dict.fromkeys(names))
    if len(joined) > 80:                        # many runs: their count, not their names
        joined = f'{len(names)}-runs'
    return os.path.join(DEFAULT_OUT_DIR, f'{args.command}-{joined}.png')


def draw(argv):
    args = parse_args(argv)
    out = args.out or default_out(args)
    figure, kind = run_command(args)
    wrote = cli.wrote_or_replaced(out)
    width, height = save(figure, kind, out)
    print(f'{wrote} {out} ({width} x {height} px)')


def main(argv=None):
    return cli.run(draw, argv)


if __name__ == '__main__':
    cli.exit_program(main())
