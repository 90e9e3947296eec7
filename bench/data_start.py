"""What reading a folder of photos costs: cold and warm starts, decoding on every core, and the
private memory of a run whose decoded images are larger than its budget.

    python bench/data_start.py --folder /scratch/photo-bench                  # the full table
    python bench/data_start.py --folder /tmp/b --counts 40 --sizes 96 --memory-images 0

It makes `--counts` photo-like files under `--folder` (JPEGs of 1 to 12 megapixels, a fifth of
them EXIF-rotated, a tenth PNGs; every file's bytes differ), then for each count and each
`--sizes` trains `main.py` on them as a folder of unlabeled images (resnet18, cpu device) and
reports, from each run's log.jsonl:
- cold start (an empty image cache: every file decoded and cached) and warm start (the same
  data again, a new run folder): seconds from launch to the `start` record, written just
  before the first training step, and their ratio;
- the decoding rate of the cold start on all cores (`data.reading` of that record) against
  the single-core floor (`datasets.decode_image` of a sample of the files in this process)
  times the core count;
- with `--memory-images N` (default 40,000, about 8 GB decoded at 224 px), the peak private
  memory (RssAnon: mapped file pages belong to the page cache) of the training process for
  --pipeline cpu, for --pipeline gpu within a 2 GB budget (streamed) and without one (held).
Each run is stopped (SIGKILL) once it reaches its first steps. A benchmark, not a test: the
figures depend on the machine; run it alone.
"""
import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import datasets  # noqa: E402

MEGAPIXELS = (1, 2, 4, 8, 12)
ASPECT = 4 / 3                  # photos are 4:3 (12 MP: 4000 x 3000)
BASES_PER_SIZE = 3              # distinct encoded images per size; copies differ in a comment
STEPS_WATCHED = 15              # seconds a run trains after its start record (memory runs)
MEMORY_BATCH = 8                # images per step of the memory runs


def parse_args():
    p = argparse.ArgumentParser(description=' '.join(__doc__.split('\n\n')[0].split()))
    p.add_argument('--folder', required=True, help='where the files, caches and runs go')
    p.add_argument('--counts', type=int, nargs='+', default=[2000, 20000])
    p.add_argument('--sizes', type=int, nargs='+', default=[96, 224])
    p.add_argument('--memory-images', dest='memory_images', type=int, default=40000,
                   help='files of 256 x 256 px for the memory runs (0: none)')
    p.add_argument('--floor-sample', dest='floor_sample', type=int, default=60,
                   help='files decoded in this process for the single-core floor')
    p.add_argument('--batch_size', type=int, default=32, help='of the start-time runs')
    return p.parse_args()


