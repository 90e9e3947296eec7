"""Figures of trained runs: retrievals, kNN class probabilities, embedding maps, curves.

Each figure is one function of already-loaded objects (`lib.analysis.Trained` from
`load_trained`, log records from `lib.run_log.epoch_records`), so it can be drawn in a
notebook::

    from lib.analysis import load_trained
    from tools.figures import retrieval_figure, select_queries
    run = load_trained('checkpoint/ckpt.t7')
    image = retrieval_figure([run], ['Super-AND'], select_queries(len(run.test), 5))

`python -m tools.visualize` is their command line (one PNG per command, in `fig/`). Every
figure has a fixed, documented pixel size:

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

Features follow the kNN evaluation (docs/ALGORITHM.md section 7): test images are embedded by
the network in eval mode with the test transform, in float32; the training side is the memory
bank (`bank`, the default and the released protocol) or the network's embeddings of the
training images (`network`; runs without a bank always use those).
"""
import re
from dataclasses import dataclass

import matplotlib
matplotlib.use('Agg')    # files only: no display needed, and the same pixels everywhere
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib import font_manager, ft2font  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from datasets import shown  # noqa: E402

from lib.core.knn import class_scores, nearest  # noqa: E402
from lib.errors import UserError  # noqa: E402
from lib.published import (PUBLISHED_EPOCHS, PUBLISHED_EPOCHS_PER_ROUND,  # noqa: E402
                           PUBLISHED_TOP1)  # the released run's kNN curve (ALGORITHM.md 8)
from tools.layout import (CELL, DEFAULT_QUERIES, DEFAULT_TOPK, FRAME,  # noqa: E402
                          LABEL_WIDTH, TSNE_PERPLEXITY)

# ----------------------------------------------------------------------------- constants
# Retrieval grid (pixels; its CELL, FRAME and LABEL_WIDTH are in tools/layout.py).
GAP = 4                         # space between tiles and around the grid
QUERY_GAP = 12                  # extra space between the query and its retrievals
BACKGROUND = (255, 255, 255)
QUERY_FRAME = (0, 0, 255)       # blue
SAME_CLASS_FRAME = (200, 200, 200)   # light gray: the retrieval's class is the query's
NEUTRAL_FRAME = SAME_CLASS_FRAME     # retrievals without labels
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


def unlabeled_figure(why='a run on unlabeled images has none'):
    """The refusal of a figure of test images and classes, for a run without them (`why`)."""
    return (f'this figure shows test images and their classes, and {why} (python -m '
            f'tools.retrieve --figure draws the nearest images of unlabeled ones)')


def check_same_test_set(checkpoints):
    """Figures put checkpoints side by side on the same test images: refuse mixed test sets,
    and runs without labels (no test split)."""
    for trained in checkpoints:
        if trained.test is None:
            raise UserError(unlabeled_figure())
    first = checkpoints[0].test
    for trained in checkpoints[1:]:
        if not np.array_equal(trained.test.indexes, first.indexes) or \
                trained.test.classes != first.classes:
            raise UserError('the checkpoints\' test sets differ (dataset or --subset): pass '
                            'one --subset for all, or draw them separately')


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

    def frame_colours(self):
        return [frame_colour(self.query_class, cls) for cls in self.retrieved_classes]

    def caption(self):
        """(text, 'label' | 'detail') lines beside the query."""
        same = sum(cls == self.query_class for cls in self.retrieved_classes)
        return [(self.label, 'label'), (f'test #{self.query_index}', 'detail'),
                (self.class_names[self.query_class], 'detail'),
                (f'{same}/{len(self.retrieved)} same class', 'detail')]


@dataclass
class NeighbourRow:
    """One row of a grid without labels: a query image and its nearest gallery images."""
    name: str                   # the query's file name
    query: np.ndarray           # H x W x 3 uint8
    retrieved: list             # k arrays, most similar first
    similarities: list          # k cosines

    def frame_colours(self):
        return [NEUTRAL_FRAME] * len(self.retrieved)

    def caption(self):
        return [(self.name, 'label'),
                (f'cos {self.similarities[0]:.3f} .. {self.similarities[-1]:.3f}', 'detail')]


def frame_colour(query_class, retrieved_class):
    return SAME_CLASS_FRAME if retrieved_class == query_class else OTHER_CLASS_FRAME


# Every figure writes its text in the font matplotlib is configured with: DejaVu Sans, which it
# ships, unless a matplotlibrc says otherwise. DejaVu Sans covers Latin, Greek and Cyrillic; a
# character the font has no glyph for (CJK, say) would be drawn as an empty box, so a name
# shows it as its code point instead (写真.jpg as \u5199\u771f.jpg).
FONT_PATH = font_manager.findfont(font_manager.FontProperties())
GLYPHS = frozenset(ft2font.FT2Font(FONT_PATH).get_charmap())     # code points it can draw
ESCAPE = re.compile(r'(\\(?:x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}))')   # (split keeps it)


