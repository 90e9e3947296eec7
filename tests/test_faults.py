"""Several processes (gloo on the CPU) and the faults a long run must survive."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

import lib.checkpoint
import lib.checkpoint_writer
import lib.core.losses
import lib.engine
import lib.run_folder
from conftest import (MECHANICS, ROOT, TWO_PROCESS_FLAGS, UNBROKEN_FLAGS,
                      PYTHON, assert_same_training_state, fast_args, run_killed_at, signal_at)


# ----------------------------------------------------------------------------- torchrun
def epoch_records(model_dir):
    return [r for r in map(json.loads, open(model_dir / 'log.jsonl')) if r['type'] == 'epoch']


def test_two_gloo_processes_equal_one(tiny_folder, tmp_path, run_main, two_process_run):
    """Same seed and global batch (16 images; 8 per process): the same losses, anchors, kNN
    and bank. The first step agrees to float32 rounding; after it the two runs drift apart
    slowly, because BatchNorm over 8 images per process makes float32 gradients
    ill-conditioned (even one process with channels_last differs from contiguous that much)."""
    code, _, err = run_main(*fast_args(tiny_folder, tmp_path / 'one', *TWO_PROCESS_FLAGS))
    assert code == 0, err
    two_dir, out, err = two_process_run
    assert out.count('done: best kNN') == 1          # only rank 0 prints
    # Nothing of PyTorch's on stderr either: GlobalBatchNorm's all-reduce (--sync-bn on gloo)
    # once came from torch.distributed.nn.functional, deprecated: a FutureWarning from each rank.
    assert [line for line in err.splitlines() if 'Warning' in line] == [], err[-3000:]
    assert '2 processes' in out
    one, two = epoch_records(tmp_path / 'one'), epoch_records(two_dir)
    for name in ('and', 'aug', 'ue'):
        assert two[0]['loss'][name] == pytest.approx(one[0]['loss'][name], abs=1e-5)  # step 1
        assert two[1]['loss'][name] == pytest.approx(one[1]['loss'][name], rel=1e-3)  # step 2
    assert [r['knn_top1'] for r in two] == [r['knn_top1'] for r in one]
    a = torch.load(tmp_path / 'one' / 'last.t7', weights_only=True)
    b = torch.load(two_dir / 'last.t7', weights_only=True)
    assert torch.equal(a['ANs_discovery']['anchor_indexes'], b['ANs_discovery']['anchor_indexes'])
    assert torch.allclose(a['npc']['memory'], b['npc']['memory'], atol=5e-3)
    # One DataParallel-style prefix, as the released code saves, whatever wraps the network.
    assert all(k.startswith('module.') and not k.startswith('module.module.') for k in b['net'])


# ----------------------------------------------------------------------------- faults
def test_sigkill_mid_run_then_resume_equals_unbroken(tiny_folder, tmp_path, run_main,
                                                     unbroken_run):
    killed = run_killed_at((0, 1, 1), *fast_args(tiny_folder, tmp_path, *UNBROKEN_FLAGS['cpu']))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = torch.load(tmp_path / 'last.t7', weights_only=True)     # intact, not half-written
    assert state['next'] == {'round': 0, 'epoch': 1, 'step': 0}
    code, out, err = run_main('--resume', 'last.t7', '--model_dir', tmp_path, '--data-root',
                              tiny_folder, '--workers', '0', '--pipeline', 'cpu',
                              '--no-tensorboard')
    assert code == 0, err
    assert 'resuming at round 0 epoch 1 from' in out
    assert_same_training_state(unbroken_run('cpu'), torch.load(tmp_path / 'last.t7',
                                                               weights_only=True))


def test_sigterm_stops_at_a_step_and_resumes_exactly(tiny_folder, tmp_path, run_main,
                                                     monkeypatch):
    flags = ['--rounds', '1', '--epochs', '2', '--pipeline', 'gpu', '--batch_size', '2',
             *MECHANICS]
    code, _, err = run_main(*fast_args(tiny_folder, tmp_path / 'whole', *flags))
    assert code == 0, err
    signal_at(monkeypatch, signal.SIGTERM, (0, 1, 3))   # drawing step 3 of the 10 of epoch 1
    code, out, err = run_main(*fast_args(tiny_folder, tmp_path / 'stopped', *flags))
    monkeypatch.undo()
    assert code == 0, err
    assert 'SIGTERM: stopping at the next step' in out and 'done:' not in out
    assert 'stopped by SIGTERM at round 0 epoch 1 step 4' in out
    state = torch.load(tmp_path / 'stopped' / 'last.t7', weights_only=True)
    assert (state['next']['round'], state['next']['epoch'], state['next']['step']) == (0, 1, 4)
    assert set(state['next']['loss_sums']) == {'and', 'aug', 'ue'}     # by name
    # As printed: the run keeps the pipeline it was typed with (not auto's cpu, here).
    code, out, err = run_main('--resume', 'last.t7', '--model_dir', tmp_path / 'stopped',
                              '--data-root', tiny_folder, '--workers', '0', '--no-tensorboard')
    assert code == 0 and 'done:' in out, err
    assert 'pipeline=gpu' in next(line for line in out.splitlines()
                                  if line.startswith('options from the checkpoint'))
    assert_same_training_state(torch.load(tmp_path / 'whole' / 'last.t7', weights_only=True),
                               torch.load(tmp_path / 'stopped' / 'last.t7', weights_only=True))
    # Another pipeline typed on a resume is said: it is not the unbroken run.
    code, out, err = run_main('--resume', 'last.t7', '--model_dir', tmp_path / 'stopped',
                              '--data-root', tiny_folder, '--workers', '0', '--rounds', '2',
                              '--pipeline', 'auto', '--no-tensorboard', '--quiet')
    assert code == 0, err
    assert 'note: this run last trained with the gpu pipeline; here it continues with the cpu ' \
        'pipeline, so it will not equal the run never stopped (augmentations or rounding ' \
        'differ); to keep it: --pipeline gpu' in out.splitlines()


# main.py, with SIGTERM sent to its whole process group from another process (as a scheduler
# or `kill -- -PGID` does) while the training loop draws the batch of round 0 epoch 0 step 2.
# (Another process: PyTorch's workers exit quietly on a SIGTERM from their parent.)
GROUP_SIGTERM = '''
import os, signal, subprocess, sys
sys.path.insert(0, {root!r})
import lib.pipelines, main
draw = lib.pipelines.LoaderPipeline.train_batches
def train_batches(self, round_index, epoch, start_step=0):
    for step, batch in enumerate(draw(self, round_index, epoch, start_step), start_step):
        if (round_index, epoch, step) == (0, 0, 2):
            subprocess.run([sys.executable, '-c', 'import os, signal, sys; '
                            'os.killpg(int(sys.argv[1]), signal.SIGTERM)', str(os.getpgid(0))])
        yield batch
lib.pipelines.LoaderPipeline.train_batches = train_batches
main.cli.exit_program(main.main(sys.argv[1:]))   # as main.py ends
'''


def test_sigterm_to_the_process_group_stops_once_with_loader_workers(tiny_folder, tmp_path):
    """The loader's worker processes ignore the signal: one stop line, a clean stop at the
    step, no worker killed under the loader."""
    script = tmp_path / 'group_sigterm.py'
    script.write_text(GROUP_SIGTERM.format(root=ROOT))
    proc = subprocess.run(
        [sys.executable, str(script), *fast_args(tiny_folder, tmp_path / 'run', '--rounds', '1',
                                                 '--epochs', '1', '--pipeline', 'cpu',
                                                 '--no-tensorboard', '--workers', '2',
                                                 '--batch_size', '2',
                                                 *MECHANICS)],
        capture_output=True, text=True, cwd=ROOT, timeout=300, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('SIGTERM: stopping at the next step') == 1, proc.stdout
    assert 'stopped by SIGTERM at round 0 epoch 0 step 3' in proc.stdout
    assert 'killed' not in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr[-3000:]


def test_overflowing_batchnorm_statistics_stop_before_the_epoch_is_saved(tiny_folder, tmp_path,
                                                                         run_main, monkeypatch,
                                                                         capsys):
    """Finite losses, but running statistics that overflowed (a huge --lr): the epoch is not
    evaluated, saved or called the best; last.t7 keeps the epoch before."""
    real_run_epoch, calls = lib.engine.run_epoch, []

    def overflowing(parts, *args, **kwargs):    # epoch 1's statistics become infinite
        result = real_run_epoch(parts, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            bn = next(m for m in parts.net.modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_var.fill_(float('inf'))
        return result
    monkeypatch.setattr(lib.engine, 'run_epoch', overflowing)
    code, out, err = run_main(*fast_args(tiny_folder, tmp_path, *MECHANICS, '--rounds', '1',
                                         '--epochs', '3'))
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(
        'error: non-finite weights, BatchNorm statistics or bank entries (NaN or infinite) '
        'after round 0 epoch 1: stopped; ')
    assert 'still holds round 0 epoch 0, the last epoch whose values were all finite' in err
    for name in ('last.t7', 'ckpt.t7'):
        state = torch.load(tmp_path / name, weights_only=True)
        assert (state['round'], state['epoch']) == (0, 0)
        assert all(torch.isfinite(t).all() for t in state['net'].values() if t.is_floating_point())
    # Such a checkpoint (an older program's) is not scored: its accuracy would mean nothing.
    state['net'][next(k for k in state['net'] if k.endswith('running_var'))].fill_(float('inf'))
    torch.save(state, tmp_path / 'overflowed.t7')
    code, out, err = run_main('--resume', 'overflowed.t7', '--test_only', '--model_dir', tmp_path,
                              '--data-root', tiny_folder, '--workers', '0')
    assert code == 2 and 'top-1' not in out
    assert 'overflowed.t7 holds non-finite (NaN or infinite) weights, BatchNorm statistics' in err
    from tools import embed                 # (the network alone, as torch.hub loads it)
    assert embed.main(['--ckpt', str(tmp_path / 'overflowed.t7'), '--images', tiny_folder,
                       '--out', str(tmp_path / 'x.npz'), '--device', 'cpu']) == 2
    assert 'overflowed.t7 holds non-finite' in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_folder, tmp_path,
                                                                   run_main, monkeypatch):
    real_ue_loss, calls = lib.core.losses.ue_loss, []

    def poisoned(logits, targets):          # NaN from the 4th step on (epoch 1, step 1)
        calls.append(1)
        loss = real_ue_loss(logits, targets)
        return loss * float('nan') if len(calls) >= 4 else loss
    monkeypatch.setattr(lib.core.losses, 'ue_loss', poisoned)
    code, out, err = run_main(*fast_args(tiny_folder, tmp_path, *MECHANICS, '--rounds', '1',
                                         '--epochs', '3'))
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(
        'error: non-finite loss (NaN or infinite) at round 0 epoch 1 step 1')
    assert 'still holds round 0 epoch 0, the last epoch whose values were all finite' in err
    state = torch.load(tmp_path / 'last.t7', weights_only=True)
    assert state['next'] == {'round': 0, 'epoch': 1, 'step': 0}
    assert torch.isfinite(state['npc']['memory']).all()
    command = shlex.split(err[err.index(f'{PYTHON} main.py'):].splitlines()[0])
    assert command[:2] == [*shlex.split(PYTHON), 'main.py']
    # Continued as it was (no lower lr), the same epoch fails again: the same advice. Continued
    # with the lower lr, it fails again too: then the weights may be past saving, and starting
    # over is offered instead (the advice would loop).
    code, out, err = run_main('--model_dir', tmp_path, '--resume', 'last.t7', '--workers', '0',
                              '--device', 'cpu')
    assert code == 2 and f'a lower learning rate may help: {shlex.join(command)}' in err
    code, out, err = run_main(*command[2:])
    assert code == 2 and err.strip().endswith(
        f'continuing from it with a lower learning rate (--lr 0.003; the run had 0.03) failed '
        f'in its first epoch, so its weights have likely grown past what a learning rate brings '
        f'back: start the run over in an unused folder, with the command that started it and '
        f'--lr 0.0003 --model_dir {tmp_path}-2')
    monkeypatch.setattr(lib.core.losses, 'ue_loss', real_ue_loss)
    # The command of the first failure continues this run from there with a tenth of the lr.
    code, out, err = run_main(*command[2:])
    assert code == 0, err
    assert f'resuming at round 0 epoch 1 from {tmp_path / "last.t7"}' in out
    assert [line.split(' | ')[1] for line in out.splitlines() if '| lr' in line] == \
        ['lr 0.00300', 'lr 0.00003']    # then x0.01: 0.6 and 0.8 of 3 epochs both round to 2


def test_unwritable_model_dir_fails_at_start(tiny_folder, tmp_path, run_main):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a directory')
    code, out, err = run_main(*fast_args(tiny_folder, blocker / 'checkpoints', '--epochs', '1'))
    assert code == 2 and 'cannot be written' in err
    assert '| lr' not in out                            # before any training


def test_full_disk_fails_at_start(tiny_folder, tmp_path, run_main, monkeypatch):
    monkeypatch.setattr(lib.run_folder.shutil, 'disk_usage',
                        lambda path: type('usage', (), {'free': 5 * 2**20})())
    code, out, err = run_main(*fast_args(tiny_folder, tmp_path, '--epochs', '1'))
    assert code == 2 and 'has 5 MiB free, but the checkpoints need about' in err
    assert '| lr' not in out


FAILING_RANK = '''
import os, sys
sys.path.insert(0, {root!r})
import main
from lib import engine
from lib.errors import UserError
if os.environ['RANK'] == '1':
    def fail(*args, **kwargs):
        raise UserError('injected failure on rank 1')
    engine.run_epoch = fail
main.cli.exit_program(main.main(sys.argv[1:]))   # as main.py ends
'''


def test_an_error_on_one_rank_ends_the_run_with_its_message(tiny_folder, tmp_path):
    """Rank 1 fails in its first epoch while rank 0 waits for it in a collective: the run ends
    at once with rank 1's own message, not after a barrier's timeout."""
    script = tmp_path / 'failing_rank.py'
    script.write_text(FAILING_RANK.format(root=ROOT))
    start = time.time()
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
         str(script), *fast_args(tiny_folder, tmp_path / 'ck', *MECHANICS, '--rounds', '1',
                                 '--epochs', '1',
                                 '--batch_size', '16', '--pipeline', 'gpu', '--no-tensorboard')],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode != 0
    assert 'error (rank 1): injected failure on rank 1' in proc.stderr
    assert time.time() - start < 240


def test_checkpoints_are_written_in_the_background_as_whole_files(tmp_path, monkeypatch):
    """submit returns before the file is written; the copy it writes is the state at submit
    time (training changes the tensors in place next); wait returns with the file whole."""
    import threading
    writer = lib.checkpoint_writer.CheckpointWriter()
    started, release = threading.Event(), threading.Event()
    real_save = lib.checkpoint.save_atomic

    def slow_save(state, path):
        started.set()
        release.wait(timeout=30)
        real_save(state, path)
    monkeypatch.setattr(lib.checkpoint, 'save_atomic', slow_save)
    weights = torch.zeros(4)
    writer.submit([({'net': {'w': weights}, 'npc': {}}, str(tmp_path / 'last.t7'))])
    assert started.wait(timeout=30) and not (tmp_path / 'last.t7').exists()
    weights.add_(1)                                   # the next training step
    release.set()
    writer.wait()
    assert torch.equal(torch.load(tmp_path / 'last.t7', weights_only=True)['net']['w'],
                       torch.zeros(4))
    assert [p.name for p in tmp_path.iterdir()] == ['last.t7']     # no temporary left


def test_a_ctrl_c_that_interrupts_the_wait_leaves_the_write_whole(tmp_path, monkeypatch):
    """A second Ctrl-C while the run waits for its last.t7: the KeyboardInterrupt leaves the
    writer as it was, so the next wait (the one before the interrupted line names last.t7)
    returns only once the file is whole. (With Thread.join the interrupted join marked the
    thread finished: the next wait returned at once, mid-write.)"""
    import threading
    writer = lib.checkpoint_writer.CheckpointWriter()
    started = threading.Event()
    real_save = lib.checkpoint.save_atomic

    def slow_save(state, path):
        started.set()
        time.sleep(1.0)
        real_save(state, path)
    monkeypatch.setattr(lib.checkpoint, 'save_atomic', slow_save)

    def ctrl_c(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGALRM, ctrl_c)
    try:
        writer.submit([({'net': {}, 'npc': {}}, str(tmp_path / 'last.t7'))])
        assert started.wait(timeout=30)
        signal.setitimer(signal.ITIMER_REAL, 0.2)        # while wait() waits
        with pytest.raises(KeyboardInterrupt):
            writer.wait()
        writer.wait()
        assert (tmp_path / 'last.t7').exists()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_writer_that_could_not_start_its_thread_is_not_left_busy(tmp_path, monkeypatch):
    import threading
    writer = lib.checkpoint_writer.CheckpointWriter()

    def no_thread(self):
        raise RuntimeError("can't start new thread")
    with monkeypatch.context() as patch:
        patch.setattr(threading.Thread, 'start', no_thread)
        with pytest.raises(RuntimeError, match="can't start new thread"):
            writer.submit([({'net': {}, 'npc': {}}, str(tmp_path / 'last.t7'))])
    waiting = threading.Thread(target=writer.wait, daemon=True)
    waiting.start()
    waiting.join(timeout=10)
    assert not waiting.is_alive()                   # wait() returns: nothing is in flight


def test_a_failed_background_write_is_one_error_line(tmp_path):
    writer = lib.checkpoint_writer.CheckpointWriter()
    writer.submit([({'net': {}, 'npc': {}}, str(tmp_path / 'missing' / 'last.t7'))])
    with pytest.raises(lib.checkpoint.UserError, match='cannot write checkpoint .*last.t7'):
        writer.wait()


def test_a_disk_that_fills_during_the_run_is_one_line_saying_how_to_continue(
        tiny_folder, tmp_path, run_main, monkeypatch):
    """The second epoch's checkpoint meets a full disk: the line says what last.t7 still holds
    (read from the disk) and the command that continues once there is room, which works."""
    import errno
    save, calls = torch.save, []

    def fills(state, f, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2:          # (epoch 0: ckpt.t7 and last.t7)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(state, f, *args, **kwargs)
    monkeypatch.setattr(lib.checkpoint.torch, 'save', fills)
    code, out, err = run_main(*fast_args(tiny_folder, tmp_path, *MECHANICS, '--rounds', '1',
                                         '--epochs', '3', '--no-tensorboard'))
    assert code == 2
    assert err.strip().endswith(
        f'No space left on device; {tmp_path}/last.t7 continues from round 0 epoch 1; continue '
        f'with: {PYTHON} main.py --model_dir {tmp_path} --resume last.t7 --workers 0 --device '
        f'cpu'), err
    monkeypatch.setattr(lib.checkpoint.torch, 'save', save)
    command = shlex.split(err[err.index(f'{PYTHON} main.py'):])
    code, out, err = run_main(*command[2:])
    assert code == 0 and f'resuming at round 0 epoch 1 from {tmp_path}/last.t7' in out, err
