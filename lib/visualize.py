"""Figures of trained runs: retrievals, kNN class probabilities, embedding maps, kNN curves.

    python -m lib.visualize retrieval --ckpt and.t7 super-and.t7 --labels AND Super-AND
    python -m lib.visualize probabilities --ckpt checkpoint/ckpt.t7 --queries 4
    python -m lib.visualize embedding --ckpt checkpoint/ckpt.t7 --points 2000
    python -m lib.visualize curve --log checkpoint/run1 checkpoint/run2 --published

Each command writes one PNG (default `fig/<command>.png`) through one function below that takes
already-loaded objects (`lib.build.Trained`, log records), so the figures can also be drawn from
a notebook or a test. Every figure has a fixed, documented pixel size:

- retrieval (PIL, pixel-exact; see `RetrievalLayout`), with tile = cell + 2 * frame:
      width  = label_width + gap + (topk + 1) * (tile + gap) + QUERY_GAP
      height = gap + rows * (tile + gap),   rows = queries x checkpoints
  (defaults: cell 64, frame 4, gap GAP = 4, QUERY_GAP = 12, label_width 120, so 5 queries x 2
  checkpoints x top-10 give 972 x 764 px)
- probabilities (matplotlib, DPI = 100):
      width  = DPI * (THUMB_WIDTH_IN + checkpoints * PANEL_WIDTH_IN) = 150 + 350 * checkpoints
      height = DPI * queries * ROW_HEIGHT_IN                        = 250 * queries
- embedding: width = DPI * (checkpoints * MAP_SIDE_IN + LEGEND_WIDTH_IN) = 500 * checkpoints + 150,
             height = DPI * MAP_SIDE_IN = 500
- curve: DPI * CURVE_SIZE_IN = 900 x 450

Features follow the kNN evaluation (SPEC 7): test images are embedded by the network in eval
mode with the test transform; the training side is the memory bank (`--features bank`, the
default and the released protocol) or the network's recomputed embeddings (`network`; runs
without a bank always use those).
"""
import argparse
import json
import os
import sys
from dataclasses import dataclass

import matplotlib
matplotlib.use('Agg')    # files only: no display needed, and the same pixels everywhere
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from .config import (PUBLISHED_EPOCHS, PUBLISHED_EPOCHS_PER_ROUND,  # noqa: E402
                     PUBLISHED_TOP1)  # SPEC 8: the released run's kNN curve
from .errors import UserError  # noqa: E402
from .knn import knn_scores  # noqa: E402

# ----------------------------------------------------------------------------- constants
DEFAULT_QUERIES = 5
DEFAULT_TOPK = 10
DEFAULT_OUT_DIR = 'fig'

# Retrieval grid (pixels).
CELL = 64                       # image side after nearest-neighbour upscaling
FRAME = 4                       # frame width around every image
GAP = 4                         # space between tiles and around the grid
QUERY_GAP = 12                  # extra space between the query and its retrievals
LABEL_WIDTH = 120               # the label strip on the left
BACKGROUND = (255, 255, 255)
QUERY_FRAME = (0, 0, 255)       # blue
SAME_CLASS_FRAME = (200, 200, 200)   # light gray: the retrieval's class is the query's
OTHER_CLASS_FRAME = (255, 0, 0)      # red: a wrong retrieval
TEXT = (0, 0, 0)
LABEL_FONT_PX, DETAIL_FONT_PX = 14, 11

# matplotlib figures: sizes in inches that are exact in binary, so size x DPI is an exact integer
# (Agg truncates the product to whole pixels).
DPI = 100
THUMB_WIDTH_IN = 1.5            # probabilities: the image column
PANEL_WIDTH_IN = 3.5            # probabilities: one bar chart
ROW_HEIGHT_IN = 2.5             # probabilities: one image's row
MAP_SIDE_IN = 5.0               # embedding: one square map
LEGEND_WIDTH_IN = 1.5           # embedding: the class legend on the right
CURVE_SIZE_IN = (9.0, 4.5)
BAR_TRUE = 'tab:green'          # the true class
BAR_WRONG_TOP = 'gold'          # the predicted class when it is wrong
BAR_OTHER = 'lightgray'
MAX_CLASS_NAMES = 20            # more classes: bar ticks name only the true and top-5 classes,
                                # and the embedding map has no legend (it would not fit)

