"""The fast path guards itself (lib/fast_path.py): a compiled step equals the eager one on the
CPU; a compile that raises or that computes something else falls back one level with one line
and trains on to the eager run's checkpoint; --compile-check off skips the comparison; with
several processes and --sync-bn only the losses are compiled; the training loop survives the
patterns behind CUDA graphs' known failures; and every call the fast path makes exists in the
PyTorch this runs on."""
import inspect
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lib.fast_path as fast_path
from lib.agreement import Agreement, agreement
from conftest import (MECHANICS, ROOT, assert_same_training_state, fast_args, finished_state,
                      signal_at)
from lib.core.memory_bank import MemoryBank
from lib.core.neighbourhoods import ANsDiscovery
from lib.core.step import StepLosses, train_step
from lib.distributed import World
from lib.engine import run_epoch
from lib.fast_path import StepParts

WEIGHTS = {'and': 1.0, 'aug': 1.0, 'ue': 0.4}


class TinyNet(nn.Module):
    """An embedding network small enough to compile in seconds: conv, BatchNorm, pool, head."""

    def __init__(self, dim=8):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, dim)

    def forward(self, x):
        return F.normalize(self.head(F.relu(self.bn(self.conv(x))).mean((2, 3))), dim=1)


def tiny_state(seed=0, entries=16, dim=8):
    torch.manual_seed(seed)
    net, bank = TinyNet(dim), MemoryBank(dim, entries, 0.1, 0.5)
    anchors = ANsDiscovery(entries, 0.5, 1)
    anchors.update(1, F.normalize(bank.memory, dim=1), 0.1)
    optimizer = torch.optim.SGD(net.parameters(), 0.03, momentum=0.9, nesterov=True)
    return net, bank, anchors, optimizer


def tiny_batch(seed=1, images=4, entries=16):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2 * images, 3, 8, 8, generator=generator),
            torch.randperm(entries, generator=generator)[:images])


# ----------------------------------------------------------------------------- a real compile
def test_the_compiled_step_equals_the_eager_step_on_the_cpu():
    """Compiles (inductor's C++ backend, gcc): about 30 s on 2 cores. Losses, gradients and
    the bank update of one step, compiled against eager, in float32."""
    results = []
    for compile_mode in ('none', 'default'):
        net, bank, anchors, optimizer = tiny_state()
        losses = StepLosses(bank, anchors, list(WEIGHTS))
        if compile_mode != 'none':
            net, losses = (torch.compile(m, mode=compile_mode, dynamic=False)
                           for m in (net, losses))
        views, indexes = tiny_batch()
        found = train_step(net, losses, optimizer, views, indexes, WEIGHTS)
        results.append(({k: float(v.detach()) for k, v in found.items()}, bank.memory.clone(),
                        [p.detach().clone() for p in optimizer.param_groups[0]['params']]))
    (eager, eager_bank, eager_weights), (compiled, compiled_bank, compiled_weights) = results
    for name in WEIGHTS:
        assert compiled[name] == pytest.approx(eager[name], rel=1e-5), name
    # float32, other summation orders: a few ulps of the unit rows and the SGD-updated weights
    assert torch.allclose(compiled_bank, eager_bank, atol=1e-6)
    for a, b in zip(compiled_weights, eager_weights):
        assert torch.allclose(a, b, atol=1e-6)
    # The step did something: the batch's bank rows moved.
    fresh = tiny_state()[1].memory
    assert (eager_bank - fresh).abs().sum(1).nonzero().view(-1).tolist() == \
        sorted(tiny_batch()[1].tolist())


# ----------------------------------------------------------------------------- faulty compilers
class Faulty(nn.Module):
    """What a faulty torch.compile gives: a module that raises (`raise`), or computes other
    losses (`scale`: every loss x 1.5), or is right (`pass`)."""

    def __init__(self, module, behaviour):
        super().__init__()
        self.orig, self.behaviour = module, behaviour

    def forward(self, *args, **kwargs):
        if self.behaviour == 'raise':
            raise RuntimeError('injected compile failure\nsecond line, never shown')
        out = self.orig(*args, **kwargs)
        if self.behaviour == 'scale' and isinstance(out, dict):
            return {name: 1.5 * value for name, value in out.items()}
        return out

    def __getattr__(self, name):            # as torch.compile's OptimizedModule does
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules['orig'], name)


