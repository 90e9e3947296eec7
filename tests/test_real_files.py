"""Real files, right numbers: every reader of image files (training folders on both pipelines,
class trees as --eval-root uses them, lib.embed, lib.retrieve's queries, gallery and figure, the
hub transform) reads an image as it looks, each real file once, and every printed figure
counts only what it claims. Every input is built here; expected values are computed here."""
import gzip
import io
import os
import re
import struct
import warnings
import zipfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
from conftest import no_file_left_open, write_image_folder
from tools import embed, retrieve
from lib.core.knn import topk_correct
from lib.errors import UserError

SIZE = 32


# ----------------------------------------------------------------------------- inputs
def grey16(path, values):
    """A 16-bit greyscale PNG (Pillow mode I;16) of the uint16 array `values`."""
    Image.fromarray(values.astype(np.uint16)).save(path)


def png48(path, rgb16):
    """A 16-bit-per-channel colour PNG, written by hand (Pillow cannot write one)."""
    height, width, _ = rgb16.shape
    raw = b''.join(b'\x00' + rgb16[y].astype('>u2').tobytes() for y in range(height))

    def chunk(kind, data):
        return (struct.pack('>I', len(data)) + kind + data
                + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff))
    header = struct.pack('>IIBBBBB', width, height, 16, 2, 0, 0, 0)
    with open(path, 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(raw))
                + chunk(b'IEND', b''))


def pgm(path, values, maxval):
    height, width = values.shape
    with open(path, 'wb') as f:
        f.write(f'P5\n{width} {height}\n{maxval}\n'.encode() + values.astype('>u2').tobytes())