TSNE_PERPLEXITY = 30.0          # scikit-learn's default; clipped below the number of points
TSNE_EXACT_BELOW = 500          # fewer points: exact t-SNE gradients (O(N^2), but faster than
                                # Barnes-Hut's tree and thread overhead at this size)


# ----------------------------------------------------------------------------- shared helpers
def select_queries(num_test, count=DEFAULT_QUERIES, indexes=None, seed=0):
    """Test-set positions to show: `indexes` as given (checked), else `count` drawn with `seed`
    (sorted, so the figure follows the dataset order)."""
    if indexes is not None:
        bad = [i for i in indexes if not 0 <= i < num_test]
        if bad:
            raise UserError(f'query index {bad[0]} is out of range: the test set has {num_test} '
                            f'images (0..{num_test - 1})')
        return list(indexes)
    if count > num_test:
        raise UserError(f'--queries {count}, but the test set has only {num_test} images')
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(num_test, generator=generator)[:count].tolist())


def training_features(trained, source='bank'):
    """(N x D, N labels) the kNN votes with: the bank, or recomputed embeddings ('network');
    runs without a bank always recompute."""
    if source == 'bank' and trained.bank is not None:
        return trained.embeddings('train', 'bank')
    return trained.embeddings('train', 'network')


def check_same_test_set(checkpoints):
    """Figures put checkpoints side by side on the same test images: refuse mixed test sets."""
    first = checkpoints[0].test
    for trained in checkpoints[1:]:
        if not np.array_equal(trained.test.indexes, first.indexes) or \
                trained.test.classes != first.classes:
            raise UserError('the checkpoints\' test sets differ (dataset or --subset): pass '
                            'one --subset for all, or draw them separately')


def nearest_training_images(query_features, train_features, k):
    """(Q x k similarities, Q x k training indexes), most similar first.
    query_features: Q x D, train_features: N x D (unit rows, so the dot product is the cosine)."""
    sims = query_features.float() @ train_features.float().t()      # Q x N
    return sims.topk(k, dim=1)


# ----------------------------------------------------------------------------- 1. retrieval
@dataclass
class RetrievalLayout:
    """Pixel geometry of the retrieval grid: a label strip, then per row the query and `topk`
    retrievals as framed tiles of side tile = cell + 2 * frame:

        x(col) = label_width + gap + col * (tile + gap) + (QUERY_GAP if col >= 1 else 0)
        y(row) = gap + row * (tile + gap)
        width  = label_width + gap + (topk + 1) * (tile + gap) + QUERY_GAP
        height = gap + rows * (tile + gap)

    Column 0 is the query, columns 1..topk its retrievals in rank order."""
    rows: int
    topk: int
    cell: int = CELL
    frame: int = FRAME
    gap: int = GAP
    label_width: int = LABEL_WIDTH

    @property
    def tile(self):
        return self.cell + 2 * self.frame

    @property
    def size(self):
        """(width, height) in pixels."""
        return (self.label_width + self.gap + (self.topk + 1) * (self.tile + self.gap) + QUERY_GAP,
                self.gap + self.rows * (self.tile + self.gap))

    def box(self, row, col):
        """(left, top, right, bottom) of tile (row, col), frame included, right/bottom
        exclusive (PIL's convention)."""
        left = self.label_width + self.gap + col * (self.tile + self.gap) + \
            (QUERY_GAP if col >= 1 else 0)
        top = self.gap + row * (self.tile + self.gap)
        return left, top, left + self.tile, top + self.tile


@dataclass
class RetrievalRow:
    """One row of the grid: a checkpoint's top-k training images for one test image."""
    label: str                  # the checkpoint's label
    query_index: int            # position in the test set
    query: np.ndarray           # H x W x 3 uint8
    query_class: int
    retrieved: list             # topk arrays H' x W' x 3 uint8, most similar first
    retrieved_classes: list     # topk ints
    class_names: list


def frame_colour(query_class, retrieved_class):
    return SAME_CLASS_FRAME if retrieved_class == query_class else OTHER_CLASS_FRAME