def faulty_compiler(behaviours, compiled):
    """A stand-in for torch.compile: `behaviours` by mode; records what it compiled."""
    def compile(module, mode='default', dynamic=None):
        compiled.append((type(module).__name__, mode))
        return Faulty(module, behaviours.get(mode, 'pass'))
    return compile


FLAGS = ['--rounds', '1', '--epochs', '1', '--pipeline', 'gpu', '--no-tensorboard', *MECHANICS]


@pytest.fixture(scope='module')
def eager_run(tiny_folder, tmp_path_factory):
    """last.t7 of the eager run the fallbacks must end on."""
    import main
    model_dir = tmp_path_factory.mktemp('eager')
    assert main.main(fast_args(tiny_folder, model_dir, *FLAGS, '--compile', 'none')) == 0
    return finished_state(model_dir)


def start_record(model_dir):
    return next(json.loads(line) for line in open(model_dir / 'log.jsonl')
                if json.loads(line)['type'] == 'start')


def test_a_compile_that_raises_falls_back_to_eager_and_trains_on(tiny_folder, tmp_path,
                                                                 run_main, monkeypatch,
                                                                 eager_run):
    compiled = []
    monkeypatch.setattr(fast_path, 'COMPILE', faulty_compiler(
        {'reduce-overhead': 'raise', 'default': 'raise'}, compiled))
    code, out, err = run_main(*fast_args(tiny_folder, tmp_path, *FLAGS, '--compile',
                                         'reduce-overhead'))
    assert code == 0, err
    lines = out.splitlines()
    assert 'compiled augmentation fell back to eager: RuntimeError: injected compile failure' \
        in lines
    for mode in ('reduce-overhead', 'default'):
        assert f'compile {mode} fell back: compile and first run: RuntimeError: injected ' \
            'compile failure' in lines
    assert 'compile: none (asked for reduce-overhead), after the fallbacks above' in lines
    assert 'second line' not in out
    assert 'compile none)' in next(line for line in lines if line.startswith('training '))
    record = start_record(tmp_path)['compile']
    assert (record['asked'], record['used'], len(record['fallbacks'])) == \
        ('reduce-overhead', 'none', 3)
    assert_same_training_state(eager_run, torch.load(tmp_path / 'last.t7', weights_only=True))


def test_a_compiled_step_that_disagrees_falls_back_one_level(tiny_folder, tmp_path, run_main,
                                                             monkeypatch, eager_run):
    """reduce-overhead computes every loss x 1.5: the check names both values and falls back;
    default is right, and the run trains with it to the eager run's checkpoint."""
    compiled = []
    monkeypatch.setattr(fast_path, 'COMPILE', faulty_compiler({'reduce-overhead': 'scale'},
                                                              compiled))
    code, out, err = run_main(*fast_args(tiny_folder, tmp_path, *FLAGS, '--compile',
                                         'reduce-overhead'))
    assert code == 0, err
    fell = next(line for line in out.splitlines() if 'fell back' in line)
    assert fell.startswith('compile reduce-overhead fell back: and loss ')
    eager, compiled_value = (float(v) for v in fell.split(';')[0].split('and loss ')[1]
                             .replace(' eager,', '').replace(' compiled', '').split())
    assert compiled_value == pytest.approx(1.5 * eager, rel=1e-4)
    assert 'compile: default (asked for reduce-overhead), after the fallbacks above; the first ' \
        'step agrees with the eager step: losses eager / compiled: and ' in out
    record = start_record(tmp_path)['compile']
    assert record['used'] == 'default' and record['check']['grad_cosine'] == pytest.approx(1)
    assert ('StepLosses', 'default') in compiled
    assert_same_training_state(eager_run, torch.load(tmp_path / 'last.t7', weights_only=True))


def test_reduce_overhead_on_the_cpu_says_it_captures_nothing(tiny_folder, tmp_path, run_main,
                                                            monkeypatch):
    monkeypatch.setattr(fast_path, 'COMPILE', faulty_compiler({}, []))
    code, out, err = run_main(*fast_args(tiny_folder, tmp_path, *FLAGS, '--compile',
                                         'reduce-overhead', '--quiet'))
    assert code == 0, err
    assert 'compile: reduce-overhead, as asked (without CUDA there are no CUDA graphs to ' \
        'capture: the same as default); the first step agrees' in out


