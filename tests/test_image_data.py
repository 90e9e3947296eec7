"""Image data of any size: files decoded on every core, kept in the decoded-image cache, read
back through memory-mapped files; STL-10's binary files.

The reference of every pixel, digest, note and reason is the one-process reader of
datasets/images.py, called here file by file (`reference_read`); the reference of STL-10's
layout is written here from the format's description (column-major channel planes)."""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
from conftest import (ROOT, UNBROKEN_FLAGS, assert_same_training_state, fast_args,
                      no_file_left_open, write_image_folder)
from datasets import Reading, ReadStats, image_cache
from datasets.decoding import read_files
from datasets.image_rows import ImageRows, channel_statistics, chunks, pixel_digest
from test_real_files import grey16, png48, sideways_photo, transparent_palette

SIZE = 40


# ----------------------------------------------------------------------------- inputs
def photo(path, width, height, seed, **save):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, 3)
    pixels = np.clip(base + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, **save)


def photo_folder(folder, count, width, height):
    """`count` photos 0.png, 1.png, ... of width x height in a new `folder`: their sorted paths."""
    os.makedirs(folder)
    for i in range(count):
        photo(folder / f'{i}.png', width, height, i)
    return sorted(str(p) for p in folder.iterdir())


def messy_folder(root):
    """Files of every kind the reader has rules for, in nested folders: photos of several
    sizes and formats, an EXIF-rotated JPEG, 16-bit grey and colour PNGs, a transparent
    palette PNG, a corrupt file, an empty file, a broken link, and two files of one content."""
    os.makedirs(root / '2023' / 'june', exist_ok=True)
    os.makedirs(root / '2024', exist_ok=True)
    for i, (w, h) in enumerate([(64, 48), (48, 64), (50, 50), (90, 40), (40, 40), (33, 71)]):
        photo(root / '2023' / f'p{i}.png', w, h, i)
        photo(root / '2024' / f'j{i}.jpg', w + 3, h + 5, 10 + i, quality=90)
    sideways_photo(root / '2023' / 'june' / 'sideways.jpg')
    grey16(root / '2023' / 'june' / 'scan16.png',
           np.linspace(0, 65535, 50 * 60).reshape(50, 60))
    png48(root / '2024' / 'deep48.png',
          np.random.default_rng(3).integers(0, 65536, (45, 45, 3)))
    transparent_palette(root / '2024' / 'palette.png')
    (root / '2024' / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
    (root / '2024' / 'empty.png').write_bytes(b'')
    os.symlink(root / 'nowhere.png', root / '2024' / 'gone.png')
    (root / '2024' / 'twin.png').write_bytes((root / '2023' / 'p0.png').read_bytes())
    return sorted(str(root / p) for p in datasets.list_images(str(root)).paths)


def reference_read(paths, size):
    """What the one-process reader of datasets/images.py gives for each file: (pixels or
    None, reason or None, SHA-1 or None), and the note lines."""
    notes, found = datasets.ImageNotes(), []
    for path in paths:
        try:
            with open(path, 'rb') as f:
                data = f.read()
        except OSError as err:
            found.append((None, datasets.failure_reason(err), None))
            continue
        try:
            pixels = datasets.decode_image(data, size, notes, path)
            found.append((pixels, None, hashlib.sha1(data).digest()))
        except datasets.UnreadableImage as err:
            found.append((None, datasets.failure_reason(err), hashlib.sha1(data).digest()))
    return found, notes.lines()


def read_all(paths, size, reading):
    notes, stats = datasets.ImageNotes(), ReadStats()
    found = [(None if r.reason else np.array(r.pixels()), r.reason, r.digest)
             for r in read_files(paths, size, reading, notes, stats)]
    return found, notes.lines(), stats


def assert_same_reads(found, expected):
    assert len(found) == len(expected)
    for (pixels, reason, digest), (want_pixels, want_reason, want_digest) in zip(found,
                                                                                  expected):
        assert reason == want_reason and digest == want_digest
        if want_pixels is None:
            assert pixels is None
        else:
            assert pixels.dtype == np.uint8 and np.array_equal(pixels, want_pixels)


# ----------------------------------------------------------------------------- 1. decoding
@pytest.mark.parametrize('size', [None, SIZE])
@pytest.mark.parametrize('workers', [1, 2, 3])
def test_every_file_reads_as_the_one_process_reader_reads_it(tmp_path, size, workers):
    """Pixels, digests, reasons and notes, in order: in this process, on a pool, without the
    cache, filling it, and mapped back from it."""
    paths = messy_folder(tmp_path / 'photos')
    expected, expected_notes = reference_read(paths, size)
    assert sum(pixels is None for pixels, _, _ in expected) == 3      # corrupt, empty, gone
    found, notes, stats = read_all(paths, size, Reading(None, workers))
    assert_same_reads(found, expected)
    assert notes == expected_notes and stats.decoded == len(paths)
    assert stats.processes == (workers if len(paths) >= 2 * workers else 1)
    cache = datasets.ImageCache(tmp_path / 'cache')
    for decoded in (len(paths), 1):           # cold; warm (the broken link is tried again)
        found, notes, stats = read_all(paths, size, Reading(cache, workers))
        assert_same_reads(found, expected)
        assert notes == expected_notes
        assert stats.decoded == decoded and stats.from_cache == len(paths) - decoded
        cache = datasets.ImageCache(tmp_path / 'cache')       # a new process's view


def test_a_changed_added_or_removed_file_is_decoded_again_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(image_cache, 'RACY_SECONDS', 0)    # files made a moment ago count
    folder = tmp_path / 'photos'
    paths = photo_folder(folder, 8, 50, 40)
    cache_dir = tmp_path / 'cache'

    def read(paths):
        found, _, stats = read_all(paths, SIZE, Reading(datasets.ImageCache(cache_dir), 2))
        assert_same_reads(found, reference_read(paths, SIZE)[0])
        return stats
    assert read(paths).decoded == 8
    stats = read(paths)
    assert (stats.decoded, stats.hashed, stats.from_cache) == (0, 0, 8)   # by the file index
    photo(folder / '3.png', 50, 40, 99)                                    # changed
    stats = read(paths)
    assert (stats.decoded, stats.hashed) == (1, 0)
    photo(folder / '8.png', 60, 40, 8)                                     # added
    assert read(paths + [str(folder / '8.png')]).decoded == 1
    assert read(paths[:5] + paths[6:]).decoded == 0                         # removed
    os.makedirs(tmp_path / 'copy')                                         # a copy: new
    for path in paths:                                                     # inodes, same
        os.link(path, tmp_path / 'copy' / os.path.basename(path))          # bytes
    copied = sorted(str(p) for p in (tmp_path / 'copy').iterdir())
    os.rename(tmp_path / 'copy', tmp_path / 'moved')
    moved = [p.replace(str(tmp_path / 'copy'), str(tmp_path / 'moved')) for p in copied]
    assert read(moved).decoded == 0


def test_the_dataset_equals_the_one_read_without_the_cache(tmp_path):
    """Images, fingerprint, notes and mean/std of an unlabeled folder and a class tree: with
    the cache (filled, then mapped) as without it."""
    folder = tmp_path / 'photos'
    messy_folder(folder)
    tree = write_image_folder(tmp_path / 'tree', classes=3, train_per_class=3, size=36)
    for name, root in (('folder', str(folder)), ('folder', tree)):
        plain = datasets.load_dataset(name, root, image_size=SIZE)
        for _ in range(2):
            cached = datasets.load_dataset(name, root, image_size=SIZE, reading=Reading(
                datasets.ImageCache(tmp_path / 'cache'), 2))
            for a, b in zip(plain, cached):
                if a is None:
                    assert b is None
                    continue
                assert isinstance(b.images, ImageRows) and isinstance(a.images, np.ndarray)
                assert np.array_equal(np.asarray(b.images), a.images)
                assert a.fingerprint == b.fingerprint and a.skipped == b.skipped
            assert plain[0].notes == cached[0].notes[:len(plain[0].notes)]
            assert datasets.mean_std(name, plain[0]) == datasets.mean_std(
                name, cached[0], datasets.ImageCache(tmp_path / 'cache'))


# ----------------------------------------------------------------------------- 2. the cache
KILLED_WRITER = '''
import os, signal, sys
sys.path.insert(0, {root!r})
from datasets import ImageCache, Reading, image_cache
from datasets.decoding import read_files
image_cache.SEGMENT_BYTES = 1           # a pack and its manifest per image
where, paths = sys.argv[1], sys.argv[2:]
written = {{'pack': 0, 'json': 0}}
write_atomically = image_cache._write_atomically

def dying(path, write):
    kind = path.rsplit('.', 1)[1]
    written[kind] += 1
    if written[kind] == 3 and where == 'before-manifest' and kind == 'json':
        os.kill(os.getpid(), signal.SIGKILL)            # the pack renamed, no manifest
    if written[kind] == 3 and where == 'mid-' + kind:
        def half(f):                                    # part of the file, then the kill
            f.write(b'\\x07' * 100)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return write_atomically(path, half)
    return write_atomically(path, write)

image_cache._write_atomically = dying
for _ in read_files(paths, 40, Reading(ImageCache(os.environ['CACHE']), 1)):
    pass
'''


@pytest.mark.parametrize('where', ['mid-pack', 'mid-json', 'before-manifest'])
def test_a_writer_killed_mid_write_leaves_nothing_that_is_read(tmp_path, where):
    paths = photo_folder(tmp_path / 'photos', 6, 50, 45)
    cache_dir = tmp_path / 'cache'
    proc = subprocess.run([sys.executable, '-c', KILLED_WRITER.format(root=ROOT), where, *paths],
                          env={**os.environ, 'CACHE': str(cache_dir)}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = [name for _, _, names in os.walk(cache_dir) for name in names]
    assert any(name.startswith('.tmp-') or name.endswith('.pack') for name in left)
    found, _, stats = read_all(paths, SIZE, Reading(datasets.ImageCache(cache_dir), 2))
    assert_same_reads(found, reference_read(paths, SIZE)[0])
    assert stats.decoded == 4 and stats.from_cache == 2     # the 2 written whole are used
    # Once old enough to belong to a dead writer, what it left is removed by the next one.
    for folder_path, _, names in os.walk(cache_dir):
        for name in names:
            os.utime(os.path.join(folder_path, name), (0, 0))
    with datasets.ImageCache(cache_dir).filling('40px', paths):
        pass
    left = [name for _, _, names in os.walk(cache_dir) for name in names]
    assert not any(name.startswith('.tmp-') for name in left)
    assert sum(name.endswith('.pack') for name in left) == sum(name.endswith('.json')
                                                               for name in left)


def packs_of(cache_dir):
    return sorted(os.path.join(folder, name) for folder, _, names in os.walk(cache_dir)
                  for name in names if name.endswith('.pack'))


DAMAGES = {
    'truncated pack': lambda pack: os.truncate(pack, os.path.getsize(pack) - 7),
    'a byte changed': lambda pack: _flip_byte(pack),
    'pack copied (the same bytes)': lambda pack: _copied_over(pack),
    'foreign files': lambda pack: _foreign(os.path.dirname(pack)),
    'manifest of another reader': lambda pack: _edit_manifest(pack, reader='r1-00000000'),
    'manifest of another format': lambda pack: _edit_manifest(pack, version=99),
    'manifest cut short': lambda pack: os.truncate(pack[:-5] + '.json', 30),
    'file index damaged': lambda pack: _damage_index(pack),
}


def _flip_byte(pack):
    with open(pack, 'r+b') as f:
        f.seek(5)
        value = f.read(1)
        f.seek(5)
        f.write(bytes([value[0] ^ 0xFF]))


def _copied_over(pack):
    data = open(pack, 'rb').read()
    os.remove(pack)
    with open(pack, 'wb') as f:
        f.write(data)


def _foreign(folder):
    for name, data in (('notes.json', b'{"format": "something else"}'), ('x.pack', b'\0' * 99),
                       ('README', b'hello'), ('zz.json', b'\x00\x01')):
        with open(os.path.join(folder, name), 'wb') as f:
            f.write(data)


def _edit_manifest(pack, **changes):
    path = pack[:-5] + '.json'
    manifest = json.load(open(path))
    manifest.update(changes)
    json.dump(manifest, open(path, 'w'))


def _damage_index(pack):
    index = os.path.join(os.path.dirname(os.path.dirname(pack)), 'files.npz')
    with open(index, 'wb') as f:
        f.write(b'PK\x03\x04 not a whole archive')


@pytest.mark.parametrize('damage', sorted(DAMAGES))
def test_a_damaged_or_foreign_cache_is_never_read_wrong(tmp_path, damage, monkeypatch):
    monkeypatch.setattr(image_cache, 'RACY_SECONDS', 0)
    folder = tmp_path / 'photos'
    paths = messy_folder(folder)
    cache_dir = tmp_path / 'cache'
    expected, expected_notes = reference_read(paths, SIZE)
    read_all(paths, SIZE, Reading(datasets.ImageCache(cache_dir), 2))
    (pack,) = packs_of(cache_dir)
    DAMAGES[damage](pack)
    cache = datasets.ImageCache(cache_dir)
    with no_file_left_open():
        found, notes, stats = read_all(paths, SIZE, Reading(cache, 2))
    assert_same_reads(found, expected)
    assert notes == expected_notes
    used = damage in ('foreign files', 'file index damaged', 'pack copied (the same bytes)')
    assert stats.decoded == (1 if used else len(paths))      # (1: the broken link)
    said = cache.take_notes()
    assert len(said) == (0 if damage.startswith('pack copied') else 1), said
    assert all(line.startswith('note: the ') for line in said)
    # and once repaired, the next read maps everything, and has nothing to say
    cache = datasets.ImageCache(cache_dir)
    found, _, stats = read_all(paths, SIZE, Reading(cache, 2))
    assert_same_reads(found, expected)
    assert stats.decoded == 1 and cache.take_notes() == []


def test_another_reader_version_has_a_cache_of_its_own(tmp_path, monkeypatch):
    paths = messy_folder(tmp_path / 'photos')
    cache_dir = tmp_path / 'cache'
    read_all(paths, SIZE, Reading(datasets.ImageCache(cache_dir), 1))
    monkeypatch.setattr(datasets.images, 'READER_VERSION', 3)
    monkeypatch.setattr(image_cache, 'READER_VERSION', 3)
    _, _, stats = read_all(paths, SIZE, Reading(datasets.ImageCache(cache_dir), 1))
    assert stats.decoded == len(paths)
    monkeypatch.setattr(image_cache, 'reader_id', lambda: 'r2-ffffffff')    # another Pillow
    _, _, stats = read_all(paths, SIZE, Reading(datasets.ImageCache(cache_dir), 1))
    assert stats.decoded == len(paths)


def test_a_cache_that_cannot_be_written_is_said_once_and_the_run_goes_on(tmp_path, run_main,
                                                                          tiny_folder):
    blocker = tmp_path / 'a-file'
    blocker.write_text('not a folder')
    code, out, err = run_main(*fast_args(tiny_folder, tmp_path / 'run', '--rounds', '1',
                                         '--epochs', '1', '--cache-dir', blocker / 'cache',
                                         *UNBROKEN_FLAGS['cpu'][4:]))
    assert code == 0, err
    said = [line for line in out.splitlines() if 'image cache' in line and 'cannot' in line]
    assert len(said) == 1 and 'Not a directory' in said[0] and '--no-cache' in said[0]


def test_a_full_disk_is_said_once_and_every_image_is_still_read(tmp_path, monkeypatch):
    paths = messy_folder(tmp_path / 'photos')
    expected, _ = reference_read(paths, SIZE)
    monkeypatch.setattr(image_cache, 'SEGMENT_BYTES', 1)

    def full(path, write):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(image_cache, '_write_atomically', full)
    cache = datasets.ImageCache(tmp_path / 'cache')
    found, _, stats = read_all(paths, SIZE, Reading(cache, 2))
    assert_same_reads(found, expected)
    images = datasets.load_dataset('folder', str(tmp_path / 'photos'), image_size=SIZE,
                                   reading=Reading(cache, 1))[0]
    assert len(images) == len(paths) - 3
    said = cache.take_notes() + images.notes
    assert sum('the disk is full' in line for line in said) == 1


FILLER = '''
import hashlib, json, sys
sys.path.insert(0, {root!r})
from datasets import ImageCache, Reading, ReadStats
from datasets.decoding import read_files
stats = ReadStats()
rows = [hashlib.sha1(r.pixels().tobytes()).hexdigest() if r.reason is None else r.reason
        for r in read_files(sys.argv[2:], 40, Reading(ImageCache(sys.argv[1]), 1), None, stats)]
print(json.dumps(dict(rows=rows, decoded=stats.decoded)))
'''


def test_two_processes_filling_one_cache_do_not_corrupt_it(tmp_path):
    paths = messy_folder(tmp_path / 'photos')
    expected = [hashlib.sha1(p.tobytes()).hexdigest() if p is not None else reason
                for p, reason, _ in reference_read(paths, SIZE)[0]]
    cache_dir = tmp_path / 'cache'
    script = [sys.executable, '-c', FILLER.format(root=ROOT), str(cache_dir)]
    procs = [subprocess.Popen(script + paths, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [json.loads(proc.communicate(timeout=120)[0]) for proc in procs]
    assert all(result['rows'] == expected for result in results)
    # one decoded, the other waited for it and mapped what it wrote (the link both tried)
    assert sorted(result['decoded'] for result in results) == [1, len(paths)]
    found, _, stats = read_all(paths, SIZE, Reading(datasets.ImageCache(cache_dir), 2))
    assert stats.decoded == 1
    assert_same_reads(found, reference_read(paths, SIZE)[0])


# ----------------------------------------------------------------------------- 3. memory
def test_mapped_rows_index_as_an_array_does(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (n, 5, 4, 3), dtype=np.uint8) for n in (3, 7, 1)]
    blocks = []
    for i, array in enumerate(arrays[:2]):
        path = tmp_path / f'{i}.bin'
        array.tofile(path)
        blocks.append(datasets.image_rows.MappedArray(str(path), len(array), (5, 4, 3)))
    rows = datasets.image_rows.concatenate([*blocks, arrays[2]])
    whole = np.concatenate(arrays)
    assert rows.shape == whole.shape and rows.nbytes == whole.nbytes
    for key in (0, 5, -1, slice(2, 9), slice(None, None, 3), [10, 0, 4, 4, 3],
                np.array([9, 2, 3, 4])):
        assert np.array_equal(rows[key], whole[key])
    picked = rows.select([8, 1, 2])
    assert np.array_equal(np.asarray(picked), whole[[8, 1, 2]])
    assert pixel_digest(rows).hexdigest() == hashlib.sha1(whole.tobytes()).hexdigest()
    assert [start for start, _ in chunks(rows, chunk_bytes=4 * 60)] == [0, 4, 8]


@pytest.mark.parametrize('count', [1, 5, 17])
def test_channel_statistics_read_in_chunks_equal_the_whole_array_formula(count, monkeypatch):
    monkeypatch.setattr(datasets.image_rows, 'CHUNK_BYTES', 3 * 8 * 6 * 3)
    images = np.random.default_rng(count).integers(0, 256, (count, 8, 6, 3), dtype=np.uint8)
    pixels = images.reshape(count, -1, 3).astype(np.float64) / 255.0
    mean, std = channel_statistics(images)
    np.testing.assert_allclose(mean, pixels.mean(axis=(0, 1)), rtol=1e-14)   # (exact sums)
    np.testing.assert_array_equal(std, pixels.std(axis=1).mean(axis=0))


def test_a_cached_training_set_stays_in_mapped_files(tmp_path):
    tree = write_image_folder(tmp_path / 'tree', classes=2, train_per_class=4)
    reading = Reading(datasets.ImageCache(tmp_path / 'cache'), 1)
    train, test = datasets.load_dataset('folder', tree, reading=reading)
    for split in (train, test):
        assert all(isinstance(block, datasets.image_rows.MappedArray)
                   for block in split.images.blocks)
    subset = train.subset([5, 1])
    assert isinstance(subset.images, ImageRows)
    assert np.array_equal(np.asarray(subset.images), np.asarray(train.images)[[5, 1]])


def small_sets(tmp_path):
    tree = write_image_folder(tmp_path / 'tree', classes=3, train_per_class=5, test_per_class=4,
                              size=36)
    return datasets.load_dataset('folder', tree, image_size=32, reading=Reading(
        datasets.ImageCache(tmp_path / 'cache'), 1))


def test_streamed_batches_equal_the_device_resident_ones(tmp_path):
    from lib.pipelines import TensorPipeline
    train, test = small_sets(tmp_path)
    made = []
    for budget in (None, 1):
        pipeline = TensorPipeline(train, test, (0.5,) * 3, (0.25,) * 3, 32, 2, 4, 'cpu', 7,
                                  memory_budget=budget)
        assert pipeline.resident == (budget is None)
        made.append(([(v.clone(), i.clone()) for v, i in pipeline.train_batches(1, 2, 1)],
                     [list(pipeline.eval_batches(split, (2, 11)))
                      for split in ('train', 'test')]))
    (resident, resident_eval), (streamed, streamed_eval) = made
    assert len(resident) == len(streamed) == 15 // 4 - 1
    for (a, i), (b, j) in zip(resident, streamed):
        assert torch.equal(a, b) and torch.equal(i, j)
    for split_a, split_b in zip(resident_eval, streamed_eval):
        for (a, y), (b, z) in zip(split_a, split_b):
            assert torch.equal(a, b) and torch.equal(y, z)


@pytest.mark.parametrize('pipeline, extra', [('cpu', ['--no-cache']), ('gpu', ['--no-cache']),
                                             ('gpu', ['--data-memory', '0.000001'])])
def test_a_run_without_the_cache_or_streamed_equals_the_run_with_it(tmp_path, run_main,
                                                                     tiny_folder, unbroken_run,
                                                                     pipeline, extra):
    code, out, err = run_main(*fast_args(tiny_folder, tmp_path / 'run',
                                         *UNBROKEN_FLAGS[pipeline], *extra))
    assert code == 0, err
    if '--data-memory' in extra:
        assert 'exceed the 0.0 MB budget (--data-memory): each batch is read from the host' \
            in out
    if '--no-cache' in extra:
        assert 'decoded on 1 process (' in out and 'images/s) into memory' in out
    else:       # all read from the cache, or decoded into it when this run is the first to
                # read these files (whichever test ran before)
        assert re.search(r'(all from|\) into) the image cache', out), out
    assert_same_training_state(torch.load(tmp_path / 'run' / 'last.t7', weights_only=True),
                               unbroken_run(pipeline))


# ----------------------------------------------------------------------------- 4. STL-10
STL_CLASSES = ['airplane', 'bird', 'car', 'cat', 'deer', 'dog', 'horse', 'monkey', 'ship',
               'truck']


def stl_bytes(images):
    """The images (N x 96 x 96 x 3) in STL-10's layout, written from its description: for
    each image, for each channel, the pixels column after column."""
    return b''.join(image[:, :, channel].flatten(order='F').tobytes()
                    for image in images for channel in range(3))


def write_stl10(root, labelled=6, unlabeled=9, test=5, seed=0):
    """A small stl10_binary/ in the real byte layout; each class a colour of its own. Returns
    the images and labels written."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(30, 226, (10, 3))
    folder = root / 'stl10_binary'
    os.makedirs(folder)
    written = {}
    for name, count, labels in (('train', labelled, True), ('test', test, True),
                                ('unlabeled', unlabeled, False)):
        classes = rng.integers(0, 10, count)
        images = np.clip(colours[classes][:, None, None, :] + rng.normal(0, 20, (count, 96, 96, 3))
                         + np.arange(96)[None, :, None, None] * 0.5, 0, 255).astype(np.uint8)
        (folder / f'{name}_X.bin').write_bytes(stl_bytes(images))
        if labels:
            (folder / f'{name}_y.bin').write_bytes((classes + 1).astype(np.uint8).tobytes())
        written[name] = (images, classes)
    (folder / 'class_names.txt').write_text('\n'.join(STL_CLASSES) + '\n')
    return written


def test_stl10_is_read_from_its_binary_layout(tmp_path):
    written = write_stl10(tmp_path)
    train, test = datasets.load_dataset('stl10', str(tmp_path), download=False)
    want = np.concatenate([written['train'][0], written['unlabeled'][0]])
    assert np.array_equal(np.asarray(train.images), want)
    assert list(train.targets) == list(written['train'][1]) + [-1] * 9
    assert train.num_labelled == 6 and train.classes == STL_CLASSES
    assert np.array_equal(np.asarray(test.images), written['test'][0])
    assert list(test.targets) == list(written['test'][1])
    assert train.fingerprint['content'] == 'pixels:' + hashlib.sha1(
        want.tobytes()).hexdigest()[:16]
    # a subset keeps the labelled images first; the image cache keeps the digest
    picked = datasets.load_dataset('stl10', str(tmp_path), subset=8, seed=3, reading=Reading(
        datasets.ImageCache(tmp_path / 'cache')))[0]
    chosen = datasets.random_subset_indices(15, 8, 3)
    assert np.array_equal(np.asarray(picked.images), want[chosen])
    assert picked.fingerprint['content'] == 'pixels:' + hashlib.sha1(
        want[chosen].tobytes()).hexdigest()[:16]
    picked.num_labelled                         # (asserts the labelled rows come first)


@pytest.mark.parametrize('damage, needle', [
    (lambda f: os.truncate(f / 'train_X.bin', 100), 'not a whole number of 27,648-byte'),
    (lambda f: (f / 'train_y.bin').write_bytes(b'\x01\x0b' * 3), 'labels from 1 to 10'),
    (lambda f: os.remove(f / 'unlabeled_X.bin'), 'No such file'),
])
def test_a_damaged_stl10_copy_is_refused_in_one_line(tmp_path, run_main, damage, needle):
    write_stl10(tmp_path / 'data')
    damage(tmp_path / 'data' / 'stl10_binary')
    code, _, err = run_main('--dataset', 'stl10', '--data-root', tmp_path / 'data',
                            '--model_dir', tmp_path / 'run', '--device', 'cpu', '--epochs', '1')
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize('damage, said', [
    (lambda f: os.truncate(f / 'train_X.bin', 27648 * 5),
     'STL-10 files {f}/train_X.bin and {f}/train_y.bin disagree: 5 images and 6 labels; one '
     'of them is cut short (a copy that did not finish?)'),
    (lambda f: (f / 'test_y.bin').write_bytes((f / 'test_y.bin').read_bytes()[:-1]),
     'STL-10 files {f}/test_X.bin and {f}/test_y.bin disagree: 5 images and 4 labels; one of '
     'them is cut short (a copy that did not finish?)')])
def test_stl10_files_cut_short_by_whole_images_name_both_files(tmp_path, run_main, damage,
                                                               said):
    """A copy that stops on a whole number of images: the image and label files disagree, and
    both are named (the label file alone was blamed)."""
    write_stl10(tmp_path / 'data')
    folder = tmp_path / 'data' / 'stl10_binary'
    damage(folder)
    code, _, err = run_main('--dataset', 'stl10', '--data-root', tmp_path / 'data',
                            '--model_dir', tmp_path / 'run', '--device', 'cpu', '--epochs', '1')
    assert code == 2 and err == f'error: {said.format(f=folder)}\n'


def test_stl10_counts_other_than_the_official_ones_are_said_and_no_labels_no_knn(tmp_path,
                                                                                  run_main):
    """An unlabeled_X.bin cut short by whole images is read (nothing disagrees) but the
    counts, not the official 5,000, 100,000 and 8,000, are said; a --subset that holds no
    labelled image has no kNN to report (0.00% of no votes), and is refused."""
    write_stl10(tmp_path / 'data', labelled=2, unlabeled=40, test=5)
    folder = tmp_path / 'data' / 'stl10_binary'
    flags = ['--dataset', 'stl10', '--data-root', tmp_path / 'data', '--device', 'cpu',
             '--epochs', '1', '--rounds', '1', '--batch_size', '2', '--workers', '0',
             '--no-tensorboard', '--network', 'alexnet', '--knn-k', '1']
    code, out, err = run_main(*flags, '--model_dir', tmp_path / 'a', '--stop-after', '1')
    assert code == 0, err
    assert (f'note: the STL-10 files in {folder} hold 2 labelled, 40 unlabeled and 5 test '
            f'images, not the 5,000, 100,000 and 8,000 of the official distribution (a copy '
            f'cut short?)') in out
    chosen = datasets.random_subset_indices(42, 3, 0)
    assert min(chosen) >= 2                 # (seed 0 picks 3 of the 40 unlabeled images)
    code, out, err = run_main(*flags, '--model_dir', tmp_path / 'b', '--subset', '3')
    assert code == 2 and err == ('error: none of the 3 training images of --subset 3 is '
                                 'labelled, so the kNN would have no votes and its accuracy '
                                 'no meaning: give a larger --subset\n')


def test_a_split_or_a_damaged_torchvision_folder_is_named_not_downloaded_over(tmp_path,
                                                                              run_main):
    copy = write_image_folder(tmp_path / 'copy')
    code, _, err = run_main('--data-root', os.path.join(copy, 'train'), '--model_dir',
                            tmp_path / 'run', '--device', 'cpu')
    assert code == 2 and err == (f'error: {copy}/train is the train/ split of an image-folder '
                                 f'copy: give the folder that holds train/ and test/, '
                                 f'--data-root {copy}\n')
    extracted = tmp_path / 'tv' / 'cifar-10-batches-py'
    extracted.mkdir(parents=True)
    (extracted / 'data_batch_1').write_bytes(b'junk')
    code, _, err = run_main('--data-root', tmp_path / 'tv', '--model_dir', tmp_path / 'run',
                            '--device', 'cpu')
    assert code == 2 and err.startswith(f'error: {extracted} is incomplete or damaged '
                                        f'(torchvision could not read it: ')
    assert err.endswith('; no download was tried): delete it, or unpack '
                        'cifar-10-python.tar.gz there again\n')


def test_knn_votes_with_the_labelled_images_only():
    """STL-10's kNN: the bank rows of unlabeled images (which come after the labelled ones)
    never vote, however close they are."""
    from lib.core.knn import KnnData, training_features

    class Bank:
        memory = torch.nn.functional.normalize(torch.randn(9, 4), dim=1)
    labels = torch.tensor([0, 1, 2, 0])
    features = training_features(None, Bank, KnnData(None, labels, 3, 'bank'))
    assert torch.equal(features, Bank.memory[:4])


def test_a_run_on_stl10_trains_evaluates_and_draws(tmp_path, run_main):
    write_stl10(tmp_path / 'data', labelled=10, unlabeled=10, test=6)
    run = tmp_path / 'run'
    code, out, err = run_main('--dataset', 'stl10', '--data-root', tmp_path / 'data',
                              '--model_dir', run, '--device', 'cpu', '--rounds', '2',
                              '--epochs', '1', '--batch_size', '4', '--workers', '0',
                              '--no-tensorboard', '--knn-k', '5')
    assert code == 0, err
    assert 'data: 20 training images (10 labelled) and 6 test images, 10 classes' in out
    assert '96 px' in out
    records = [json.loads(line) for line in open(run / 'log.jsonl')]
    assert records[0]['options']['image_size'] == 96
    epochs = [record for record in records if record['type'] == 'epoch']
    assert len(epochs) == 2 and all(record['knn_top1'] is not None for record in epochs)
    from tools import visualize
    for figure, extra in (('retrieval', ['--topk', '3']), ('probabilities', [])):
        out_png = tmp_path / f'{figure}.png'
        assert visualize.main([figure, '--ckpt', str(run / 'ckpt.t7'), '--out', str(out_png),
                               '--device', 'cpu', '--queries', '2', *extra]) == 0
        assert Image.open(out_png).size[0] > 0
    from tools import linear_probe
    assert linear_probe.main(['--ckpt', str(run), '--epochs', '2', '--device', 'cpu',
                              '--quiet']) == 0


# ----------------------------------------------------------------------------- tools
def test_embed_streams_through_the_cache_and_writes_the_same_rows(tmp_path, capsys):
    from test_real_files import untrained_checkpoint
    from tools import embed
    folder = tmp_path / 'photos'
    messy_folder(folder)
    checkpoint = untrained_checkpoint(tmp_path / 'net.t7')
    written = []
    for extra in (['--no-cache'], ['--cache-dir', str(tmp_path / 'c')],
                  ['--cache-dir', str(tmp_path / 'c'), '--workers', '0']):
        out = tmp_path / f'e{len(written)}.npz'
        assert embed.main(['--ckpt', str(checkpoint), '--images', str(folder), '--out',
                           str(out), '--device', 'cpu', *extra]) == 0
        said = capsys.readouterr().out
        written.append(dict(np.load(out)))
        assert not os.path.exists(str(out) + '.rows.npy')
    assert 'decoded on' in said or 'all from the image cache' in said
    assert 'all from the image cache' in said.splitlines()[-2] or \
        '1 decoded' in said                        # (the broken link is tried again)
    for other in written[1:]:
        assert np.array_equal(other['features'], written[0]['features'])
        assert list(other['paths']) == list(written[0]['paths'])
        assert str(other['fingerprint']) == str(written[0]['fingerprint'])


def test_a_decoding_process_that_dies_is_one_line(tmp_path, monkeypatch):
    from datasets import decoding
    paths = messy_folder(tmp_path / 'photos')

    def killed(path, size, known):
        os.kill(os.getpid(), signal.SIGKILL)        # the out-of-memory killer, say
    monkeypatch.setattr(decoding, 'decode_file', killed)     # (the forked workers call it)
    with pytest.raises(datasets.DataError, match='a process decoding images died .killed, or '
                                                 'out of memory..; 2 were decoding at once: '
                                                 '--workers N sets how many'):
        read_all(paths, SIZE, Reading(None, 2))


SLOW_READER = '''
import os, sys, time
sys.path.insert(0, {root!r})
from datasets import ImageCache, Reading
from datasets.decoding import read_files
for i, read in enumerate(read_files(sys.argv[2:], 40, Reading(ImageCache(sys.argv[1]), 2))):
    if i == 0:
        open(sys.argv[1] + '.started', 'w').close()
    time.sleep(0.2)                     # a slow consumer: the pool waits with the lock held
'''


def _stop_signals_are_default():
    return [signal.getsignal(s) is signal.SIG_DFL for s in (signal.SIGTERM, signal.SIGHUP)]


def test_a_decoding_process_ends_at_sigterm_whatever_handler_it_inherited():
    """The run answers SIGTERM and SIGHUP with handlers of its own, which a forked decoding
    process inherits: there they would turn the SIGTERM that ends it into an error of one task,
    and it would go on decoding. Each decoding process takes the default action back."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from datasets import decoding

    def raise_(signum, frame):
        raise KeyboardInterrupt
    previous = {s: signal.signal(s, raise_) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with ProcessPoolExecutor(1, initializer=decoding._worker_starts,
                                 initargs=(None, os.getpid()),
                                 mp_context=multiprocessing.get_context('fork')) as pool:
            assert pool.submit(_stop_signals_are_default).result() == [True, True]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def test_a_reader_killed_mid_read_leaves_no_lock_held(tmp_path):
    """Its decoding workers end with it (they would otherwise hold the fill lock they
    inherited, and the next reader would wait for ever)."""
    paths = photo_folder(tmp_path / 'photos', 40, 30, 30)
    cache_dir = tmp_path / 'cache'
    proc = subprocess.Popen([sys.executable, '-c', SLOW_READER.format(root=ROOT),
                             str(cache_dir), *paths])
    deadline = time.time() + 60
    while not os.path.exists(str(cache_dir) + '.started') and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    reader = subprocess.run([sys.executable, '-c', FILLER.format(root=ROOT), str(cache_dir),
                             *paths], capture_output=True, text=True, timeout=120)
    assert reader.returncode == 0, reader.stderr
    assert json.loads(reader.stdout)['rows'] == [
        hashlib.sha1(p.tobytes()).hexdigest() for p, _, _ in reference_read(paths, SIZE)[0]]


def test_running_out_of_memory_is_no_reason_cached_against_a_file(tmp_path, monkeypatch):
    paths = messy_folder(tmp_path / 'photos')
    cache_dir = tmp_path / 'cache'
    real = datasets.images._eight_bit_rgb

    def out_of_memory(*args):
        raise MemoryError
    monkeypatch.setattr(datasets.images, '_eight_bit_rgb', out_of_memory)
    with pytest.raises(datasets.DataError, match='out of memory while decoding .*: give fewer '
                                                 '--workers, or free memory'):
        read_all(paths, SIZE, Reading(datasets.ImageCache(cache_dir), 1))
    monkeypatch.setattr(datasets.images, '_eight_bit_rgb', real)
    found, _, _ = read_all(paths, SIZE, Reading(datasets.ImageCache(cache_dir), 1))
    assert_same_reads(found, reference_read(paths, SIZE)[0])


def test_the_file_index_is_keyed_by_path_too(tmp_path, monkeypatch):
    """Some file systems number inodes as they meet files: an entry is used only for the path
    it was made for (another path to the same inode is read and hashed again)."""
    monkeypatch.setattr(image_cache, 'RACY_SECONDS', 0)
    folder = tmp_path / 'photos'
    os.makedirs(folder)
    photo(folder / 'a.png', 30, 30, 1)
    cache_dir = tmp_path / 'cache'
    read_all([str(folder / 'a.png')], SIZE, Reading(datasets.ImageCache(cache_dir), 1))
    _, _, stats = read_all([str(folder / 'a.png')], SIZE,
                           Reading(datasets.ImageCache(cache_dir), 1))
    assert (stats.from_cache, stats.hashed) == (1, 0)
    os.link(folder / 'a.png', folder / 'b.png')
    _, _, stats = read_all([str(folder / 'b.png')], SIZE,
                           Reading(datasets.ImageCache(cache_dir), 1))
    assert (stats.from_cache, stats.hashed, stats.decoded) == (1, 1, 0)