# ----------------------------------------------------------------------------- the files
def photo_like(width, height, seed):
    """Smooth colour fields with texture and noise: compresses like a photo, not like noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 64), max(2, width // 64), 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC),
                       dtype=np.int16)
    noise = rng.integers(-5, 6, (height, width, 1), dtype=np.int16)
    return Image.fromarray(np.clip(image + noise, 0, 255).astype(np.uint8))


def encoded_bases(seed=0):
    """{kind: [bytes]}: JPEGs of each size (plain and EXIF-rotated) and ~1 MP PNGs."""
    bases = {'jpeg': [], 'rotated': [], 'png': []}
    for i, megapixels in enumerate(MEGAPIXELS):
        height = int(round((megapixels * 1e6 / ASPECT) ** 0.5))
        width = int(round(height * ASPECT))
        for j in range(BASES_PER_SIZE):
            image = photo_like(width, height, seed + 10 * i + j)
            plain, rotated = io.BytesIO(), io.BytesIO()
            image.save(plain, 'JPEG', quality=90)
            exif = Image.Exif()
            exif[0x0112] = 6 if j % 2 else 8
            image.save(rotated, 'JPEG', quality=90, exif=exif.tobytes())
            bases['jpeg'].append(plain.getvalue())
            bases['rotated'].append(rotated.getvalue())
    for j in range(BASES_PER_SIZE):
        png = io.BytesIO()
        photo_like(1152, 864, seed + 100 + j).save(png, 'PNG')
        bases['png'].append(png.getvalue())
    return bases


def unique(data, kind, index):
    """The bytes of a base image made unique: a JPEG comment after its first marker, or bytes
    after a PNG's end (readers ignore both; the file's digest differs)."""
    tag = f'bench file {index}'.encode()
    if kind == 'png':
        return data + tag
    return data[:2] + b'\xff\xfe' + (len(tag) + 2).to_bytes(2, 'big') + tag + data[2:]


def make_photos(folder, count, seed=0):
    """`count` files under folder/<count>/ (nested by hundreds); made once, kept."""
    root = os.path.join(folder, f'photos-{count}')
    done = os.path.join(root, '.complete')
    if os.path.exists(done):
        return root
    shutil.rmtree(root, ignore_errors=True)
    bases, rng = encoded_bases(seed), np.random.default_rng(seed)
    for index in range(count):
        draw = rng.random()
        kind = 'png' if draw < 0.1 else 'rotated' if draw < 0.3 else 'jpeg'
        data = bases[kind][rng.integers(len(bases[kind]))]
        sub = os.path.join(root, f'{index // 1000:03d}', f'{index // 100 % 10}')
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, f'IMG_{index:06d}.{"png" if kind == "png" else "jpg"}'),
                  'wb') as f:
            f.write(unique(data, kind, index))
    open(done, 'w').close()
    return root


def make_squares(folder, count, side=256, seed=1):
    """`count` JPEGs of side x side: the memory runs' data (decoded at 224 px: stored as is)."""
    root = os.path.join(folder, f'squares-{count}')
    done = os.path.join(root, '.complete')
    if os.path.exists(done):
        return root
    shutil.rmtree(root, ignore_errors=True)
    bases = []
    for j in range(8):
        encoded = io.BytesIO()
        photo_like(side, side, seed + j).save(encoded, 'JPEG', quality=90)
        bases.append(encoded.getvalue())
    for index in range(count):
        sub = os.path.join(root, f'{index // 1000:03d}')
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, f'{index:06d}.jpg'), 'wb') as f:
            f.write(unique(bases[index % len(bases)], 'jpeg', index))
    open(done, 'w').close()
    return root