def test_a_sigterm_while_compiling_stops_before_the_first_step(tiny_folder, tmp_path,
                                                               run_main, monkeypatch):
    def compile_then_sigterm(module, mode='default', dynamic=None):
        # (torch.compile compiles at the first call, in the check: here, mid-check)
        if type(module).__name__ == 'StepLosses':
            os.kill(os.getpid(), signal.SIGTERM)          # as a scheduler would
        return module
    monkeypatch.setattr(fast_path, 'COMPILE', compile_then_sigterm)
    code, out, err = run_main(*fast_args(tiny_folder, tmp_path, *FLAGS, '--compile',
                                         'default'))
    assert code == 0, err
    lines = out.splitlines()
    assert lines.count('SIGTERM: stopping at the next step, after writing last.t7') == 1
    assert lines[-1] == ('stopped by SIGTERM before the first step (while compiling): nothing '
                         'trained, nothing written')
    assert not (tmp_path / 'last.t7').exists() and not (tmp_path / 'ckpt.t7').exists()
    assert not (tmp_path / 'log.jsonl').exists() and not (tmp_path / 'config.json').exists()


def test_compile_check_off_skips_the_comparison(tiny_folder, tmp_path, run_main, monkeypatch):
    monkeypatch.setattr(fast_path, 'COMPILE', faulty_compiler({'default': 'scale'}, []))
    code, out, err = run_main(*fast_args(tiny_folder, tmp_path, *FLAGS, '--compile', 'default',
                                         '--compile-check', 'off'))
    assert code == 0, err
    assert 'compile: default, as asked' in out and 'fell back' not in out
    assert 'agrees' not in out and start_record(tmp_path)['compile']['check'] == 'off'
    assert 'not compared with the eager step (--compile-check off)' in out


def test_a_resume_with_no_step_left_in_its_epoch_checks_on_the_epochs_first_batch(
        tiny_folder, tmp_path, run_main, monkeypatch, eager_run):
    """Stopped after the epoch's last step (saved at step == steps per epoch), the resume has
    no batch of that epoch left to train: the check takes the epoch's first one, and the run
    ends on the eager run's checkpoint."""
    signal_at(monkeypatch, signal.SIGTERM, (0, 0, 1))      # the last of the epoch's 2 steps
    code, out, err = run_main(*fast_args(tiny_folder, tmp_path, *FLAGS, '--compile', 'none'))
    monkeypatch.undo()
    assert code == 0 and 'stopped by SIGTERM at round 0 epoch 0 step 2' in out, out + err
    monkeypatch.setattr(fast_path, 'COMPILE', faulty_compiler({}, []))
    code, out, err = run_main('--resume', 'last.t7', '--model_dir', tmp_path, '--data-root',
                              tiny_folder, '--workers', '0', '--compile', 'default',
                              '--no-tensorboard')
    assert code == 0, err
    assert 'compile: default, as asked; the first step agrees with the eager step' in out
    assert_same_training_state(eager_run, torch.load(tmp_path / 'last.t7', weights_only=True))


# ----------------------------------------------------------------------------- the check's parts
def parts_of(net, bank, anchors, optimizer):
    return fast_path.StepParts(net, StepLosses(bank, anchors, list(WEIGHTS)), optimizer,
                               World().gather_batch, False, World())


class FailsOnCall(nn.Module):
    """`net` that raises on its `n`-th call (a capture that fails after a good first run)."""

    def __init__(self, net, n):
        super().__init__()
        self.net, self.n, self.calls = net, n, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError('capture failed')
        return self.net(x)


