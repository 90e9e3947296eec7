"""Shared fixtures: a generated tiny image-folder dataset and ways to run main.py."""
import atexit
import contextlib
import gc
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The README runs the suite as `pytest -n 2` (pytest-xdist): two worker processes, each
# computing on one thread, and so are the programs they start (OMP_NUM_THREADS). Two workers of
# two threads each on 2 cores spend the time spinning (the suite took 424 s, against 245 s so
# and 345 s as one process of two threads).
WORKER = os.environ.get('PYTEST_XDIST_WORKER')      # 'gw0', 'gw1'; None without xdist
if WORKER:
    os.environ['OMP_NUM_THREADS'] = '1'
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
# Ctrl-C as an interactive Python has it, however the tests were started (a shell's background
# job starts with it ignored, and a run leaves an ignored signal ignored).
signal.signal(signal.SIGINT, signal.default_int_handler)

# The image cache of every run the tests start (in this process and in the ones it spawns) is
# a folder of this session's, never the user's ~/.cache; removed when the session ends. A
# spawned script that imports this file (run_killed_at's) keeps the session's: one of its own
# would outlive its SIGKILL.
CACHE_PREFIX = 'superand-test-cache-'
if os.path.basename(os.environ.get('XDG_CACHE_HOME', '')).startswith(CACHE_PREFIX):
    CACHE_HOME = os.environ['XDG_CACHE_HOME']
else:
    CACHE_HOME = os.environ['XDG_CACHE_HOME'] = tempfile.mkdtemp(prefix=CACHE_PREFIX)
    atexit.register(shutil.rmtree, CACHE_HOME, ignore_errors=True)
# Each pytest-xdist worker a cache of its own, inside the session's: runs of two workers never
# wait for each other's fill (which says a line of its own on stdout).
if WORKER and os.path.basename(CACHE_HOME) != CACHE_PREFIX + WORKER:
    CACHE_HOME = os.environ['XDG_CACHE_HOME'] = os.path.join(CACHE_HOME, CACHE_PREFIX + WORKER)


def pytest_configure(config):
    # A warning raised at a line of the project (a deprecated PyTorch call, say: its warning
    # names the caller's line) fails the test that reached it: a user would read it on stderr.
    # (One raised by a finalizer, a file left open, cannot fail a test: pytest reports it.)
    config.addinivalue_line('filterwarnings', r'error:::(main|hubconf|lib|models|datasets|tools|'
                                              r'bench|experiments)(\.|$)')


# A passing test's tmp_path is removed when the test ends; a failing test's stays, to look at.
# The runs of the suite write checkpoints of 60 to 120 MB (AlexNet and ResNet18 with their
# momentum): about 12 GB a session, which pytest keeps for its last 3 sessions. That once filled
# this machine's disk, and every later run then stopped with "--model_dir has 151 MiB free".
# (pytest's tmp_path_retention_policy = failed does the same, but needs a file at the top level.)
PASSED = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == 'call':
        item.stash[PASSED] = report.passed


@pytest.fixture(autouse=True)
def _tmp_path_removed_when_passed(request):
    yield
    path = request.node.funcargs.get('tmp_path')
    if path is not None and request.node.stash.get(PASSED, False):
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def no_file_left_open():
    """Fails when the block leaves a file open (a ResourceWarning once it is collected); what
    ran before is collected first, so that its leaks are not blamed on the block."""
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always', ResourceWarning)
        yield
        gc.collect()
    assert [str(w.message) for w in caught if w.category is ResourceWarning] == []


def printed_python():
    """How the commands the program prints should name this interpreter, asked of the python3
    on PATH itself: python3 where it is this Python with these packages, else this one's whole
    path (CI runs <venv>/bin/python -m pytest without the venv on PATH)."""
    ask = 'import sys; print((sys.prefix, sys.version))'
    try:
        there = subprocess.run(['python3', '-c', ask], capture_output=True, text=True,
                               timeout=120).stdout.strip()
    except OSError:                 # no python3 on PATH
        there = None
    return 'python3' if there == str((sys.prefix, sys.version)) else shlex.quote(sys.executable)


PYTHON = printed_python()