# ----------------------------------------------------------------------------- measuring
def private_memory(pid):
    """RssAnon of `pid` in bytes (0 once it is gone)."""
    try:
        with open(f'/proc/{pid}/status') as f:
            for line in f:
                if line.startswith('RssAnon:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def start_run(data, size, cache, run_dir, *extra, watch=0.0):
    """main.py on `data` until its start record (then `watch` seconds more): (seconds to the
    start record, its `data` entry, peak RssAnon of the process)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    argv = [sys.executable, os.path.join(ROOT, 'main.py'), '--dataset', 'folder',
            '--data-root', data, '--image-size', str(size), '--model_dir', run_dir,
            '--cache-dir', cache, '--device', 'cpu', '--network', 'resnet18', '--quiet',
            '--no-tensorboard', '--epochs', '1', *extra]
    launched = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log, peak, started, record = os.path.join(run_dir, 'log.jsonl'), 0, None, None
    try:
        while proc.poll() is None:
            peak = max(peak, private_memory(proc.pid))
            if record is None and os.path.exists(log):
                with open(log) as f:
                    for line in f:
                        if '"start"' in line:
                            record = json.loads(line)
                            started = record['time'] - launched
            if record is not None and time.time() - launched - started >= watch:
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        _, err = proc.communicate()
    if record is None:
        raise SystemExit(f'main.py stopped before training: {err.strip()[-2000:]}')
    return started, record.get('data') or {}, peak


def single_core_rate(data, size, sample):
    """Images per second of the one-process reader on `sample` files of `data`."""
    paths = [os.path.join(data, p) for p in datasets.list_images(data).paths][:sample]
    stored = datasets.sources.stored_train_size(size)
    with open(paths[0], 'rb') as f:         # imports (torchvision's resize) before the clock
        datasets.decode_image(f.read(), stored)
    started = time.perf_counter()
    for path in paths:
        with open(path, 'rb') as f:
            datasets.decode_image(f.read(), stored, datasets.ImageNotes(), path)
    return len(paths) / (time.perf_counter() - started)


def main():
    global ARGS
    ARGS = parse_args()
    os.makedirs(ARGS.folder, exist_ok=True)
    cores = datasets.cpu_count()
    print(f'{cores} cores, torch/PIL as installed; files and caches under {ARGS.folder}')
    rows = []
    for count in ARGS.counts:
        started = time.time()
        data = make_photos(ARGS.folder, count)
        print(f'{count} photo-like files ready ({time.time() - started:.0f} s)', flush=True)
        for size in ARGS.sizes:
            cache = os.path.join(ARGS.folder, f'cache-{count}-{size}')
            shutil.rmtree(cache, ignore_errors=True)
            run_dir = os.path.join(ARGS.folder, 'run')
            batch = ['--batch_size', str(ARGS.batch_size)]
            cold, record, _ = start_run(data, size, cache, run_dir, *batch)
            warm, warm_record, _ = start_run(data, size, cache, run_dir, *batch)
            reading = record.get('reading') or {}
            rate = reading.get('decoded', 0) / max(reading.get('seconds', 0), 1e-9)
            floor = single_core_rate(data, size, ARGS.floor_sample)
            warm_decoded = (warm_record.get('reading') or {}).get('decoded')
            rows.append((count, size, cold, warm, rate, floor, cores, warm_decoded))
            shutil.rmtree(cache, ignore_errors=True)            # (gigabytes)
            print(f'  {count} files at {size} px: cold {cold:.1f} s, warm {warm:.1f} s',
                  flush=True)
    print()
    print('| files | px | cold start s | warm start s | cold / warm | decode img/s, '
          f'{cores} cores | floor img/s x {cores} | floor x cores / measured | decoded warm |')
    print('|---|---|---|---|---|---|---|---|---|')
    for count, size, cold, warm, rate, floor, cores, warm_decoded in rows:
        print(f'| {count} | {size} | {cold:.1f} | {warm:.1f} | {cold / warm:.1f} | {rate:.0f} '
              f'| {floor:.0f} x {cores} = {floor * cores:.0f} | {floor * cores / rate:.2f} | '
              f'{warm_decoded} |')
    if ARGS.memory_images:
        started = time.time()
        data = make_squares(ARGS.folder, ARGS.memory_images)
        print(f'\n{ARGS.memory_images} files of 256 px ready ({time.time() - started:.0f} s); '
              f'peak private memory (RssAnon) of the training process, {STEPS_WATCHED} s into '
              f'training at 224 px:')
        cache = os.path.join(ARGS.folder, 'cache-memory')
        run_dir = os.path.join(ARGS.folder, 'run')
        batch = ['--batch_size', str(MEMORY_BATCH)]     # (the network's activations are
        first, record, _ = start_run(data, 224, cache, run_dir, *batch)     # not the data's)
        print(f'(cold start to fill the cache: {first:.0f} s, {record.get("bytes", 0) / 2**30:.2f}'
              f' GB decoded)')
        print('| pipeline | images held | peak RssAnon GB |')
        print('|---|---|---|')
        for label, extra in (('cpu (loader, mapped cache)', ['--pipeline', 'cpu']),
                             ('gpu, --data-memory 2 (streamed)',
                              ['--pipeline', 'gpu', '--data-memory', '2']),
                             ('gpu, no budget (--data-memory 1000: held)',
                              ['--pipeline', 'gpu', '--data-memory', '1000'])):
            _, record, peak = start_run(data, 224, cache, run_dir, *batch, *extra,
                                        watch=STEPS_WATCHED)
            print(f'| {label} | {record.get("images")} | {peak / 2**30:.2f} |', flush=True)
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == '__main__':
    main()