class DoubleGradient(nn.Module):
    """`net` whose embeddings are right but whose gradient is twice the true one."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        out = self.net(x)
        return out.detach() + 2 * (out - out.detach())


def test_the_check_names_its_stages_and_sees_a_wrong_gradient():
    net, bank, anchors, optimizer = tiny_state()
    eager, buffers = parts_of(net, bank, anchors, optimizer), list(net.buffers())
    batch = tiny_batch()
    # An error of the third compiled run is the capture's; of the eager step, nobody's compile.
    with pytest.raises(RuntimeError, match='capture failed') as raised:
        agreement(eager, parts_of(FailsOnCall(net, 3), bank, anchors, optimizer),
                  batch, WEIGHTS, buffers, runs=3)
    assert raised.value.stage == 'capture'
    with pytest.raises(RuntimeError) as raised:
        agreement(parts_of(FailsOnCall(net, 1), bank, anchors, optimizer), eager,
                  batch, WEIGHTS, buffers)
    assert raised.value.stage == 'eager'
    # The same losses with twice the gradient: the check says so.
    found = agreement(eager, parts_of(DoubleGradient(net), bank, anchors, optimizer),
                      batch, WEIGHTS, buffers)
    assert all(a == pytest.approx(b) for a, b in found.losses.values())
    assert found.grad_cosine == pytest.approx(1) and found.grad_norm_ratio == pytest.approx(2)
    assert found.problems() == ['gradients at cosine 1.000000 with norm ratio 2.0000 '
                                '(compiled / eager)']
    # Neither run moved the bank, the weights' gradients or BatchNorm's statistics.
    fresh_net, fresh_bank = tiny_state()[:2]
    assert torch.equal(bank.memory, fresh_bank.memory)
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(a, b) for a, b in zip(net.buffers(), fresh_net.buffers()))


def test_a_non_finite_eager_step_is_left_to_the_training_loop():
    nan = float('nan')
    found = Agreement({'and': (nan, nan), 'aug': (1.0, 1.0)}, nan, nan, 0.0)
    assert found.problems() == []


def test_a_compiler_failure_is_named_by_the_error_it_wraps():
    """BackendCompilerFailed's own first line is "backend='...' raised:"; the line names the
    exception under it."""
    def broken_backend(graph, example_inputs):
        raise RuntimeError('C++ compile failed: g++ not found\nthe command line ...')
    compiled = torch.compile(lambda x: torch.sin(x) + 1, backend=broken_backend)
    torch._dynamo.reset()
    with pytest.raises(Exception) as raised:
        compiled(torch.ones(3))
    torch._dynamo.reset()
    line = fast_path.first_line(raised.value)
    assert 'RuntimeError: C++ compile failed: g++ not found' in line, line
    assert 'the command line' not in line


# ----------------------------------------------------------------------------- several processes
RECORDING = '''
import os, sys
sys.path.insert(0, {root!r})
import lib.fast_path, main
compiled = []
def record(module, mode='default', dynamic=None):
    compiled.append(type(module).__name__)
    return module
lib.fast_path.COMPILE = record
code = main.main(sys.argv[1:])
# One file per process: two processes printing to one pipe interleave their lines.
with open(os.path.join({out!r}, 'compiled-' + os.environ['RANK']), 'w') as f:
    f.write(' '.join(compiled))
main.cli.exit_program(code)     # as main.py ends
'''


RAISING = '''
import sys
sys.path.insert(0, {root!r})
import torch.nn as nn
import lib.fast_path, main
class Raising(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module
    def forward(self, *args, **kwargs):
        raise RuntimeError('injected on every process')
def compile(module, mode='default', dynamic=None):
    return Raising(module) if type(module).__name__ == 'StepLosses' else module
lib.fast_path.COMPILE = compile
main.cli.exit_program(main.main(sys.argv[1:]))   # as main.py ends
'''


def two_gloo_processes(script, tiny_folder, tmp_path):
    """`script` (main.py with a compiler of its own) under torchrun: two gloo processes, 8
    images each, --sync-bn, --compile default."""
    return subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
         str(script), *fast_args(tiny_folder, tmp_path / 'ck', *FLAGS, '--batch_size', '16',
                                 '--sync-bn', '--compile', 'default')],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, 'OMP_NUM_THREADS': '1'})


def test_several_processes_fall_back_together_and_say_why(tiny_folder, tmp_path):
    """Every process's compiled losses raise: all fall back alike (the processes agree on it
    with one gather) and the line gives the reason; the run trains on eagerly."""
    script = tmp_path / 'raising.py'
    script.write_text(RAISING.format(root=ROOT))
    proc = two_gloo_processes(script, tiny_folder, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'compile default fell back: compile and first run: RuntimeError: injected on every ' \
        'process' in proc.stdout.splitlines()
    assert 'compile: none (asked for default), after the fallbacks above' in proc.stdout


def test_with_sync_bn_only_the_losses_are_compiled(tiny_folder, tmp_path):
    script = tmp_path / 'recording.py'
    script.write_text(RECORDING.format(root=ROOT, out=str(tmp_path)))
    proc = two_gloo_processes(script, tiny_folder, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compile: default, as asked; only the losses: SyncBatchNorm breaks the network's " \
        'graph at every layer' in proc.stdout
    compiled = [(tmp_path / f'compiled-{rank}').read_text().split() for rank in (0, 1)]
    assert compiled == [['BatchAugment', 'StepLosses']] * 2, compiled


# ----------------------------------------------------------------------------- CUDA graphs' patterns
class StaticOutputs(nn.Module):
    """The losses as a captured CUDA graph returns them: the same tensors every call, written
    over in place (pytorch#148439: a caller that keeps them sees the next step's values)."""

    def __init__(self, losses):
        super().__init__()
        self.losses, self.out = losses, None

    def forward(self, features, indexes, batch):
        fresh = self.losses(features, indexes, batch)
        if self.out is None:
            self.out = {name: value.detach().clone() for name, value in fresh.items()}
        with torch.no_grad():
            for name, value in fresh.items():
                self.out[name].copy_(value)
        # (as a graph's output: its value now, and the gradient of the fresh loss)
        return {name: self.out[name] + (value - value.detach())
                for name, value in fresh.items()}

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules['losses'], name)