def sideways_photo(path, width=SIZE * 2, height=SIZE * 3):
    """A JPEG stored `width` x `height` with a red band along its stored top third and EXIF
    Orientation 6 (rotate 90 degrees clockwise to view): upright, the band is the right edge."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:height // 3] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)


def transparent_palette(path):
    """A palette PNG whose index 0 is transparent (tRNS as bytes: Pillow warns when it is
    converted straight to RGB); the left half uses index 0 (stored colour (10, 20, 30))."""
    pixels = np.ones((SIZE, SIZE), np.uint8)
    pixels[:, :SIZE // 2] = 0
    img = Image.fromarray(pixels, 'P')
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.save(path, transparency=bytes([0] + [255] * 255))


def noisy(seed, size=SIZE):
    rng = np.random.default_rng(seed)
    return np.clip(rng.integers(0, 256, 3) + rng.normal(0, 30, (size, size, 3)), 0,
                   255).astype(np.uint8)


def untrained_checkpoint(path):
    """A checkpoint file of an untrained network (enough to embed with)."""
    import models
    torch.manual_seed(0)
    torch.save({'net': models.build_network('resnet18').state_dict(), 'npc': {}}, path)
    return str(path)


# ----------------------------------------------------------------------------- the readers
def as_uint8(tensor):
    """A 3 x S x S tensor of pixel values / 255 back to S x S x 3 uint8."""
    return (tensor.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def read_unlabeled(path):
    """Training on a folder of unlabeled images (both pipelines take these arrays)."""
    folder = os.path.dirname(path)
    train, _ = datasets.load_dataset('folder', folder, image_size=SIZE)
    return train.images[train.paths.index(os.path.basename(path))]


def read_class_tree(path):
    """A labelled tree, as --dataset folder and --eval-root read it (the test split: fitted
    to the image size)."""
    tree = os.path.dirname(os.path.dirname(os.path.dirname(path)))
    _, test = datasets.load_dataset('folder', tree, image_size=SIZE)
    return test.images[test.paths.index(os.path.join('c0', os.path.basename(path)))]


def read_embed(path):
    """lib.embed (and lib.retrieve's queries and gallery), with mean 0 and std 1."""
    return as_uint8(embed.ImageReader(SIZE, (0, 0, 0), (1, 1, 1)).read(path))


def read_figure(path):
    """lib.retrieve's figure."""
    return retrieve.thumbnail(path, SIZE)


def read_hub_path(path):
    return as_uint8(datasets.image_transform((0, 0, 0), (1, 1, 1), SIZE)(path))


def read_hub_pil(path):
    with Image.open(path) as img:
        return as_uint8(datasets.image_transform((0, 0, 0), (1, 1, 1), SIZE)(img))


READERS = [read_unlabeled, read_class_tree, read_embed, read_figure, read_hub_path,
           read_hub_pil]


def place(tmp_path, name):
    """Where a reader finds the file `name`: a class tree's test/c0/ (train/c0/ gets a copy),
    which also serves as the unlabeled folder and the embedding folder."""
    folder = tmp_path / 'tree' / 'test' / 'c0'
    folder.mkdir(parents=True, exist_ok=True)
    (tmp_path / 'tree' / 'train' / 'c0').mkdir(parents=True, exist_ok=True)
    return str(folder / name)


def read_with(reader, path):
    """The reader's pixels, with no warning of Pillow's escaping to the caller."""
    train_copy = path.replace(os.sep + 'test' + os.sep, os.sep + 'train' + os.sep)
    with open(path, 'rb') as src, open(train_copy, 'wb') as dst:
        dst.write(src.read())
    with warnings.catch_warnings():
        warnings.simplefilter('error')      # a raw Pillow warning fails the test
        return reader(path)


# ----------------------------------------------------------------------------- 1. bit depth
@pytest.mark.parametrize('reader', READERS, ids=lambda r: r.__name__)
def test_a_16_bit_image_reads_as_value_over_257_on_every_path(tmp_path, reader):
    rng = np.random.default_rng(0)
    values = np.clip(33000 + rng.normal(0, 2000, (SIZE, SIZE)), 0, 65535).astype(np.uint16)
    path = place(tmp_path, 'grey16.png')
    grey16(path, values)
    want = np.floor(values / 257 + 0.5).astype(np.uint8)     # round(value / 257)
    got = read_with(reader, path)
    assert got.shape == (SIZE, SIZE, 3)
    for channel in range(3):
        assert np.array_equal(got[..., channel], want)
    assert (got == 255).mean() == 0            # (clipping made 99.5% of these pixels white)


@pytest.mark.parametrize('name, write, want', [
    # 16-bit PGM (Pillow holds it as 32-bit I, 0..65535) and 12-bit PGM (scaled by its maxval).
    ('g16.pgm', lambda p, v: pgm(p, v, 65535), lambda v: np.floor(v / 257 + 0.5)),
    ('g12.pgm', lambda p, v: pgm(p, v // 16, 4095),
     lambda v: np.floor((v // 16) * 65535 / 4095 / 257 + 0.5)),
    ('g16.tif', lambda p, v: Image.fromarray(v).save(p), lambda v: np.floor(v / 257 + 0.5)),
    # Floating-point pixels in [0, 1]: fractions of full intensity.
    ('f.tif', lambda p, v: Image.fromarray((v / 65535).astype(np.float32)).save(p),
     lambda v: np.floor((v / 65535).astype(np.float32).astype(np.float64) * 255 + 0.5)),
])
def test_other_high_depth_greys_are_scaled(tmp_path, name, write, want):
    values = np.linspace(0, 65535, SIZE * SIZE).reshape(SIZE, SIZE).astype(np.uint16)
    path = str(tmp_path / name)
    write(path, values)
    with open(path, 'rb') as f:
        got = datasets.decode_image(f.read())
    assert np.array_equal(got[..., 1], want(values.astype(np.float64)).astype(np.uint8))


def test_16_bit_colour_pngs_are_within_one_level_of_value_over_257(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 65536, (SIZE, SIZE, 3))
    png48(tmp_path / 'rgb48.png', rgb)
    got = datasets.decode_image((tmp_path / 'rgb48.png').read_bytes()).astype(int)
    want = np.floor(rgb / 257 + 0.5)
    assert np.abs(got - want).max() <= 1 and (got == 255).mean() < 0.01


@pytest.mark.parametrize('name, array, needle', [
    ('wide.tif', np.full((4, 4), 0.5, np.float32) * 3, 'values from 1.5 to 1.5'),
    ('int32.tif', np.full((4, 4), 70000, np.int32), 'does not say which value is full'),
])
def test_images_of_unknown_range_are_refused_with_a_reason(tmp_path, name, array, needle):
    Image.fromarray(array).save(tmp_path / name)
    with pytest.raises(datasets.UnreadableImage, match=needle):
        datasets.decode_image((tmp_path / name).read_bytes())
    # A folder holding one: the file is named and skipped, never read as white or black.
    Image.fromarray(noisy(0)).save(tmp_path / 'ok.png')
    train, _ = datasets.load_dataset('folder', str(tmp_path))
    assert len(train) == 1 and train.skipped[0][0].endswith(name)
    assert needle in train.skipped[0][1]


def test_both_pipelines_feed_the_scaled_pixels(tmp_path):
    from lib.pipelines import LoaderPipeline, TensorPipeline
    for i in range(2):
        grey16(tmp_path / f'g{i}.png', np.full((SIZE, SIZE), 33000 + 257 * i, np.uint16))
    train, _ = datasets.load_dataset('folder', str(tmp_path), image_size=SIZE)
    want = torch.tensor([128.0, 129.0]) / 255         # 33000 / 257 = 128.4, 33257 / 257 = 129.4
    common = dict(train_set=train, test_set=None, mean=(0, 0, 0), std=(1, 1, 1),
                  image_size=SIZE, views=2, batch_size=2, device='cpu', seed=0)
    for pipeline in (LoaderPipeline(workers=0, **common), TensorPipeline(**common)):
        images, _ = next(pipeline.eval_batches('train'))
        assert torch.allclose(images.mean((1, 2, 3)), want, atol=1e-6), type(pipeline)


# ----------------------------------------------------------------------------- 2. orientation
@pytest.mark.parametrize('reader', READERS, ids=lambda r: r.__name__)
def test_photos_are_read_upright_on_every_path(tmp_path, reader):
    path = place(tmp_path, 'photo.jpg')
    sideways_photo(path)
    got = read_with(reader, path).astype(float)
    red = (got[..., 0] > 150) & (got[..., 1] < 100)
    # Upright (96 wide x 64 high, centre square taken), the band is the right edge.
    assert red[:, -3:].mean() > 0.9 and red[:, :got.shape[1] // 2].sum() == 0


# What each EXIF orientation asks a viewer to do to the stored pixels (a[row, column]).
VIEWER = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],                              # mirror left-right
    3: lambda a: a[::-1, ::-1],                           # rotate 180
    4: lambda a: a[::-1, :],                              # mirror top-bottom
    5: lambda a: a.transpose(1, 0, 2),                    # mirror along the main diagonal
    6: lambda a: np.rot90(a, -1),                         # rotate 90 clockwise
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),       # mirror along the other diagonal
    8: lambda a: np.rot90(a, 1),                          # rotate 90 counter-clockwise
}


@pytest.mark.parametrize('orientation', sorted(VIEWER) + [0, 9])
def test_every_orientation_is_read_as_viewers_show_it(tmp_path, orientation):
    stored = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 14     # 6 colours
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / 'o.png', exif=exif.tobytes())   # lossless
    notes = datasets.ImageNotes()
    got = datasets.decode_image((tmp_path / 'o.png').read_bytes(), notes=notes, name='o.png')
    want = VIEWER.get(orientation, VIEWER[1])(stored)    # 0 and 9 are no orientation
    assert np.array_equal(got, want)
    assert bool(notes.lines()) == (orientation in range(2, 9))


def test_the_upright_size_is_the_viewers(tmp_path):
    sideways_photo(tmp_path / 'photo.jpg', width=64, height=96)
    notes = datasets.ImageNotes()
    assert datasets.decode_image((tmp_path / 'photo.jpg').read_bytes(), notes=notes,
                                 name='photo.jpg').shape == (64, 96, 3)
    assert notes.lines() == ['note: 1 image is stored rotated or mirrored (EXIF orientation): '
                             'read upright, as viewers show them (e.g. photo.jpg)']


# ----------------------------------------------------------------------------- 3. the walk
def test_a_link_back_up_the_tree_is_no_loop(tmp_path):
    photos = tmp_path / 'photos'
    (photos / '2023').mkdir(parents=True)
    for i in range(4):
        Image.fromarray(noisy(i)).save(photos / f'p{i}.png')
    os.symlink('..', photos / '2023' / 'parent')
    want = ['p0.png', 'p1.png', 'p2.png', 'p3.png']
    assert datasets.list_images(str(photos)).paths == want
    train, _ = datasets.load_dataset('folder', str(photos))
    assert len(train) == 4 and train.paths == want
    assert train.notes == [f'note: under {photos}, 1 link to a folder already walked (a loop, '
                           f'or a second way in): each file is read once']
    assert embed.list_folder(str(photos)).paths == want


def test_each_real_file_counts_once_and_links_are_followed(tmp_path):
    outside = tmp_path / 'outside.png'
    Image.fromarray(noisy(9)).save(outside)
    folder = tmp_path / 'photos'
    (folder / 'b').mkdir(parents=True)
    Image.fromarray(noisy(1)).save(folder / 'b' / 'real.png')
    os.symlink(folder / 'b' / 'real.png', folder / 'a_link.png')     # sorts first: a link
    os.link(folder / 'b' / 'real.png', folder / 'hard.png')          # the same file again
    os.symlink(outside, folder / 'z_outside.png')                     # followed
    os.symlink(folder / 'b', folder / 'c_same_folder')               # a second way in
    os.symlink(tmp_path / 'nothing.png', folder / 'broken.png')       # named when read
    listing = datasets.list_images(str(folder))
    assert listing.paths == ['b/real.png', 'broken.png', 'z_outside.png']
    assert (listing.repeated, listing.folders_again) == (2, 1)
    train, _ = datasets.load_dataset('folder', str(folder))
    assert train.paths == ['b/real.png', 'z_outside.png']
    assert train.skipped[0][0].endswith('broken.png')


def test_hidden_entries_are_ignored_in_class_trees_too(tmp_path):
    root = write_image_folder(tmp_path / 'tree', classes=2, train_per_class=2, test_per_class=1)
    for split in ('train', 'test'):
        hidden = tmp_path / 'tree' / split / '.ipynb_checkpoints'
        hidden.mkdir()
        Image.fromarray(noisy(3)).save(hidden / 'x-checkpoint.png')
        Image.fromarray(noisy(4)).save(tmp_path / 'tree' / split / 'class_00' / '.hidden.png')
    train, test = datasets.load_dataset('folder', root)
    assert train.classes == test.classes == ['class_00', 'class_01']
    assert (len(train), len(test)) == (4, 2)
    listed = embed.list_folder(os.path.join(root, 'train'))
    assert listed.classes == ['class_00', 'class_01'] and len(listed.paths) == 4


def test_class_folders_hold_their_own_images_in_sorted_order(tmp_path):
    """As before: the images directly inside each class folder (a sub-folder of thumbnails is
    not read), sorted by class, then name."""
    for name in ('b/2.png', 'a/deep/er/1.png', 'a/0.png', 'b/1.png'):
        path = tmp_path / 'train' / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy(len(name))).save(path)
    tree = datasets.list_class_tree(str(tmp_path / 'train'))
    assert tree.paths == ['a/0.png', 'b/1.png', 'b/2.png']
    assert tree.targets == [0, 1, 1]


def test_links_inside_a_class_tree_keep_every_image_in_its_own_class(tmp_path):
    root = write_image_folder(tmp_path / 'tree', classes=3, train_per_class=2,
                              test_per_class=1)
    train = tmp_path / 'tree' / 'train'
    os.symlink('..', train / 'class_00' / 'parent')                       # a loop
    os.symlink('../class_01/0000.png', train / 'class_00' / 'zz_link.png')  # another class's
    os.symlink('../class_02/0001.png', train / 'class_02' / 'again.png')    # its own, again
    want_paths = [f'class_{c:02d}/{i:04d}.png' for c in range(3) for i in range(2)]
    for reader in (lambda: datasets.load_dataset('folder', root)[0],
                   lambda: embed.list_folder(str(train))):
        listed = reader()
        assert listed.paths == want_paths
        targets = listed.targets if hasattr(listed, 'targets') else listed.labels
        assert list(targets) == [0, 0, 1, 1, 2, 2]
    train_set, _ = datasets.load_dataset('folder', root)
    assert train_set.notes[0] == (f'note: under {train}, 2 paths reach a file already listed: '
                                  f'each file is read once')


def test_test_images_that_are_training_images_are_said(tmp_path):
    root = write_image_folder(tmp_path / 'tree', classes=2, train_per_class=2, test_per_class=1)
    os.symlink(tmp_path / 'tree' / 'train' / 'class_00' / '0000.png',
               tmp_path / 'tree' / 'test' / 'class_00' / 'leak.png')
    train, test = datasets.load_dataset('folder', root)
    assert len(test) == 3
    assert train.notes == [f'note: 1 of the 3 test images under {root} are training images too '
                           f'(links to the same files), so the test accuracy is not on unseen '
                           f'images']


def test_a_named_pipe_is_not_read(tmp_path):
    Image.fromarray(noisy(0)).save(tmp_path / 'a.png')
    os.mkfifo(tmp_path / 'pipe.png')       # reading it would wait forever
    assert datasets.list_images(str(tmp_path)).paths == ['a.png']
    train, _ = datasets.load_dataset('folder', str(tmp_path))
    assert len(train) == 1 and not train.skipped


# ----------------------------------------------------------------------------- 4. file names
def latin1_folder(tmp_path):
    folder = tmp_path / 'names'
    folder.mkdir()
    for i in range(3):
        Image.fromarray(noisy(i)).save(folder / f'n{i}.png')
    name = os.fsdecode(b'caf\xe9.png')          # Latin-1 bytes, as Windows zip tools write
    Image.fromarray(noisy(7)).save(folder / name)
    return folder, name


def test_any_file_name_is_embedded_stored_and_printed(tmp_path, capsys):
    folder, name = latin1_folder(tmp_path)
    checkpoint = untrained_checkpoint(tmp_path / 'ckpt.t7')
    assert embed.main(['--ckpt', checkpoint, '--images', str(folder), '--out',
                       str(tmp_path / 'e.npz')]) == 0
    with np.load(tmp_path / 'e.npz') as stored:
        assert sorted(stored['paths'].tolist()) == sorted(['n0.png', 'n1.png', 'n2.png', name])
        assert stored['features'].shape == (4, 128)
    capsys.readouterr()
    assert retrieve.main(['--ckpt', checkpoint, '--gallery', str(folder), '--query',
                          str(folder / name), '--k', '4', '--figure',
                          str(tmp_path / 'f.png')]) == 0
    out = capsys.readouterr().out
    assert re.search(r'^   1  1\.0000  caf\\xe9\.png$', out, re.M), out
    assert f'query {folder}/caf\\xe9.png' in out
    # The same name and bytes in another folder give the same fingerprint; another name does
    # not, nor do other bytes under that name.
    copy = tmp_path / 'copy'
    copy.mkdir()
    (copy / name).write_bytes((folder / name).read_bytes())
    assert embed.file_fingerprint(str(copy), [name]) == \
        embed.file_fingerprint(str(folder), [name])
    (copy / 'renamed.png').write_bytes((folder / name).read_bytes())
    assert embed.file_fingerprint(str(copy), ['renamed.png']) != \
        embed.file_fingerprint(str(folder), [name])
    (copy / name).write_bytes((folder / 'n0.png').read_bytes())
    assert embed.file_fingerprint(str(copy), [name]) != \
        embed.file_fingerprint(str(folder), [name])
    train, _ = datasets.load_dataset('folder', str(folder))
    assert name in train.paths and datasets.shown(name) == 'caf\\xe9.png'


def test_names_print_on_one_line_and_draw(tmp_path):
    assert datasets.shown('two\nlines.png') == 'two\\nlines.png'
    assert datasets.shown(os.fsdecode(b'cl\xe9')) == 'cl\\xe9'
    from tools.figures import NeighbourRow, curve_figure, draw_retrieval
    name = os.fsdecode(b'caf\xe9.png')
    row = NeighbourRow(name, noisy(0), [noisy(1)], [0.5])
    assert draw_retrieval([row]).size[0] > 0
    records = [dict(global_epoch=0, round=0, loss={'and': 1.0}),
               dict(global_epoch=1, round=0, loss={'and': 0.5})]
    curve_figure([(os.fsdecode(b'run_caf\xe9'), records)]).savefig(tmp_path / 'c.png')


def test_images_in_folders_inside_a_class_folder_are_counted_not_dropped_in_silence(
        tmp_path, capsys):
    """A photo library by year (2019/a.png, 2019/summer/b.png, 2020/c.png) is a class tree,
    whose classes hold the images directly inside their folders: the one in 2019/summer/ is
    not read, and every reader of class trees says so in a note with the count."""
    library = tmp_path / 'years'
    for path in ('2019/a.png', '2019/summer/b.png', '2019/summer/deep/c.png', '2020/d.png',
                 '2020/e.png'):
        (library / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy(len(path))).save(library / path)
    os.symlink(library / '2020' / 'd.png', library / '2019' / 'summer' / 'link.png')
    tree = datasets.list_class_tree(str(library))
    assert tree.paths == ['2019/a.png', '2020/d.png', '2020/e.png']
    assert tree.notes == [f'note: under {library}, 2 image files in folders inside class '
                          f'folders are not read: a class holds the images directly inside '
                          f'its folder']
    checkpoint = untrained_checkpoint(tmp_path / 'ckpt.t7')
    assert embed.main(['--ckpt', checkpoint, '--images', str(library), '--out',
                       str(tmp_path / 'e.npz')]) == 0
    assert tree.notes[0] in capsys.readouterr().out
    (library / '2019' / 'summer' / 'deep' / 'c.png').unlink()
    assert datasets.list_class_tree(str(library)).notes[0].startswith(
        f'note: under {library}, 1 image file in a folder inside a class folder is not read')
    (library / '2019' / 'a.png').unlink()   # a class with images deeper down only
    with pytest.raises(datasets.FolderError) as raised:
        datasets.list_class_tree(str(library))
    assert str(raised.value) == (f'class folder {library}/2019 holds no images directly inside '
                                 f'it (1 in folders inside it, which a class does not read)')
    flat = tmp_path / 'flat'                # none: no note
    flat.mkdir()
    (flat / 'cls').mkdir()
    Image.fromarray(noisy(0)).save(flat / 'cls' / 'a.png')
    assert datasets.list_class_tree(str(flat)).notes == []


def test_files_not_named_as_images_are_counted_not_dropped_in_silence(tmp_path, capsys):
    """A phone's .HEIC, a name without an extension, a .txt: not read, and a note (or, with
    no image at all, the error) counts them by kind; hidden files are not counted."""
    photos = tmp_path / 'photos'
    (photos / 'trip').mkdir(parents=True)
    Image.fromarray(noisy(0)).save(photos / 'a.png')
    for name in ('IMG_1.HEIC', 'trip/IMG_2.heic', 'noext', 'notes.txt', '.DS_Store'):
        (photos / name).write_bytes(b'not read')
    counted = '4 files not named as images (2 .heic, 1 without an extension, 1 .txt)'
    listing = datasets.list_images(str(photos))
    assert listing.paths == ['a.png']
    assert listing.notes(str(photos))[0].startswith(f'note: under {photos}, {counted} are '
                                                    f'not read; the image types read are .jpg')
    checkpoint = untrained_checkpoint(tmp_path / 'ckpt.t7')
    assert embed.main(['--ckpt', checkpoint, '--images', str(photos), '--out',
                       str(tmp_path / 'e.npz')]) == 0
    assert counted in capsys.readouterr().out
    (photos / 'a.png').unlink()
    assert embed.main(['--ckpt', checkpoint, '--images', str(photos), '--out',
                       str(tmp_path / 'e.npz')]) == 2
    assert capsys.readouterr().err.strip().endswith(f'at any depth; it holds {counted}')
    tree = tmp_path / 'tree'                # a class tree: its class folders' own files
    (tree / 'cat').mkdir(parents=True)
    Image.fromarray(noisy(1)).save(tree / 'cat' / 'a.png')
    (tree / 'cat' / 'b.heic').write_bytes(b'not read')
    assert datasets.list_class_tree(str(tree)).notes == [
        f'note: under {tree}, 1 file not named as images (1 .heic) is not read; the image '
        f'types read are ' + ', '.join(datasets.IMAGE_EXTENSIONS)]


def test_outputs_never_land_on_inputs_and_unwritable_ones_are_one_line(tmp_path, capsys):
    """retrieve --figure refuses to write over a query image or into the gallery folder (the
    user's photo was replaced by the figure); an output the system refuses (/proc) is one line
    with exit code 2, for embed, export's writer and retrieve alike."""
    gallery = tmp_path / 'gallery'
    gallery.mkdir()
    for i in range(3):
        Image.fromarray(noisy(i)).save(gallery / f'{i}.png')
    query = tmp_path / 'query.png'
    Image.fromarray(noisy(9)).save(query)
    photo = query.read_bytes()
    checkpoint = untrained_checkpoint(tmp_path / 'ckpt.t7')
    common = ['--ckpt', checkpoint, '--gallery', str(gallery), '--query', str(query)]
    for figure, says in [(query, f'--figure {query} is the query image {query}, which the '
                                 f'figure would be written over: give another file'),
                         (gallery / 'new.png', f'--figure {gallery}/new.png is in the gallery '
                          f'folder {gallery}, where it would replace or join its images: write '
                          f'it elsewhere'),
                         ('/proc/figure.png', 'cannot write /proc/figure.png: No such file or '
                                              'directory')]:
        assert retrieve.main([*common, '--k', '2', '--figure', str(figure)]) == 2
        assert capsys.readouterr().err == f'error: {says}\n'
    assert query.read_bytes() == photo and sorted(os.listdir(gallery)) == \
        ['0.png', '1.png', '2.png']
    assert embed.main(['--ckpt', checkpoint, '--images', str(gallery), '--out',
                       '/proc/e.npz']) == 2
    assert capsys.readouterr().err == 'error: cannot write /proc/e.npz: No such file or ' \
                                      'directory\n'
    with pytest.raises(UserError, match='^cannot write /proc/x.npz: '):
        embed.write_npz('/proc/x.npz', features=np.zeros((1, 2)))


def test_a_figure_from_a_gallery_npz_needs_the_files_it_embedded(tmp_path, capsys):
    """The figure of a gallery .npz draws its files as they are now: once one is replaced, it
    would show other pixels beside the similarities ranked, so it is refused (the ranking,
    from the .npz alone, is still printed); unchanged, it is drawn, also where the embedding
    skipped an unreadable file (which is not among the files ranked)."""
    gallery = tmp_path / 'gallery'
    gallery.mkdir()
    for i in range(3):
        Image.fromarray(noisy(i)).save(gallery / f'{i}.png')
    (gallery / 'bad.png').write_bytes(b'not an image')
    checkpoint = untrained_checkpoint(tmp_path / 'ckpt.t7')
    npz = str(tmp_path / 'g.npz')
    assert embed.main(['--ckpt', checkpoint, '--images', str(gallery), '--out', npz]) == 0
    query = str(gallery / '0.png')
    common = ['--ckpt', checkpoint, '--gallery', npz, '--query', query, '--k', '2']
    assert retrieve.main([*common, '--figure', str(tmp_path / 'a.png')]) == 0
    Image.fromarray(noisy(5)).save(gallery / '2.png')
    capsys.readouterr()
    assert retrieve.main([*common, '--figure', str(tmp_path / 'b.png')]) == 2
    out, err = capsys.readouterr()
    assert f'query {query}' in out and not (tmp_path / 'b.png').exists()
    assert err.startswith(f'error: cannot draw the figure: the files under {gallery} are not '
                          f'those {npz} embedded (some were replaced, edited or removed since)')
    assert retrieve.main(common) == 0


# ----------------------------------------------------------------------------- 5. normalisation
def test_a_channel_without_spread_is_refused_before_training(tmp_path, run_main):
    folder = tmp_path / 'noblue'
    folder.mkdir()
    for i in range(8):
        pixels = noisy(i)
        pixels[..., 2] = 0
        Image.fromarray(pixels).save(folder / f'b{i}.png')
    code, out, err = run_main('--dataset', 'folder', '--data-root', folder, '--model_dir',
                              tmp_path / 'ck', '--batch_size', '4', '--workers', '0')
    assert code == 2 and 'Traceback' not in err
    line = err.strip().splitlines()[-1]
    assert len(err.strip().splitlines()) == 1
    assert 'std of the blue channel' in line and '--std' in line
    assert not (tmp_path / 'ck' / 'last.t7').exists()


@pytest.mark.parametrize('flags, needle', [
    (['--std', '0', '0', '0'], 'argument --std: 0 is not a number > 0'),
    (['--std', '0.2', 'inf', '0.2'], 'argument --std: inf is not a number > 0'),
    (['--mean', 'nan', '0.5', '0.5'], 'argument --mean: nan is not a finite number'),
])
def test_normalisation_flags_that_cannot_work(run_main, flags, needle):
    code, _, err = run_main(*flags)
    assert code == 2 and err.strip() == f'error: {needle}'


# ----------------------------------------------------------------------------- 6. top-5
@pytest.mark.parametrize('num_classes', [2, 5, 10, 100])
@pytest.mark.parametrize('voted', [1, 2, 5])
def test_top5_counts_only_classes_that_got_a_vote(num_classes, voted):
    """Reference: a target is a top-k hit when it is among the k best-scored classes with a
    score above 0."""
    voted = min(voted, num_classes)
    generator = torch.Generator().manual_seed(num_classes * 10 + voted)
    queries = 50
    scores = torch.zeros(queries, num_classes)
    for q in range(queries):
        chosen = torch.randperm(num_classes, generator=generator)[:voted]
        scores[q, chosen] = torch.rand(voted, generator=generator) + 0.1
    targets = torch.randint(0, num_classes, (queries,), generator=generator)
    want = {1: 0, 5: 0}
    for row, target in zip(scores.tolist(), targets.tolist()):
        ranked = sorted((c for c in range(num_classes) if row[c] > 0), key=lambda c: -row[c])
        for k in want:
            want[k] += target in ranked[:k]
    top1, top5 = topk_correct(scores, targets)
    assert (int(top1), int(top5)) == (want[1], want[5])
    if voted == 1:
        assert int(top5) == int(top1)


def test_the_probability_figure_names_only_voted_classes():
    from tools.figures import classes_to_name
    p = np.zeros(30)
    p[[4, 7]] = (0.75, 0.25)
    assert classes_to_name(p, true_class=20) == [4, 7, 20]
    assert classes_to_name(np.full(5, 0.2), true_class=0) == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------- 7. messages
def test_class_differences_are_named(tmp_path, run_main):
    root = tmp_path / 'tree'
    for split in ('train', 'test'):
        for c in range(8):
            if (split, c) == ('test', 6):
                continue
            (root / split / f'c{c:02d}').mkdir(parents=True)
            Image.fromarray(noisy(c)).save(root / split / f'c{c:02d}' / '0.png')
    (root / 'test' / 'c99').mkdir()
    Image.fromarray(noisy(99)).save(root / 'test' / 'c99' / '0.png')
    code, _, err = run_main('--dataset', 'folder', '--data-root', root, '--model_dir',
                            tmp_path / 'ck')
    assert code == 2
    assert err.strip() == (f'error: the classes of {root}/test differ from the training '
                           f'classes: it lacks c06 and has extra c99; test and training splits '
                           f'need the same class folders')


def zipped(name, content):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w') as archive:
        archive.writestr(name, content)
    return buffer.getvalue()


@pytest.mark.parametrize('name, content, needle', [
    ('ckpt_SAND.t7', b'<!DOCTYPE html>\n<html><body>Sign in</body></html>',
     'is an HTML page, not a PyTorch checkpoint: a download that got a web page'),
    ('comment.t7', b'<!-- saved from a browser -->\n<html></html>', 'is an HTML page'),
    ('ckpt.t7.gz', gzip.compress(b'x' * 100, mtime=0),
     'is a gzip archive, not a PyTorch checkpoint: unpack it'),
    ('ckpt.zip', zipped('ckpt_SAND.t7', b'x' * 100),
     'is a zip archive holding ckpt_SAND.t7, not a PyTorch checkpoint: unpack it'),
    ('lfs.t7', b'version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n',
     'is a Git LFS pointer'),
    ('error.t7', b'{"error": "not found"}', 'is a JSON text file, not a PyTorch checkpoint'),
    ('image.t7', b'\x89PNG\r\n\x1a\n' + b'\x00' * 40, 'is a PNG image, not a PyTorch checkpoint'),
])
def test_files_that_are_no_checkpoint_are_named_as_what_they_are(tmp_path, tiny_folder,
                                                                 run_main, name, content,
                                                                 needle):
    (tmp_path / name).write_bytes(content)
    code, _, err = run_main('--resume', name, '--test_only', '--model_dir', tmp_path,
                            '--data-root', tiny_folder)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert needle in err and 'could run code' not in err


def test_unreadable_reasons_and_pillow_warnings_become_notes(tmp_path, monkeypatch):
    folder = tmp_path / 'odd'
    folder.mkdir()
    for i in range(2):
        Image.fromarray(noisy(i)).save(folder / f'ok{i}.png')
    (folder / 'broken.png').write_bytes(b'not an image at all')
    (folder / 'page.jpg').write_bytes(b'<html><body>404</body></html>')
    (folder / 'cut.png').write_bytes((folder / 'ok0.png').read_bytes()[:60])
    Image.fromarray(noisy(3)).save(folder / 'whole.jpg')
    jpeg = (folder / 'whole.jpg').read_bytes()
    os.remove(folder / 'whole.jpg')
    (folder / 'half.jpg').write_bytes(jpeg[:len(jpeg) // 2])    # (Pillow: 'image file is
    (folder / 'head.jpg').write_bytes(jpeg[:300])               # truncated', 'Truncated File Read')
    (folder / 'header.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\xff' * 30)
    (folder / 'empty.png').write_bytes(b'')
    transparent_palette(str(folder / 'palette.png'))
    Image.fromarray(noisy(5, size=64)).save(folder / 'large.png')
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 64 * 64 - 1)     # large.png is "large"
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        train, _ = datasets.load_dataset('folder', str(folder))
    reasons = dict((os.path.basename(path), reason) for path, reason in train.skipped)
    assert reasons.pop('cut.png').startswith('a damaged PNG image: ')   # (Pillow's words follow)
    cut_off = 'a damaged JPEG image: the file ends before its image does (cut off, or not ' \
        'completely copied)'
    assert (reasons.pop('half.jpg'), reasons.pop('head.jpg')) == (cut_off, cut_off)
    assert reasons == {'broken.png': 'it is a text file, not an image',
                       'page.jpg': 'it is an HTML page, not an image',
                       'header.png': 'a damaged PNG image: Pillow cannot read it',
                       'empty.png': 'an empty file (0 bytes)'}
    assert not any('<_io.' in reason or 'object at 0x' in reason for reason in reasons.values())
    assert train.notes == [
        f'note: 1 image has more than 4,095 pixels (Pillow\'s decompression-bomb warning size): '
        f'read all the same (e.g. {folder}/large.png)',
        f'note: 1 image has transparent pixels: read without transparency, as the colours '
        f'stored under it (e.g. {folder}/palette.png)']
    palette = train.images[train.paths.index('palette.png')]
    assert palette[0, 0].tolist() == [10, 20, 30] and palette[0, -1].tolist() == [200, 100, 50]


def test_gifs_are_read_everywhere_first_frame(tmp_path):
    first, second = noisy(1), noisy(2)
    frames = [Image.fromarray(first).quantize(256), Image.fromarray(second).quantize(256)]
    frames[0].save(tmp_path / 'anim.gif', save_all=True, append_images=frames[1:])
    Image.fromarray(noisy(3)).save(tmp_path / 'still.png')
    want = np.asarray(frames[0].convert('RGB'))
    train, _ = datasets.load_dataset('folder', str(tmp_path))
    assert train.paths == ['anim.gif', 'still.png']
    assert np.array_equal(train.images[0], want)
    assert train.notes == [f'note: 1 image has several frames (animation or pages): the first '
                           f'frame is read (e.g. {tmp_path}/anim.gif)']
    assert embed.list_folder(str(tmp_path)).paths == ['anim.gif', 'still.png']


def test_query_notes_are_said_and_old_caches_are_not_reused(tmp_path, capsys):
    gallery = tmp_path / 'gallery'
    gallery.mkdir()
    for i in range(3):
        Image.fromarray(noisy(i)).save(gallery / f'{i}.png')
    sideways_photo(str(gallery / 'photo.jpg'))
    checkpoint = untrained_checkpoint(tmp_path / 'ckpt.t7')
    argv = ['--ckpt', checkpoint, '--gallery', str(gallery), '--query', str(gallery / 'photo.jpg'),
            '--k', '1']
    assert retrieve.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count('note: 1 image is stored rotated or mirrored') == 2     # gallery, query
    assert re.search(r'^   1  1\.0000  photo\.jpg$', out, re.M)
    # A cache written by the reader before orientation was read: embedded again.
    cached, = [path for path in os.listdir(tmp_path) if '.gallery-' in path]
    with np.load(tmp_path / cached) as data:
        old = {key: data[key] for key in data.files if key != 'reader_version'}
    sideways = datasets.decode_image((gallery / 'photo.jpg').read_bytes())
    assert sideways.shape[0] < sideways.shape[1]            # (the new reader: upright)
    old['features'] = old['features'][::-1].copy()          # (what an older reader stored)
    with open(tmp_path / cached, 'wb') as f:
        np.savez(f, **old)
    assert retrieve.main(argv) == 0
    out = capsys.readouterr().out
    assert 'from the cache' not in out and re.search(r'^   1  1\.0000  photo\.jpg$', out, re.M)


def damage(path, how):
    """The file at `path` as a kill, a short copy or a mix-up leaves it."""
    data = path.read_bytes()
    if how == 'npy':
        with open(path, 'wb') as f:
            np.save(f, np.zeros(3))
        return
    path.write_bytes({'cut off': data[:len(data) // 2],
                      'altered': data[:60] + bytes(b ^ 0xFF for b in data[60:120]) + data[120:],
                      'empty': b''}[how])


@pytest.mark.parametrize('how', ['cut off', 'altered', 'empty', 'npy'])
def test_a_damaged_gallery_is_one_line_and_a_damaged_cache_is_made_again(tmp_path, capsys,
                                                                         how):
    gallery = tmp_path / 'gallery'
    gallery.mkdir()
    for i in range(3):
        Image.fromarray(noisy(i)).save(gallery / f'{i}.png')
    checkpoint = untrained_checkpoint(tmp_path / 'ckpt.t7')
    given = tmp_path / 'given.npz'
    assert embed.main(['--ckpt', checkpoint, '--images', str(gallery), '--out', str(given),
                       '--device', 'cpu']) == 0
    damage(given, how)
    query = ['--query', str(gallery / '0.png'), '--k', '1']
    capsys.readouterr()
    with no_file_left_open():
        assert retrieve.main(['--ckpt', checkpoint, '--gallery', str(given), *query]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: cannot read gallery {given}: ') and err.count('\n') == 1, err
    assert ('one NumPy array (.npy)' if how == 'npy' else 'it is damaged or cut off (') in err
    # The cache of a gallery folder, damaged: said, embedded again and cached whole again.
    argv = ['--ckpt', checkpoint, '--gallery', str(gallery), *query]
    assert retrieve.main(argv) == 0
    cached, = [tmp_path / name for name in os.listdir(tmp_path) if '.gallery-' in name]
    damage(cached, how)
    capsys.readouterr()
    assert retrieve.main(argv) == 0
    out = capsys.readouterr().out
    assert f'note: cannot read gallery {cached}: ' in out and 'embedding the gallery again' in out
    assert re.search(r'^   1  1\.0000  0\.png$', out, re.M)
    assert retrieve.main(argv) == 0 and 'embeddings from the cache' in capsys.readouterr().out


def test_an_npz_written_is_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write stopped midway (Ctrl-C, a full disk) leaves the file as it was, and no
    temporary; one of a write killed before (its process gone) is removed by the next write.
    Written through a link, the link's target is."""
    out = tmp_path / 'e.npz'
    (tmp_path / 'e.npz.tmp99999999').write_bytes(b'PK cut off by a kill')
    embed.write_npz(str(out), features=np.ones((2, 3), np.float32))
    before = out.read_bytes()
    os.symlink(out, tmp_path / 'link.npz')
    embed.write_npz(str(tmp_path / 'link.npz'), features=np.ones((2, 3), np.float32))
    assert os.path.islink(tmp_path / 'link.npz') and out.read_bytes() == before
    os.remove(tmp_path / 'link.npz')

    def stopped(f, **arrays):
        f.write(before[:20])
        raise KeyboardInterrupt
    monkeypatch.setattr(np, 'savez', stopped)
    with pytest.raises(KeyboardInterrupt):
        embed.write_npz(str(out), features=np.zeros((5, 3), np.float32))
    assert out.read_bytes() == before and os.listdir(tmp_path) == ['e.npz']


def test_a_query_folder_gives_its_images(tmp_path, capsys):
    gallery = tmp_path / 'gallery'
    queries = tmp_path / 'queries'
    for folder, seeds in ((gallery, range(4)), (queries, range(10, 12))):
        (folder / 'sub').mkdir(parents=True)
        for i in seeds:
            Image.fromarray(noisy(i)).save(folder / 'sub' / f'{i}.png')
    checkpoint = untrained_checkpoint(tmp_path / 'ckpt.t7')
    assert retrieve.main(['--ckpt', checkpoint, '--gallery', str(gallery), '--query',
                          str(queries), '--k', '2']) == 0
    out = capsys.readouterr().out
    assert re.findall(r'^query (.*)$', out, re.M) == [f'{queries}/sub/10.png',
                                                      f'{queries}/sub/11.png']


def test_the_normalisation_note_needs_enough_images_to_mean_something(tmp_path):
    """A folder this dark (mean 0.1 against the checkpoint's 0.5) is said to differ once it
    has 100 images; one dark query says nothing (its means are no folder's)."""
    reader = embed.ImageReader(SIZE, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    rng = np.random.default_rng(0)
    for i in range(embed.NORMALISATION_MIN_IMAGES):
        path = tmp_path / f'{i}.png'
        Image.fromarray(rng.integers(0, 52, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
        reader.read(str(path))
        notes = [note for note in reader.notes() if 'these images have mean' in note]
        if i == 0:
            assert notes == []
    assert len(notes) == 1 and 'these images have mean (0.10' in notes[0], notes
