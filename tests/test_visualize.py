"""lib.visualize: each command's PNG and its pixel size, the retrieval frames, bar colours,
log reading and round starts, and one-line errors."""
import importlib.util
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import WITH_SOBEL, fast_args
from tools import figures as vis
from tools import visualize
from lib.errors import UserError
from lib.run_log import epoch_records
from lib.analysis import load_trained

RED, GRAY, BLUE = (255, 0, 0), (200, 200, 200), (0, 0, 255)


@pytest.fixture(scope='module')
def checkpoints(tiny_folder, tmp_path_factory):
    """{method: ckpt.t7 path} of 1-epoch runs of super-and and and on the tiny folder."""
    import main
    paths = {}
    for method in ('super-and', 'and'):
        model_dir = tmp_path_factory.mktemp(method)
        code = main.main(fast_args(tiny_folder, model_dir, *WITH_SOBEL, '--method', method,
                                   '--epochs', '1', '--rounds', '1', '--quiet',
                                   '--no-tensorboard'))
        assert code == 0
        paths[method] = str(model_dir / 'ckpt.t7')
    return paths


@pytest.fixture(scope='module')
def loaded(checkpoints, tiny_folder):
    """{method: Trained} of those checkpoints, for computing expectations independently."""
    return {method: load_trained(path, data_root=tiny_folder, device='cpu', workers=0)
            for method, path in checkpoints.items()}


def run(capsys, *argv):
    """lib.visualize.main in this process: (exit code, stdout, stderr)."""
    code = visualize.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def png_size(path):
    assert os.path.getsize(path) > 0
    with Image.open(path) as image:
        return image.size