def test_the_training_loop_keeps_no_output_past_its_step():
    """Outputs overwritten by the next call leave the epoch's sums and samples right."""
    results = []
    for static in (False, True):
        net, bank, anchors, optimizer = tiny_state()
        losses = StepLosses(bank, anchors, list(WEIGHTS))
        parts = StepParts(net, StaticOutputs(losses) if static else losses, optimizer,
                          World().gather_batch)
        batches = [tiny_batch(seed) for seed in range(6)]
        results.append(run_epoch(parts, batches, WEIGHTS, sample_every=2))
    assert results[1].losses == pytest.approx(results[0].losses, rel=1e-6)
    assert [s for s, _ in results[1].samples] == [0, 2, 4]
    for (_, a), (_, b) in zip(results[0].samples, results[1].samples):
        assert a == pytest.approx(b, rel=1e-6)


def test_the_compiled_parts_mutate_only_module_state():
    """pytorch#183313 (a tensor mutated inside a graph that the pool does not track): the
    step's losses mutate nothing they are given or hold; the network only its BatchNorm
    buffers, module state allocated outside any graph."""
    net, bank, anchors, _ = tiny_state()
    views, indexes = tiny_batch()
    held = {'memory': bank.memory, 'table': anchors.neighbour_table, 'views': views,
            'indexes': indexes}
    before = {name: value.clone() for name, value in held.items()}
    parameters = {name: p.detach().clone() for name, p in net.named_parameters()}
    features = net(views)
    StepLosses(bank, anchors, list(WEIGHTS))(features, indexes,
                                             World().gather_batch(features, indexes))
    for name, value in held.items():
        assert torch.equal(value, before[name]), name
    for name, p in net.named_parameters():
        assert torch.equal(p, parameters[name]), name


# ----------------------------------------------------------------------------- PyTorch versions
def test_every_call_of_the_fast_path_exists_in_this_pytorch():
    """The calls of docs' table (README, 'The fast path guards itself'), with the arguments
    they are given, all in PyTorch 2.11 (the GPU machine's) and later."""
    assert {'mode', 'dynamic'} <= set(inspect.signature(torch.compile).parameters)
    assert callable(torch.compiler.cudagraph_mark_step_begin)
    assert callable(torch._dynamo.mark_static_address) and callable(torch._dynamo.reset)
    assert 'fused' in inspect.signature(torch.optim.SGD).parameters
    assert {'weights_only', 'mmap'} <= set(inspect.signature(torch.load).parameters)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_an_sgd_without_fused_falls_back_to_the_plain_one(monkeypatch):
    from lib.build import sgd
    real, asked = torch.optim.SGD, []

    def older_sgd(params, fused=None, **settings):      # as a release without fused SGD
        asked.append(fused)
        if fused is not None:
            raise TypeError("SGD.__init__() got an unexpected keyword argument 'fused'")
        return real(params, **settings)
    monkeypatch.setattr(torch.optim, 'SGD', older_sgd)
    optimizer = sgd(list(TinyNet().parameters()), True, lr=0.03, momentum=0.9, nesterov=True)
    assert isinstance(optimizer, real) and optimizer.defaults['nesterov']
    assert asked == [True, None]