def printed_torchrun():
    """How the printed commands should name PyTorch's launcher: torchrun where the one on PATH
    starts this interpreter's folder's python (its first line names it), else this python's
    -m torch.distributed.run (a venv not activated has no torchrun on PATH)."""
    try:
        with open(shutil.which('torchrun')) as script:
            first = script.readline()
    except (TypeError, OSError, UnicodeDecodeError):     # (TypeError: none on PATH)
        first = ''
    named = first[2:].strip().split()[0] if first.startswith('#!') and first[2:].strip() else ''
    same = named and os.path.dirname(named) == os.path.dirname(sys.executable)
    return 'torchrun' if same else f'{PYTHON} -m torch.distributed.run'


TORCHRUN_PRINTED = printed_torchrun()


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


# The network of the tests of run mechanics (resume, stops, faults, folders), where which
# network trains does not matter: the CIFAR AlexNet with batch norm, without the Sobel branch
# (which doubles the seconds of a step) and with the ImageNet stem (stride 4 and a max-pool
# first, which at 32 px leaves the later layers little to do). A step of 8 images (2 views)
# takes 0.05 s on 2 cores, against 0.18 s with the CIFAR stem and 0.7 s for ResNet18 with the
# Sobel branch (PyTorch 2.14.1). ResNet18 is tested elsewhere (the layout, the
# released loader, the end-to-end run, the hub); so is the Sobel branch, also in the gpu
# pipeline's resumes below, which must equal the unbroken run exactly, and under torchrun
# (test_processes' stop signals). Its embeddings of the tiny images are nearly all alike
# (cosine ~1), so a test of embeddings, retrieval, kNN votes or anchors, or of float32 sums that
# agree across processes, trains the CIFAR stem (DISCRIMINATIVE) or a ResNet18.
MECHANICS = ['--network', 'alexnet', '--no-sobel', '--stem', 'imagenet']
WITH_SOBEL = ['--network', 'alexnet', '--stem', 'imagenet']
DISCRIMINATIVE = ['--network', 'alexnet', '--no-sobel', '--stem', 'cifar']

# The flags of the runs that resume, kill and stop tests compare with an unbroken run.
UNBROKEN_FLAGS = {'cpu': ['--rounds', '2', '--epochs', '2', '--pipeline', 'cpu', *MECHANICS],
                  'gpu': ['--rounds', '2', '--epochs', '2', '--pipeline', 'gpu', *WITH_SOBEL]}


def signal_at(monkeypatch, signum, at):
    """Deliver a real `signum` to this process while the training loop draws the batch of
    `at` = (round, epoch, step): a stop at an exact step, whatever the machine's speed. (The
    handler runs at once; the step still trains, and the loop stops after it.)"""
    from lib.pipelines import LoaderPipeline, TensorPipeline
    for cls in (LoaderPipeline, TensorPipeline):
        monkeypatch.setattr(cls, 'train_batches', _signalling(cls.train_batches, signum, at))


def _signalling(train_batches, signum, at, before=None):
    def batches(self, round_index, epoch, start_step=0):
        for step, batch in enumerate(train_batches(self, round_index, epoch, start_step),
                                     start_step):
            if (round_index, epoch, step) == tuple(at):
                if before is not None:
                    before()
                os.kill(os.getpid(), signum)
            yield batch
    return batches


# main.py in a child process that SIGKILLs itself while drawing the batch of `at`, once a
# whole last.t7 is on disk (it is written in the background: renamed into place when whole).
KILLED_AT = '''
import os, signal, sys, time
sys.path.insert(0, {root!r})
import lib.pipelines
import main
from conftest import _signalling
model_dir = sys.argv[sys.argv.index('--model_dir') + 1]
def last_written():
    while not os.path.exists(os.path.join(model_dir, 'last.t7')):
        time.sleep(0.01)
for cls in (lib.pipelines.LoaderPipeline, lib.pipelines.TensorPipeline):
    cls.train_batches = _signalling(cls.train_batches, signal.SIGKILL, {at!r}, last_written)
main.cli.exit_program(main.main(sys.argv[1:]))   # as main.py ends
'''