def figure_text(name):
    """A file, folder or run name as the figures write it: undecodable bytes as \\xNN
    (datasets.shown), characters without a glyph in FONT_PATH as \\uNNNN or \\UNNNNNNNN."""
    return ''.join(c if ord(c) in GLYPHS else
                   f'\\u{ord(c):04x}' if ord(c) <= 0xFFFF else f'\\U{ord(c):08x}'
                   for c in shown(name))


def plot_label(name):
    """`figure_text` for matplotlib, which would read $...$ as mathematics (and fail on $5_$)
    and leaves labels that start with _ out of a legend."""
    text = figure_text(name).replace('$', r'\$')
    return ' ' + text if text.startswith('_') else text


def _font(size):
    try:
        return ImageFont.truetype(FONT_PATH, size)
    except (OSError, ImportError):                  # a Pillow without FreeType
        return ImageFont.load_default()


def _fit(draw, text, font, width):
    """`text`, its middle replaced by an ellipsis where it would overflow `width` pixels: the
    start and the end of a name stay (photo_0001.jpg and photo_0002.jpg differ at the end),
    and an escape (\\u5199) is kept or left out whole."""
    if draw.textlength(text, font=font) <= width:
        return text
    # escapes whole, the text between them a character at a time (split: text, escape, ...)
    units = [unit for index, part in enumerate(ESCAPE.split(text))
             for unit in ([part] if index % 2 else part)]
    head, tail = units[:len(units) // 2], units[len(units) // 2:]
    length = lambda part: draw.textlength(''.join(part), font=font)   # noqa: E731
    while head or tail:             # the wider side gives up its innermost unit
        if head and length(head) >= length(tail):
            head.pop()
        else:
            tail.pop(0)
        fitted = ''.join(head) + '…' + ''.join(tail)
        if draw.textlength(fitted, font=font) <= width:
            return fitted
    return '…'


def _paste_tile(canvas, image, box, colour, cell):
    left, top, right, bottom = box
    ImageDraw.Draw(canvas).rectangle((left, top, right - 1, bottom - 1), fill=colour)
    frame = (right - left - cell) // 2
    tile = Image.fromarray(image)
    # Small images (CIFAR) are enlarged pixel by pixel; large photos are shrunk smoothly.
    smooth = tile.width > cell or tile.height > cell
    canvas.paste(tile.resize((cell, cell), Image.BICUBIC if smooth else Image.NEAREST),
                 (left + frame, top + frame))


def draw_retrieval(rows, cell=CELL, frame=FRAME, label_width=LABEL_WIDTH):
    """The grid of `rows` (RetrievalRow or NeighbourRow, all with the same number of
    retrievals) as an RGB PIL image of `RetrievalLayout(len(rows), topk, cell, frame).size`:
    the query framed blue, each retrieval framed light gray when of the query's class (or
    without labels), red otherwise."""
    layout = RetrievalLayout(len(rows), len(rows[0].retrieved), cell, frame,
                             label_width=label_width)
    canvas = Image.new('RGB', layout.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    text_width = label_width - 2 * layout.gap
    fonts = {'label': _font(LABEL_FONT_PX), 'detail': _font(DETAIL_FONT_PX)}
    for r, row in enumerate(rows):
        _paste_tile(canvas, row.query, layout.box(r, 0), QUERY_FRAME, cell)
        for c, (image, colour) in enumerate(zip(row.retrieved, row.frame_colours()), start=1):
            _paste_tile(canvas, image, layout.box(r, c), colour, cell)
        x, (_, y, _, bottom) = layout.gap, layout.box(r, 0)
        for text, kind in row.caption():
            font = fonts[kind]
            height = getattr(font, 'size', DETAIL_FONT_PX) + 4
            if y + height > bottom:      # small cells: keep the text inside its row
                break
            draw.text((x, y), _fit(draw, figure_text(text), font, text_width), fill=TEXT, font=font)
            y += height
    return canvas


def retrieval_rows(checkpoints, labels, query_indexes, topk=DEFAULT_TOPK, source='bank'):
    """RetrievalRows, row = query * len(checkpoints) + checkpoint, so the checkpoints' answers
    for one query sit on adjacent rows."""
    check_same_test_set(checkpoints)
    per_checkpoint = []
    for trained in checkpoints:
        if topk > trained.train.num_labelled:
            raise UserError(f'--topk {topk} exceeds the {trained.train.num_labelled} labelled '
                            f'training images')
        train_f, _ = trained.knn_training_side(source)
        test_f, _ = trained.embeddings('test')
        _, found = nearest(test_f[query_indexes], train_f, topk)
        per_checkpoint.append(found.cpu().numpy())
    rows = []
    for q, index in enumerate(query_indexes):
        for trained, label, found in zip(checkpoints, labels, per_checkpoint):
            train, test = trained.train, trained.test
            rows.append(RetrievalRow(label, index, test.images[index], int(test.targets[index]),
                                     [train.images[j] for j in found[q]],
                                     [int(train.targets[j]) for j in found[q]], test.classes))
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
    train_f, train_y = trained.knn_training_side(source)
    test_f, _ = trained.embeddings('test')
    scores = class_scores(test_f[query_indexes], train_f, train_y.to(test_f.device).long(),
                          len(trained.train.classes), trained.config.knn_k,
                          trained.config.knn_sigma)
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


def classes_to_name(probabilities, true_class):
    """The classes whose bars get a name: all of them up to MAX_CLASS_NAMES, else (the names
    would overlap) the true class and the top 5 among the classes that got a vote (the others
    score 0, in no meaningful order)."""
    if len(probabilities) <= MAX_CLASS_NAMES:
        return list(range(len(probabilities)))
    top = [c for c in np.argsort(-probabilities, kind='stable')[:5].tolist()
           if probabilities[c] > 0]
    return sorted({true_class, *top})


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
    classes = [plot_label(name) for name in test.classes]    # any folder name the OS allows
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
        for c, label in enumerate(map(plot_label, labels)):
            ax, p = axes[q, c + 1], probabilities[c][q]
            top = int(np.argmax(p))
            ax.bar(range(len(classes)), p, color=bar_colours(p, true), width=0.8)
            ax.set_ylim(0, 1)
            if c == 0:
                ax.set_ylabel('kNN probability', fontsize=7)
            ax.tick_params(axis='y', labelsize=7)
            named = classes_to_name(p, true)
            ax.set_xticks(named)
            ax.set_xticklabels([classes[i] for i in named], rotation=60, ha='right', fontsize=7)
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
            ax.scatter(xy[mask, 0], xy[mask, 1], s=marker, color=colours[cls],
                       label=plot_label(name), linewidths=0)
        ax.set_title(f'{plot_label(label)} ({method}, {len(chosen)} test images)', fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    if len(test.classes) <= MAX_CLASS_NAMES:
        handles, names = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, names, loc='outside right upper', fontsize=8, markerscale=2,
                   frameon=False)
    return fig


# ----------------------------------------------------------------------------- 4. curve
def round_starts(records):
    """global_epoch of each record whose round differs from the previous record's."""
    return [b['global_epoch'] for a, b in zip(records, records[1:])
            if b.get('round') != a.get('round')]


def published_curve():
    """(global epochs, kNN top-1 %) of the released run (docs/ALGORITHM.md 8), rounds 0..4."""
    xs = [PUBLISHED_EPOCHS_PER_ROUND * r + e for r in range(len(PUBLISHED_TOP1))
          for e in PUBLISHED_EPOCHS]
    return xs, [v for values in PUBLISHED_TOP1 for v in values]


def curve_metric(logs):
    """'knn_top1' when every log has kNN accuracies, else 'loss' (runs without labels)."""
    return 'knn_top1' if all(r.get('knn_top1') is not None for _, records in logs
                             for r in records) else 'loss'


def curve_values(records, metric):
    """The metric per epoch record; 'loss' is the objective SGD minimised that epoch, each
    part (an epoch mean) times its weight that epoch (an unweighted sum would show the UE loss
    counting while its weight is still 0)."""
    if metric == 'knn_top1':
        return [r['knn_top1'] for r in records]
    totals = []
    for record in records:
        weights = weights_of(record)
        totals.append(sum(value * weights[name] for name, value in record['loss'].items()))
    return totals


def weights_of(record):
    """{loss name: weight} of an epoch record; logs written before `weights` was recorded
    kept only the UE loss's (`ue_weight`), the others weighing 1."""
    if 'weights' in record:
        return record['weights']
    return {name: record.get('ue_weight', 1.0) if name == 'ue' else 1.0
            for name in record['loss']}


def curve_figure(logs, published=False):
    """kNN top-1 (%) per global epoch (or, for runs without labels, the weighted loss), one line
    per (label, epoch records) in `logs`, dashed vertical lines in the line's colour where its
    rounds start; `published` adds the released run's kNN curve."""
    metric = curve_metric(logs)
    fig, ax = plt.subplots(figsize=CURVE_SIZE_IN, dpi=DPI, layout='constrained')
    for label, records in logs:
        line, = ax.plot([r['global_epoch'] for r in records], curve_values(records, metric),
                        marker='.' if len(records) <= 50 else None, label=plot_label(label))
        for x in round_starts(records):
            ax.axvline(x, color=line.get_color(), linestyle='--', linewidth=0.8, alpha=0.6)
    if published and metric == 'knn_top1':
        xs, ys = published_curve()
        ax.plot(xs, ys, color='black', linestyle=':', marker='o', markersize=3,
                label='published (Super-AND paper, released code)')
        for r in range(1, len(PUBLISHED_TOP1)):
            ax.axvline(PUBLISHED_EPOCHS_PER_ROUND * r, color='black', linestyle='--',
                       linewidth=0.8, alpha=0.3)
    ax.set_xlabel('epoch (all rounds); dashed lines: round starts')
    ax.set_ylabel('kNN top-1 (%)' if metric == 'knn_top1' else
                  'training loss (parts x their weights)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return fig


if __name__ == '__main__':
    import sys
    print('error: tools.figures is the library of the figures (import it in a notebook); their '
          'command line is: python -m tools.visualize COMMAND, with COMMAND one of retrieval, '
          'probabilities, embedding, curve', file=sys.stderr)
    sys.exit(2)