def _font(size):
    try:
        return ImageFont.load_default(size=size)     # scalable when Pillow has FreeType
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _fit(draw, text, font, width):
    """`text`, cut with an ellipsis where it would overflow `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + '…', font=font) > width:
        text = text[:-1]
    return text + '…'


def _paste_tile(canvas, image, box, colour, cell):
    left, top, right, bottom = box
    ImageDraw.Draw(canvas).rectangle((left, top, right - 1, bottom - 1), fill=colour)
    frame = (right - left - cell) // 2
    canvas.paste(Image.fromarray(image).resize((cell, cell), Image.NEAREST),
                 (left + frame, top + frame))


def draw_retrieval(rows, cell=CELL, frame=FRAME, label_width=LABEL_WIDTH):
    """The grid of `rows` (RetrievalRow, all with the same number of retrievals) as an RGB PIL
    image of `RetrievalLayout(len(rows), topk, cell, frame).size`: the query framed blue, each
    retrieval framed light gray when of the query's class, red otherwise."""
    layout = RetrievalLayout(len(rows), len(rows[0].retrieved), cell, frame,
                             label_width=label_width)
    canvas = Image.new('RGB', layout.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    label_font, detail_font = _font(LABEL_FONT_PX), _font(DETAIL_FONT_PX)
    text_width = label_width - 2 * layout.gap
    for r, row in enumerate(rows):
        _paste_tile(canvas, row.query, layout.box(r, 0), QUERY_FRAME, cell)
        for c, (image, cls) in enumerate(zip(row.retrieved, row.retrieved_classes), start=1):
            _paste_tile(canvas, image, layout.box(r, c), frame_colour(row.query_class, cls), cell)
        same = sum(cls == row.query_class for cls in row.retrieved_classes)
        lines = [(row.label, label_font),
                 (f'test #{row.query_index}', detail_font),
                 (row.class_names[row.query_class], detail_font),
                 (f'{same}/{len(row.retrieved)} same class', detail_font)]
        x, (_, y, _, bottom) = layout.gap, layout.box(r, 0)
        for text, font in lines:
            height = getattr(font, 'size', DETAIL_FONT_PX) + 4
            if y + height > bottom:      # small cells: keep the text inside its row
                break
            draw.text((x, y), _fit(draw, text, font, text_width), fill=TEXT, font=font)
            y += height
    return canvas


def retrieval_rows(checkpoints, labels, query_indexes, topk=DEFAULT_TOPK, source='bank'):
    """RetrievalRows, row = query * len(checkpoints) + checkpoint, so the checkpoints' answers
    for one query sit on adjacent rows."""
    check_same_test_set(checkpoints)
    per_checkpoint = []
    for trained in checkpoints:
        if topk > len(trained.train):
            raise UserError(f'--topk {topk} exceeds the {len(trained.train)} training images')
        train_f, _ = training_features(trained, source)
        test_f, _ = trained.embeddings('test')
        _, nearest = nearest_training_images(test_f[query_indexes], train_f, topk)
        per_checkpoint.append(nearest.cpu().numpy())
    rows = []
    for q, index in enumerate(query_indexes):
        for trained, label, nearest in zip(checkpoints, labels, per_checkpoint):
            train, test = trained.train, trained.test
            rows.append(RetrievalRow(label, index, test.images[index], int(test.targets[index]),
                                     [train.images[j] for j in nearest[q]],
                                     [int(train.targets[j]) for j in nearest[q]], test.classes))
    return rows


def retrieval_figure(checkpoints, labels, query_indexes, topk=DEFAULT_TOPK, source='bank',
                     cell=CELL, frame=FRAME, label_width=LABEL_WIDTH):
    """The paper's Figure 1: each test image of `query_indexes` and its `topk` most similar
    training images under each checkpoint (a PIL image; geometry in `RetrievalLayout`)."""
    rows = retrieval_rows(checkpoints, labels, query_indexes, topk, source)
    return draw_retrieval(rows, cell, frame, label_width)


# ----------------------------------------------------------------------------- 2. probabilities
@torch.no_grad()
def knn_probabilities(trained, query_indexes, source='bank'):
    """Q x C numpy: the weighted-kNN class scores of the chosen test images (the checkpoint's
    k and sigma), divided by their sum."""
    train_f, train_y = training_features(trained, source)
    test_f, _ = trained.embeddings('test')
    scores = knn_scores(test_f[query_indexes], train_f, train_y.to(test_f.device).long(),
                        len(trained.train.classes), trained.opts.knn_k, trained.opts.knn_sigma)
    return (scores / scores.sum(1, keepdim=True)).cpu().numpy()


def bar_colours(probabilities, true_class):
    """A colour per class: the true class green, the top class yellow when it is not the true
    one, the rest gray. probabilities: C values."""
    colours = [BAR_OTHER] * len(probabilities)
    top = int(np.argmax(probabilities))
    if top != true_class:
        colours[top] = BAR_WRONG_TOP
    colours[true_class] = BAR_TRUE
    return colours


def probabilities_size(num_queries, num_checkpoints):
    """(width, height) in pixels of the probabilities figure."""
    return (round(DPI * (THUMB_WIDTH_IN + num_checkpoints * PANEL_WIDTH_IN)),
            round(DPI * num_queries * ROW_HEIGHT_IN))


def probabilities_figure(checkpoints, labels, query_indexes, source='bank'):
    """A matplotlib figure: per test image a row, its thumbnail first, then per checkpoint a bar
    chart of the kNN class probabilities (true class green, a wrong top class yellow)."""
    check_same_test_set(checkpoints)
    probabilities = [knn_probabilities(t, query_indexes, source) for t in checkpoints]
    test = checkpoints[0].test
    classes = test.classes
    num_q, num_c = len(query_indexes), len(checkpoints)
    width, height = probabilities_size(num_q, num_c)
    fig, axes = plt.subplots(
        num_q, 1 + num_c, figsize=(width / DPI, height / DPI), dpi=DPI, squeeze=False,
        layout='constrained',
        gridspec_kw={'width_ratios': [THUMB_WIDTH_IN] + [PANEL_WIDTH_IN] * num_c})
    for q, index in enumerate(query_indexes):
        true = int(test.targets[index])
        thumb = axes[q, 0]
        thumb.imshow(test.images[index], interpolation='nearest')
        thumb.set_title(f'test #{index}\n{classes[true]}', fontsize=8)
        thumb.axis('off')
        for c, label in enumerate(labels):
            ax, p = axes[q, c + 1], probabilities[c][q]
            top = int(np.argmax(p))
            ax.bar(range(len(classes)), p, color=bar_colours(p, true), width=0.8)
            ax.set_ylim(0, 1)
            if c == 0:
                ax.set_ylabel('kNN probability', fontsize=7)
            ax.tick_params(axis='y', labelsize=7)
            # With many classes name only those that matter, or the labels overlap.
            shown = range(len(classes)) if len(classes) <= MAX_CLASS_NAMES else \
                sorted({true, *np.argsort(-p)[:5].tolist()})
            ax.set_xticks(list(shown))
            ax.set_xticklabels([classes[i] for i in shown], rotation=60, ha='right', fontsize=7)
            verdict = 'right' if top == true else 'wrong'
            ax.set_title(f'{label}: {classes[top]} ({p[top]:.2f}, {verdict})', fontsize=8)
    return fig


# ----------------------------------------------------------------------------- 3. embedding
def embedding_size(num_checkpoints):
    """(width, height) in pixels of the embedding figure."""
    return (round(DPI * (num_checkpoints * MAP_SIDE_IN + LEGEND_WIDTH_IN)),
            round(DPI * MAP_SIDE_IN))


def project_2d(features, method='tsne', seed=0, perplexity=TSNE_PERPLEXITY):
    """N x 2 numpy map of N x D features by t-SNE (perplexity clipped to N - 1, as scikit-learn
    needs it below N; exact gradients below TSNE_EXACT_BELOW points, Barnes-Hut above) or UMAP
    (the optional `umap-learn` package)."""
    x = features.detach().float().cpu().numpy()
    if len(x) < 3:
        raise UserError(f'a 2-D map needs at least 3 points, not {len(x)}')
    if method == 'umap':
        try:
            import umap
        except ImportError:
            raise UserError('--method umap needs the umap-learn package (pip install '
                            'umap-learn); --method tsne works without it') from None
        return umap.UMAP(n_components=2, random_state=seed).fit_transform(x)
    from sklearn.manifold import TSNE
    return TSNE(n_components=2, perplexity=min(perplexity, len(x) - 1), init='pca',
                method='exact' if len(x) < TSNE_EXACT_BELOW else 'barnes_hut',
                random_state=seed).fit_transform(x)


def class_colours(num_classes):
    """One RGBA colour per class: the tab10/tab20 palettes, a spread of 'turbo' beyond."""
    if num_classes <= 10:
        return plt.get_cmap('tab10').colors[:num_classes]
    if num_classes <= 20:
        return plt.get_cmap('tab20').colors[:num_classes]
    return plt.get_cmap('turbo')(np.linspace(0, 1, num_classes))


def embedding_figure(checkpoints, labels, method='tsne', seed=0, perplexity=TSNE_PERPLEXITY,
                     points=None):
    """2-D maps of the test embeddings (network, eval mode), one per checkpoint side by side,
    coloured by class. `points`: a seeded random subset of that many test images (t-SNE is
    quadratic in the number of points)."""
    check_same_test_set(checkpoints)
    test = checkpoints[0].test
    chosen = np.arange(len(test))
    if points is not None and points < len(test):
        chosen = np.asarray(select_queries(len(test), points, seed=seed))
    targets = test.targets[chosen]
    colours = class_colours(len(test.classes))
    width, height = embedding_size(len(checkpoints))
    fig, axes = plt.subplots(1, len(checkpoints), figsize=(width / DPI, height / DPI), dpi=DPI,
                             squeeze=False, layout='constrained')
    marker = 4 if len(chosen) > 2000 else 12 if len(chosen) > 200 else 30   # area, points^2
    for ax, trained, label in zip(axes[0], checkpoints, labels):
        features, _ = trained.embeddings('test')
        xy = project_2d(features[torch.from_numpy(chosen).to(features.device)], method, seed,
                        perplexity)
        for cls, name in enumerate(test.classes):
            mask = targets == cls
            ax.scatter(xy[mask, 0], xy[mask, 1], s=marker, color=colours[cls], label=name,
                       linewidths=0)
        ax.set_title(f'{label} ({method}, {len(chosen)} test images)', fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    if len(test.classes) <= MAX_CLASS_NAMES:
        handles, names = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, names, loc='outside right upper', fontsize=8, markerscale=2,
                   frameon=False)
    return fig


# ----------------------------------------------------------------------------- 4. curve
def log_path(path):
    """A log file, or a model dir holding `log.jsonl`."""
    return os.path.join(path, 'log.jsonl') if os.path.isdir(path) else path


def read_epoch_records(path):
    """The epoch records of a JSON-lines run log (other record types ignored), in training
    order. When global_epoch goes back (a run resumed from an earlier checkpoint, or a new run
    in the same folder), the later records replace the earlier ones from that epoch on."""
    path = log_path(path)
    if not os.path.isfile(path):
        raise UserError(f'no training log at {path} (written by main.py as model_dir/log.jsonl)')
    kept = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if record.get('type') != 'epoch':
                    continue
                record['global_epoch'], record['knn_top1'] = \
                    int(record['global_epoch']), float(record['knn_top1'])
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise UserError(f'{path} line {number} is not an epoch record '
                                f'({type(err).__name__}: {err})') from None
            while kept and kept[-1]['global_epoch'] >= record['global_epoch']:
                kept.pop()
            kept.append(record)
    if not kept:
        raise UserError(f'{path} holds no epoch records')
    return kept


def round_starts(records):
    """global_epoch of each record whose round differs from the previous record's."""
    return [b['global_epoch'] for a, b in zip(records, records[1:])
            if b.get('round') != a.get('round')]


def published_curve():
    """(global epochs, kNN top-1 %) of the released run (SPEC 8), rounds 0..4."""
    xs = [PUBLISHED_EPOCHS_PER_ROUND * r + e for r in range(len(PUBLISHED_TOP1))
          for e in PUBLISHED_EPOCHS]
    return xs, [v for values in PUBLISHED_TOP1 for v in values]


def curve_figure(logs, published=False):
    """kNN top-1 (%) per global epoch, one line per (label, epoch records) in `logs`, dashed
    vertical lines in the line's colour where its rounds start; `published` adds SPEC 8."""
    fig, ax = plt.subplots(figsize=CURVE_SIZE_IN, dpi=DPI, layout='constrained')
    for label, records in logs:
        line, = ax.plot([r['global_epoch'] for r in records], [r['knn_top1'] for r in records],
                        marker='.' if len(records) <= 50 else None, label=label)
        for x in round_starts(records):
            ax.axvline(x, color=line.get_color(), linestyle='--', linewidth=0.8, alpha=0.6)
    if published:
        xs, ys = published_curve()
        ax.plot(xs, ys, color='black', linestyle=':', marker='o', markersize=3,
                label='published (SPEC 8)')
        for r in range(1, len(PUBLISHED_TOP1)):
            ax.axvline(PUBLISHED_EPOCHS_PER_ROUND * r, color='black', linestyle='--',
                       linewidth=0.8, alpha=0.3)
    ax.set_xlabel('epoch (all rounds); dashed lines: round starts')
    ax.set_ylabel('kNN top-1 (%)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return fig


# ----------------------------------------------------------------------------- the CLI
class OneLineParser(argparse.ArgumentParser):
    """Parse errors become UserErrors, printed as one `error:` line (exit 2), no usage dump."""

    def error(self, message):
        raise UserError(message)


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f'{text} is not an integer >= 1')
    return value


def non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f'{text} is not an integer >= 0')
    return value


