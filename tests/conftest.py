"""Shared fixtures: a generated tiny image-folder dataset and ways to run main.py."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(min(2, os.cpu_count() or 1))


def write_image_folder(root, classes=10, train_per_class=2, test_per_class=1, size=32, seed=0):
    """train/<class>/*.png and test/<class>/*.png, each class a noisy colour of its own."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(classes, 3))
    for split, count in (('train', train_per_class), ('test', test_per_class)):
        for c in range(classes):
            folder = os.path.join(root, split, f'class_{c:02d}')
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                pixels = colours[c] + rng.normal(0, 25, size=(size, size, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                    os.path.join(folder, f'{i:04d}.png'))
    return str(root)


@pytest.fixture(scope='session')
def tiny_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp('tiny'))


def fast_args(data_root, model_dir, *extra):
    """Flags of a quick CPU run on the tiny dataset."""
    return ['--data-root', data_root, '--model_dir', str(model_dir), '--batch_size', '8',
            '--workers', '0', '--device', 'cpu', '--log-dir', os.path.join(model_dir, 'runs'),
            *extra]


def run_cli(*argv, timeout=600):
    """main.py in a fresh interpreter: (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *map(str, argv)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def run_main(capsys):
    """main.main in this process (faster than a subprocess): (exit code, stdout, stderr)."""
    import main

    def run(*argv):
        try:
            code = main.main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code
        out, err = capsys.readouterr()
        return code, out, err
    return run