# ----------------------------------------------------------------------------- retrieval
def test_retrieval_frames_exactly_the_wrong_retrievals_red(checkpoints, loaded, tiny_folder,
                                                           tmp_path, capsys):
    queries, topk, cell, frame = [0, 3, 9], 10, 40, 3
    methods = ['super-and', 'and']
    out = tmp_path / 'retrieval.png'
    code, _, err = run(capsys, 'retrieval', '--ckpt', *(checkpoints[m] for m in methods),
                       '--data-root', tiny_folder, '--device', 'cpu', '--query-index', *queries,
                       '--topk', topk, '--cell', cell, '--frame', frame, '--out', out)
    assert code == 0, err

    # The documented size: tile = cell + 2 frame; rows = queries x checkpoints.
    tile, rows = cell + 2 * frame, len(queries) * len(methods)
    width = vis.LABEL_WIDTH + vis.GAP + (topk + 1) * (tile + vis.GAP) + vis.QUERY_GAP
    height = vis.GAP + rows * (tile + vis.GAP)
    assert png_size(out) == (width, height)
    layout = vis.RetrievalLayout(rows, topk, cell, frame)
    assert layout.box(rows - 1, topk)[2:] == (width - vis.GAP, height - vis.GAP)

    image = np.asarray(Image.open(out).convert('RGB'))
    colours_seen = set()
    for c, method in enumerate(methods):
        # Expected neighbours, independently: bank similarities of the test embeddings.
        trained = loaded[method]
        test_f, _ = trained.embeddings('test')
        nearest = (test_f @ trained.bank.memory.t()).topk(topk, dim=1).indices
        for q, index in enumerate(queries):
            row = q * len(methods) + c
            query_class = trained.test.targets[index]
            for col in range(topk + 1):
                left, top, right, bottom = layout.box(row, col)
                if col == 0:
                    expected, shown = BLUE, trained.test.images[index]
                else:
                    j = int(nearest[index, col - 1])
                    expected = GRAY if trained.train.targets[j] == query_class else RED
                    shown = trained.train.images[j]
                colours_seen.add(expected)
                # Frame pixels on all four sides, in the middle of each side.
                middle = (left + right) // 2, (top + bottom) // 2
                for x, y in ((left + frame // 2, middle[1]), (right - 1 - frame // 2, middle[1]),
                             (middle[0], top + frame // 2), (middle[0], bottom - 1 - frame // 2)):
                    assert tuple(image[y, x]) == expected, (method, index, col)
                # Inside the frame: the image itself, upscaled by nearest neighbour.
                want = np.asarray(Image.fromarray(shown).resize((cell, cell), Image.NEAREST))
                inner = image[top + frame:bottom - frame, left + frame:right - frame]
                assert np.array_equal(inner, want), (method, index, col)
    assert colours_seen == {BLUE, GRAY, RED}        # both kinds of retrieval were checked


def test_names_the_font_cannot_draw_are_written_as_code_points(recwarn):
    """A file or class name in a script the figures' font lacks (CJK) is written as its code
    points, not as empty boxes; what the font has (Ü, Cyrillic) is written as it is."""
    import matplotlib.pyplot as plt
    assert vis.figure_text('写真Ü.png') == '\\u5199\\u771fÜ.png'
    assert vis.figure_text('кот') == 'кот'
    assert vis.figure_text(b'caf\xe9'.decode(errors='surrogateescape')) == 'caf\\xe9'

    def missing_glyphs(title):
        recwarn.clear()
        fig, ax = plt.subplots()
        ax.set_title(title)
        fig.canvas.draw()
        plt.close(fig)
        return [w for w in recwarn if 'missing from font' in str(w.message)]
    assert missing_glyphs('写真')                   # (what matplotlib does with the raw name)
    assert not missing_glyphs(vis.figure_text('写真'))


def test_names_cut_to_fit_keep_their_ends_and_whole_escapes():
    """A name too long for the retrieval grid's label strip keeps its start and its end (where
    photo_0001.jpg and photo_0002.jpg differ), and never half an escape."""
    from PIL import ImageDraw
    draw = ImageDraw.Draw(Image.new('RGB', (10, 10)))
    font = vis._font(13)
    fitted = [vis._fit(draw, vis.figure_text(name), font, 120)
              for name in ('写真_0001.jpg', '写真_0002.jpg', 'holiday_by_the_sea_0001.jpg')]
    assert fitted[0].startswith('\\u5199') and '…' in fitted[0]
    assert fitted[0].endswith('1.jpg') and fitted[1].endswith('2.jpg')
    assert fitted[2].startswith('holi') and fitted[2].endswith('1.jpg')
    for text in fitted:
        assert draw.textlength(text, font=font) <= 120
        # every backslash left starts a whole \uNNNN escape
        assert all(text[i + 1:i + 6].startswith('u') and len(text[i + 2:i + 6]) == 4
                   and all(c in '0123456789abcdef' for c in text[i + 2:i + 6])
                   for i, c in enumerate(text) if c == '\\')


def test_names_with_dollars_or_a_leading_underscore_reach_the_plots():
    """matplotlib reads $...$ as mathematics (a name like price_$5_$ would end the figure) and
    leaves labels that start with _ out of legends: names are plotted as they are."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    for name in ('price_$5_$', '_run', 'run'):
        ax.plot([0, 1], [0, 1], label=vis.plot_label(name))
    ax.set_title(vis.plot_label('price_$5_$'))
    legend = ax.legend()
    fig.canvas.draw()
    assert [t.get_text().strip() for t in legend.get_texts()] == ['price_\\$5_\\$', '_run', 'run']
    assert ax.title.get_text() == 'price_\\$5_\\$'
    plt.close(fig)
    fig, ax = plt.subplots()
    ax.set_title('price_$5_$')                      # (the raw name)
    with pytest.raises(ValueError):
        fig.canvas.draw()
    plt.close(fig)


def test_select_queries_is_seeded_and_checked():
    assert vis.select_queries(10, 4, seed=1) == vis.select_queries(10, 4, seed=1)
    assert vis.select_queries(10, 4, seed=1) != vis.select_queries(10, 4, seed=2)
    assert vis.select_queries(10, indexes=[9, 0]) == [9, 0]
    with pytest.raises(UserError, match='out of range'):
        vis.select_queries(10, indexes=[10])
    with pytest.raises(UserError, match='only 10'):
        vis.select_queries(10, 11)


# ----------------------------------------------------------------------------- probabilities
def test_bar_colours_mark_true_class_and_wrong_top():
    wrong = vis.bar_colours(np.array([0.1, 0.6, 0.3]), true_class=2)
    assert wrong == [vis.BAR_OTHER, vis.BAR_WRONG_TOP, vis.BAR_TRUE]
    right = vis.bar_colours(np.array([0.1, 0.6, 0.3]), true_class=1)
    assert right == [vis.BAR_OTHER, vis.BAR_TRUE, vis.BAR_OTHER]
    assert vis.BAR_TRUE == 'tab:green' and vis.BAR_WRONG_TOP == 'gold'


def test_probabilities_png_and_values(checkpoints, loaded, tiny_folder, tmp_path, capsys):
    out = tmp_path / 'probabilities.png'
    code, _, err = run(capsys, 'probabilities', '--ckpt', checkpoints['super-and'],
                       checkpoints['and'], '--labels', 'Super-AND', 'AND', '--queries', 3,
                       '--data-root', tiny_folder, '--device', 'cpu', '--out', out)
    assert code == 0, err
    # width = DPI (THUMB_WIDTH_IN + checkpoints PANEL_WIDTH_IN), height = DPI queries ROW_HEIGHT_IN
    assert png_size(out) == (round(vis.DPI * (vis.THUMB_WIDTH_IN + 2 * vis.PANEL_WIDTH_IN)),
                             round(vis.DPI * 3 * vis.ROW_HEIGHT_IN))
    assert png_size(out) == (850, 750)

    p = vis.knn_probabilities(loaded['super-and'], [0, 5], source='network')
    assert p.shape == (2, 10) and np.allclose(p.sum(1), 1) and (p >= 0).all()


def test_runs_of_one_method_are_labelled_by_their_folders(checkpoints, tiny_folder, tmp_path):
    """Without --labels, each panel is labelled by its method, and runs of the same method by
    their folders too: two panels are never titled alike."""
    import shutil
    other = tmp_path / 'other'
    other.mkdir()
    shutil.copy(checkpoints['super-and'], other / 'ckpt.t7')
    args = visualize.parse_args(['probabilities', '--ckpt', checkpoints['super-and'],
                                 str(other / 'ckpt.t7'), checkpoints['and'], '--data-root',
                                 tiny_folder, '--device', 'cpu'])
    _, labels = visualize.load_checkpoints(args)
    folder = os.path.basename(os.path.dirname(checkpoints['super-and']))
    assert labels == [f'super-and ({folder})', 'super-and (other)', 'and']


# ----------------------------------------------------------------------------- embedding
def test_embedding_png(checkpoints, tiny_folder, tmp_path, capsys):
    out = tmp_path / 'embedding.png'
    code, printed, err = run(capsys, 'embedding', '--ckpt', checkpoints['super-and'],
                             checkpoints['and'], '--data-root', tiny_folder, '--device', 'cpu',
                             '--out', out, '--points', '11')
    assert code == 0, err
    assert 'note: --points 11 is more than the 10 test images: all of them are drawn' in printed
    # width = DPI (checkpoints MAP_SIDE_IN + LEGEND_WIDTH_IN), height = DPI MAP_SIDE_IN
    assert png_size(out) == (round(vis.DPI * (2 * vis.MAP_SIDE_IN + vis.LEGEND_WIDTH_IN)),
                             round(vis.DPI * vis.MAP_SIDE_IN))


def test_umap_missing_is_a_clear_error(checkpoints, tiny_folder, tmp_path, capsys):
    if importlib.util.find_spec('umap') is not None:
        pytest.skip('umap is installed')
    code, _, err = run(capsys, 'embedding', '--ckpt', checkpoints['and'], '--method', 'umap',
                       '--data-root', tiny_folder, '--device', 'cpu', '--out',
                       tmp_path / 'u.png')
    assert code == 2 and err.startswith('error: --method umap needs the umap-learn package')
    assert not (tmp_path / 'u.png').exists()


def test_tsne_map_of_few_points():
    xy = vis.project_2d(torch.randn(5, 8), 'tsne', seed=0)     # perplexity clipped to 4
    assert xy.shape == (5, 2) and np.isfinite(xy).all()


# ----------------------------------------------------------------------------- curve
def write_log(path, rounds, epochs_per_round, extra=()):
    """A JSON-lines log as main.py writes it: a round record before each round after the first."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        for r in range(rounds):
            if r > 0:
                f.write(json.dumps({'type': 'round', 'round': r, 'anchors': 5,
                                    'consistency': 80.0}) + '\n')
            for e in range(epochs_per_round):
                f.write(json.dumps({'type': 'epoch', 'round': r, 'epoch': e,
                                    'global_epoch': r * epochs_per_round + e, 'lr': 0.03,
                                    'ue_weight': 0.0, 'loss': {'and': 5.0},
                                    'knn_top1': 20.0 + 10 * r + e, 'knn_top5': 60.0,
                                    'best_top1': 20.0 + 10 * r + e, 'seconds': 1.0}) + '\n')
        for record in extra:
            f.write(json.dumps(record) + '\n')
    return str(path)


def test_curve_from_two_logs(tmp_path, capsys, monkeypatch):
    first = write_log(tmp_path / 'run_a' / 'log.jsonl', 2, 3,
                      extra=[{'type': 'note', 'text': 'not an epoch'}])
    write_log(tmp_path / 'run_b' / 'log.jsonl', 2, 4)
    monkeypatch.chdir(tmp_path)     # the default --out is fig/curve-<run folders>.png here
    code, out, err = run(capsys, 'curve', '--log', first, tmp_path / 'run_b', '--published')
    assert code == 0, err
    assert png_size(tmp_path / 'fig' / 'curve-run_a+run_b.png') == \
        tuple(round(vis.DPI * s) for s in vis.CURVE_SIZE_IN) == (900, 450)
    assert out.startswith('wrote fig/curve-run_a+run_b.png')
    # Another run's curve lands on a file of its own; the same one again says it replaced it.
    code, out, err = run(capsys, 'curve', '--log', first)
    assert code == 0 and out.startswith('wrote fig/curve-run_a.png'), err
    code, out, err = run(capsys, 'curve', '--log', first)
    assert code == 0 and out.startswith('replaced fig/curve-run_a.png'), err


@pytest.mark.parametrize('suffix', ['.png', '.jpg', '.svg', '.pdf'])
@pytest.mark.parametrize('command', ['curve', 'retrieval'])
def test_every_format_the_help_names_is_written_at_its_size(command, suffix, checkpoints,
                                                            tiny_folder, tmp_path, capsys):
    """A curve (matplotlib) and the retrieval grid (PIL pixels) in each format --out takes:
    the file is of that format, at the size said (for .svg and .pdf: in points, 72 to the
    inch, of the figure at DPI); before, .svg and .pdf ended in a traceback."""
    out = tmp_path / f'figure{suffix}'
    argv = ['curve', '--log', os.path.dirname(checkpoints['and'])] if command == 'curve' else \
        ['retrieval', '--ckpt', checkpoints['and'], '--data-root', tiny_folder, '--device', 'cpu']
    code, said, err = run(capsys, *argv, '--out', out)
    assert code == 0, err
    width, height = map(int, re.fullmatch(rf'wrote {out} \((\d+) x (\d+) px\)',
                                          said.splitlines()[-1]).groups())
    head = out.read_bytes()[:2000]
    if suffix in ('.png', '.jpg'):
        assert png_size(out) == (width, height)
        assert head.startswith(b'\x89PNG' if suffix == '.png' else b'\xff\xd8')
    elif suffix == '.pdf':
        assert head.startswith(b'%PDF')
    else:
        points = re.search(rb'<svg [^>]*width="([\d.]+)pt" height="([\d.]+)pt"', head).groups()
        assert [float(p) for p in points] == pytest.approx(
            [width * 72 / vis.DPI, height * 72 / vis.DPI], abs=0.01)


def test_a_figure_that_cannot_be_written_is_one_line(tmp_path, capsys):
    first = write_log(tmp_path / 'run_a' / 'log.jsonl', 1, 2)
    code, out, err = run(capsys, 'curve', '--log', first, '--out', '/proc/curve.png')
    assert code == 2 and err == 'error: cannot write /proc/curve.png: No such file or directory\n'


def test_a_curve_without_labels_is_the_loss_sgd_minimised():
    """AND + augmentation + the epoch's UE weight x UE (the weight 0 early in a round)."""
    records = [{'loss': {'and': 2.0, 'aug': 3.0, 'ue': 5.0}, 'ue_weight': 0.0},
               {'loss': {'and': 2.0, 'aug': 3.0, 'ue': 5.0}, 'ue_weight': 0.2},
               {'loss': {'and': 1.5}}]                     # a method without a UE loss
    assert vis.curve_metric([('run', records)]) == 'loss'
    assert vis.curve_values(records, 'loss') == pytest.approx([5.0, 6.0, 1.5])


def test_epoch_records_and_round_starts(tmp_path):
    path = write_log(tmp_path / 'run' / 'log.jsonl', 3, 2, extra=[{'type': 'other'}])
    records = epoch_records(tmp_path / 'run')           # a model dir works too
    assert [r['global_epoch'] for r in records] == [0, 1, 2, 3, 4, 5]
    assert vis.round_starts(records) == [2, 4]
    assert vis.round_starts(records[:2]) == []
    # A run resumed from an earlier checkpoint: the later records replace epochs 3 and on.
    with open(path, 'a') as f:
        f.write(json.dumps({'type': 'epoch', 'round': 1, 'epoch': 1, 'global_epoch': 3,
                            'knn_top1': 99.0}) + '\n')
    records = epoch_records(path)
    assert len(records) == 4
    assert [(r['global_epoch'], r['knn_top1']) for r in records][-2:] == [(2, 30.0), (3, 99.0)]


def test_published_curve_is_spec_8():
    xs, ys = vis.published_curve()
    assert len(xs) == len(ys) == 45
    assert (xs[0], ys[0]) == (0, 25.80) and (xs[8], ys[8]) == (199, 84.54)
    assert (xs[9], ys[9]) == (200, 81.44) and (xs[-1], ys[-1]) == (999, 89.03)


# ----------------------------------------------------------------------------- errors
def test_missing_checkpoint_is_one_error_line(tmp_path, capsys):
    code, _, err = run(capsys, 'retrieval', '--ckpt', tmp_path / 'none.t7', '--out',
                       tmp_path / 'r.png')
    assert code == 2
    assert err.startswith('error: no checkpoint at') and len(err.strip().splitlines()) == 1
    assert not (tmp_path / 'r.png').exists()


@pytest.mark.parametrize('argv, message', [
    (['retrieval', '--query-index', '10'], 'query index 10 is out of range'),
    (['probabilities', '--queries', '11'], '--queries 11, but the test set has only 10'),
    (['retrieval', '--topk', '21'], '--topk 21 exceeds the 20 labelled training images'),
    (['retrieval', '--queries', '2', '--query-index', '1'], 'not allowed with argument'),
    (['retrieval', '--labels', 'a', 'b'], '--labels gives 2 labels; checkpoints given: 1'),
    (['retrieval', '--topk', '0'], '0 is not an integer >= 1'),
])
def test_user_errors_are_one_line(checkpoints, tiny_folder, tmp_path, capsys, argv, message):
    code, _, err = run(capsys, *argv, '--ckpt', checkpoints['and'], '--data-root', tiny_folder,
                       '--device', 'cpu', '--out', tmp_path / 'x.png')
    assert code == 2, err
    assert err.startswith('error: ') and message in err and len(err.strip().splitlines()) == 1


def test_log_without_epoch_records_is_an_error(tmp_path, capsys):
    path = tmp_path / 'log.jsonl'
    path.write_text(json.dumps({'type': 'round', 'round': 1}) + '\n')
    code, _, err = run(capsys, 'curve', '--log', path, '--out', tmp_path / 'c.png')
    assert code == 2 and err.strip() == f'error: {path} holds no epoch records'
    code, _, err = run(capsys, 'curve', '--log', tmp_path / 'missing', '--out',
                       tmp_path / 'c.png')
    assert code == 2 and err.startswith('error: no training log at')


def test_a_checkpoint_given_as_a_log_names_its_folder(checkpoints, tmp_path, capsys):
    code, _, err = run(capsys, 'curve', '--log', checkpoints['and'], '--out', tmp_path / 'c.png')
    folder = os.path.dirname(checkpoints['and'])
    assert code == 2 and err.strip() == (
        f'error: {checkpoints["and"]} is a checkpoint (or another binary file), not a training '
        f'log: give the run\'s folder ({folder}), which holds its log.jsonl')
    other = tmp_path / 'embeddings.npz'         # (a zip, beside no log: no folder to name)
    other.write_bytes(b'PK\x03\x04')
    code, _, err = run(capsys, 'curve', '--log', other, '--out', tmp_path / 'c.png')
    assert code == 2 and err.strip() == (
        f'error: {other} is a checkpoint (or another binary file), not a training log: give the '
        f'folder of the run (its --model_dir), which holds its log.jsonl')