def add_checkpoint_options(p):
    p.add_argument('--ckpt', nargs='+', required=True, metavar='PATH',
                   help='checkpoint files (ckpt.t7, last.t7, ...): one row or column each')
    p.add_argument('--labels', nargs='+', default=None,
                   help='one label per checkpoint (default: each checkpoint\'s method)')
    p.add_argument('--data-root', dest='data_root', default=None,
                   help='data location (default: the one each checkpoint was trained with)')
    p.add_argument('--subset', type=positive_int, default=None, metavar='N',
                   help='override the checkpoints\' --subset (default: theirs)')
    p.add_argument('--device', default='auto', choices=('auto', 'cuda', 'cpu'),
                   help='auto = CUDA when present (default: %(default)s)')


def add_query_options(p):
    choice = p.add_mutually_exclusive_group()
    choice.add_argument('--queries', type=positive_int, default=DEFAULT_QUERIES, metavar='Q',
                        help='test images drawn at random with --seed (default: %(default)s)')
    choice.add_argument('--query-index', dest='query_index', type=non_negative_int, nargs='+',
                        default=None, metavar='I',
                        help='these test-set positions instead of random ones')
    p.add_argument('--features', default='bank', choices=('bank', 'network'),
                   help='training side of the similarity: the memory bank (the kNN of the '
                        'paper) or embeddings recomputed by the network; runs without a bank '
                        'always use network (default: %(default)s)')