def run_killed_at(at, *argv):
    """main.py `argv` in a child process killed (SIGKILL) at `at` = (round, epoch, step)."""
    script = [sys.executable, '-c', KILLED_AT.format(root=ROOT, at=tuple(at))]
    env = {**os.environ, 'PYTHONPATH': os.path.join(ROOT, 'tests')}
    return subprocess.run([*script, *map(str, argv)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, env=env)


@pytest.fixture(scope='session')
def unbroken_run(tiny_folder, tmp_path_factory):
    """last.t7 of a never-stopped 2 rounds x 2 epochs run, per pipeline (made once in each
    pytest process: each xdist worker)."""
    import main
    made = {}

    def get(pipeline):
        if pipeline not in made:
            model_dir = tmp_path_factory.mktemp(f'unbroken-{pipeline}')
            assert main.main(fast_args(tiny_folder, model_dir, *UNBROKEN_FLAGS[pipeline])) == 0
            made[pipeline] = finished_state(model_dir)
        return made[pipeline]
    return get


def finished_state(model_dir):
    """The last.t7 of a reference run, which must have trained all its rounds: a run that a
    stop signal ended early also exits 0, and kept as the reference it would fail every test
    compared with it, each by a difference of weights. (unbroken_run then keeps nothing, and
    the next test that asks runs it again; a fixture's error, as eager_run's, stays.)"""
    state = torch.load(model_dir / 'last.t7', weights_only=True)
    position = continues_from(state)
    assert position == {'round': state['config']['rounds'], 'epoch': 0, 'step': 0}, \
        f'the reference run in {model_dir} stopped early, before {position} (a stop signal?)'
    return state


def continues_from(state):
    """{round, epoch, step} a last.t7 continues from (without the loss sums of a part-done
    epoch)."""
    return {key: state['next'][key] for key in ('round', 'epoch', 'step')}


# The flags of the 2-process run that one process and two nodes are compared with.
TWO_PROCESS_FLAGS = ['--rounds', '2', '--epochs', '1', '--batch_size', '16', '--pipeline', 'gpu',
                     '--sync-bn', '--no-tensorboard', *DISCRIMINATIVE]


@pytest.fixture(scope='session')
def two_process_run(tiny_folder, tmp_path_factory):
    """(model dir, stdout, stderr) of a run of TWO_PROCESS_FLAGS as two gloo processes of one
    node (torchrun --standalone, a thread each), made once in each pytest process."""
    model_dir = tmp_path_factory.mktemp('two-processes')
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
         os.path.join(ROOT, 'main.py'), *fast_args(tiny_folder, model_dir, *TWO_PROCESS_FLAGS)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return model_dir, proc.stdout, proc.stderr


def assert_same_training_state(a, b, atol=0.0):
    """Two checkpoints hold the same bank, weights and anchors (exactly, by default). A
    failure names every tensor that differs and by how much at most: float rounding
    (1e-7) and a step trained otherwise (1e-2) read differently."""
    # First where each continues from: a run stopped early (by a stop signal from outside the
    # tests, say, which also exits 0) is said as such, not as a difference of every weight.
    if 'next' in a and 'next' in b:
        where = [continues_from(a), continues_from(b)]
        assert where[0] == where[1], f'the runs stopped at different places: {where} ' \
            f'(was one stopped early, by a signal?)'
    close = (lambda x, y: torch.equal(x, y)) if atol == 0 else \
        (lambda x, y: x.shape == y.shape and torch.allclose(x.float(), y.float(), atol=atol))
    pairs = [('bank', a['npc']['memory'], b['npc']['memory'])] + \
        [(key, value, b['net'][key]) for key, value in a['net'].items()]
    differing = [f'{name} by {(x.double() - y.double()).abs().max().item():.3g}'
                 if x.shape == y.shape else f'{name} in shape'
                 for name, x, y in pairs if not close(x, y)]
    assert not differing, f'{len(differing)} of {len(pairs)} tensors differ: ' + \
        ', '.join(differing)
    assert torch.equal(a['ANs_discovery']['anchor_indexes'], b['ANs_discovery']['anchor_indexes'])
