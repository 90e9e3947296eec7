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


# The flags of the runs that resume, kill and stop tests compare with an unbroken run.
UNBROKEN_FLAGS = {'cpu': ['--rounds', '2', '--epochs', '2', '--pipeline', 'cpu'],
                  'gpu': ['--rounds', '2', '--epochs', '2', '--pipeline', 'gpu']}


@pytest.fixture(scope='session')
def unbroken_run(tiny_folder, tmp_path_factory):
    """last.t7 of a never-stopped 2 rounds x 2 epochs run, per pipeline (made once)."""
    import main
    made = {}

    def get(pipeline):
        if pipeline not in made:
            model_dir = tmp_path_factory.mktemp(f'unbroken-{pipeline}')
            assert main.main(fast_args(tiny_folder, model_dir, *UNBROKEN_FLAGS[pipeline])) == 0
            made[pipeline] = torch.load(model_dir / 'last.t7', weights_only=True)
        return made[pipeline]
    return get


def assert_same_training_state(a, b, atol=0.0):
    """Two checkpoints hold the same bank, weights and anchors (exactly, by default)."""
    close = (lambda x, y: torch.equal(x, y)) if atol == 0 else \
        (lambda x, y: torch.allclose(x.float(), y.float(), atol=atol))
    assert close(a['npc']['memory'], b['npc']['memory'])
    for key, value in a['net'].items():
        assert close(value, b['net'][key]), key
    assert torch.equal(a['ANs_discovery']['anchor_indexes'], b['ANs_discovery']['anchor_indexes'])