def add_common_options(p):
    p.add_argument('--seed', type=int, default=0,
                   help='seed of the random choices of the figure (default: %(default)s)')
    p.add_argument('--out', default=None, metavar='PATH',
                   help=f'PNG to write (default: {DEFAULT_OUT_DIR}/<command>.png)')


def build_parser():
    p = OneLineParser(prog='python -m lib.visualize',
                      description='Figures of trained Super-AND runs, written as PNG files.')
    commands = p.add_subparsers(dest='command', required=True, metavar='COMMAND')

    r = commands.add_parser('retrieval', help='top-k training images of test queries',
                            description='For each query test image, its top-k most similar '
                            'training images under each checkpoint; wrong classes framed red '
                            '(the paper\'s Figure 1).')
    add_checkpoint_options(r)
    add_query_options(r)
    r.add_argument('--topk', type=positive_int, default=DEFAULT_TOPK,
                   help='retrievals per query (default: %(default)s)')
    r.add_argument('--cell', type=positive_int, default=CELL,
                   help='image side in pixels (nearest upscaling) (default: %(default)s)')
    r.add_argument('--frame', type=non_negative_int, default=FRAME,
                   help='frame width in pixels (default: %(default)s)')
    r.add_argument('--label-width', dest='label_width', type=positive_int, default=LABEL_WIDTH,
                   help='width of the label strip in pixels (default: %(default)s)')
    add_common_options(r)

    q = commands.add_parser('probabilities', help='kNN class probabilities of test images',
                            description='Bar charts of the weighted-kNN class probabilities '
                            '(scores / sum) of test images: true class green, a wrong top '
                            'class yellow.')
    add_checkpoint_options(q)
    add_query_options(q)
    add_common_options(q)

    e = commands.add_parser('embedding', help='2-D map of the test embeddings',
                            description='t-SNE (or UMAP) map of the network\'s test embeddings, '
                            'coloured by class, one panel per checkpoint.')
    add_checkpoint_options(e)
    e.add_argument('--method', default='tsne', choices=('tsne', 'umap'),
                   help='tsne (scikit-learn) or umap (needs umap-learn) (default: %(default)s)')
    e.add_argument('--perplexity', type=float, default=TSNE_PERPLEXITY,
                   help='t-SNE perplexity, clipped below the number of points '
                        '(default: %(default)s)')
    e.add_argument('--points', type=positive_int, default=None, metavar='N',
                   help='a random subset of N test images, drawn with --seed (default: all)')
    add_common_options(e)

    c = commands.add_parser('curve', help='kNN top-1 per epoch from training logs',
                            description='kNN top-1 per epoch from JSON-lines training logs, '
                            'dashed lines at round starts.')
    c.add_argument('--log', nargs='+', required=True, metavar='PATH',
                   help='log.jsonl files, or model dirs holding one')
    c.add_argument('--labels', nargs='+', default=None,
                   help='one label per log (default: the folder holding each log)')
    c.add_argument('--published', action='store_true',
                   help='add the released run\'s curve (SPEC 8, rounds 0-4) for reference')
    add_common_options(c)
    return p


def labels_for(names, labels, what):
    """`labels` when given (one per item), else the default `names`."""
    if labels is None:
        return names
    if len(labels) != len(names):
        raise UserError(f'--labels gives {len(labels)} labels; {what} given: {len(names)}')
    return labels


def load_checkpoints(args):
    """Trained objects of --ckpt, and their labels."""
    from .build import load_for_analysis
    if args.labels is not None:
        labels_for(args.ckpt, args.labels, 'checkpoints')      # fail before the slow loading
    checkpoints = []
    for path in args.ckpt:
        trained = load_for_analysis(path, args.data_root, args.subset, args.device)
        print(f'{path}: {trained.opts.method}, {len(trained.train)} training / '
              f'{len(trained.test)} test images, {len(trained.train.classes)} classes'
              + ('' if trained.bank is not None else ' (no memory bank: network features)'))
        checkpoints.append(trained)
    return checkpoints, labels_for([t.opts.method for t in checkpoints], args.labels,
                                   'checkpoints')


def queries_of(args, checkpoints):
    return select_queries(len(checkpoints[0].test), args.queries, args.query_index, args.seed)


def run_command(args):
    """Draw the figure of `args.command`; returns (figure, kind) with kind 'pil' or 'mpl'."""
    if args.command == 'curve':
        paths = [log_path(p) for p in args.log]
        names = [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths]
        labels = labels_for(names, args.labels, 'logs')
        logs = [(label, read_epoch_records(p)) for label, p in zip(labels, paths)]
        return curve_figure(logs, args.published), 'mpl'
    checkpoints, labels = load_checkpoints(args)
    if args.command == 'retrieval':
        return retrieval_figure(checkpoints, labels, queries_of(args, checkpoints), args.topk,
                                args.features, args.cell, args.frame, args.label_width), 'pil'
    if args.command == 'probabilities':
        return probabilities_figure(checkpoints, labels, queries_of(args, checkpoints),
                                    args.features), 'mpl'
    return embedding_figure(checkpoints, labels, args.method, args.seed, args.perplexity,
                            args.points), 'mpl'


def save(figure, kind, out):
    """Write the PNG; matplotlib figures at DPI without bbox cropping, so the size stays the
    documented one. Returns (width, height)."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if kind == 'pil':
        figure.save(out)
        return figure.size
    try:
        figure.savefig(out, dpi=DPI)
    finally:
        plt.close(figure)
    with Image.open(out) as written:
        return written.size


def main(argv=None):
    from datasets import DataError
    try:
        args = build_parser().parse_args(argv)
        out = args.out or os.path.join(DEFAULT_OUT_DIR, f'{args.command}.png')
        figure, kind = run_command(args)
        width, height = save(figure, kind, out)
    except (UserError, DataError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    print(f'wrote {out} ({width} x {height} px)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
