"""Several processes, signals and the environment: a changed process count is said, a lost
process is one line, a closed terminal loses nothing, compile says what happened, every folder
is checked first, and printed commands work where they are printed."""
import json
import os
import pty
import shlex
import signal
import subprocess
import sys

import pytest
import torch

from conftest import (MECHANICS, PYTHON, ROOT, TORCHRUN_PRINTED, UNBROKEN_FLAGS, WITH_SOBEL,
                      assert_same_training_state, fast_args, signal_at)

TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node',
            '2']
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}


def records(model_dir, kind):
    return [r for r in map(json.loads, open(os.path.join(model_dir, 'log.jsonl')))
            if r['type'] == kind]


def continue_line(out):
    (line,) = [line for line in out.splitlines() if 'continue with: ' in line]
    return line.split('continue with: ', 1)[1]


# ----------------------------------------------------------------------------- 1. process count
def test_a_resume_on_another_number_of_processes_says_so_and_how_to_keep_it(tiny_folder,
                                                                            tmp_path,
                                                                            run_main):
    """1 process, then 2 (tools/launch.py, torchrun's one-line-error wrapper), then 1 again: each
    change is said with the command that keeps the count, and the 2-process leg's own lines
    name its launcher as it was typed (torchrun's own: the lost-process test below)."""
    flags = ['--rounds', '1', '--epochs', '3', '--batch_size', '16', '--pipeline', 'gpu',
             '--no-tensorboard', *MECHANICS]
    run = tmp_path / 'run'
    code, out, err = run_main(*fast_args(tiny_folder, run, *flags, '--stop-after', '1'))
    assert code == 0, err
    assert continue_line(out).startswith(f'{PYTHON} main.py ')
    proc = subprocess.run([sys.executable, 'tools/launch.py', '--standalone', '--nproc_per_node',
                           '2', 'main.py', '--model_dir', str(run), '--resume', 'last.t7',
                           '--device', 'cpu', '--workers', '0', '--stop-after', '1'],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (note,) = [line for line in proc.stdout.splitlines() if 'processes' in line and
               line.startswith('note:')]
    assert note.startswith('note: this run last trained on 1 process; here it continues on 2 '
                           'processes, and without --sync-bn')
    assert note.endswith(f'to keep it: {PYTHON} main.py --model_dir {run} --resume last.t7 '
                         f'--device cpu --workers 0')
    assert continue_line(proc.stdout) == f'{PYTHON} tools/launch.py --standalone ' \
        f'--nproc_per_node 2 main.py --model_dir {run} --resume last.t7 --device cpu --workers 0'
    code, out, err = run_main('--model_dir', run, '--resume', 'last.t7', '--device', 'cpu',
                              '--workers', '0', '--sync-bn')
    assert code == 0, err
    assert 'note: this run last trained on 2 processes; here it continues on 1 process; with ' \
           '--sync-bn' in out
    assert f'exactly: {TORCHRUN_PRINTED} --nproc_per_node 2 main.py' in out


# ----------------------------------------------------------------------------- 2. a lost process
RANK_KILLED = '''
import os, signal, sys, time
sys.path.insert(0, {root!r})
sys.path.insert(0, os.path.join({root!r}, 'tests'))
import lib.pipelines
import main
from conftest import _signalling
model_dir = sys.argv[sys.argv.index('--model_dir') + 1]
def last_written():
    while not os.path.exists(os.path.join(model_dir, 'last.t7')):
        time.sleep(0.01)
if os.environ['RANK'] == '{killed}':
    for cls in (lib.pipelines.LoaderPipeline, lib.pipelines.TensorPipeline):
        cls.train_batches = _signalling(cls.train_batches, signal.SIGKILL, (0, 1, 1),
                                        last_written)
main.cli.exit_program(main.main(sys.argv[1:]))   # as main.py ends
'''


@pytest.mark.parametrize('killed', [1, 0])
def test_a_lost_process_is_one_line_saying_what_last_t7_holds(tiny_folder, tmp_path, killed):
    """Either rank killed once last.t7 holds epoch 0: the other says what the file holds (rank
    1, which writes no checkpoint, reads it from the disk: it said 'no checkpoint had been
    written yet')."""
    script = tmp_path / 'rank_killed.py'
    script.write_text(RANK_KILLED.format(root=ROOT, killed=killed))
    model_dir = tmp_path / 'ck'
    proc = subprocess.run([*TORCHRUN, str(script),
                           *fast_args(tiny_folder, model_dir, *MECHANICS, '--rounds', '1',
                                      '--epochs', '3', '--batch_size', '4', '--pipeline', 'gpu',
                                      '--no-tensorboard')],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env=ENV)
    assert proc.returncode != 0
    left = 1 - killed
    ours = [line for line in proc.stderr.splitlines() if line.startswith(f'error (rank {left})')]
    assert ours == [f'error (rank {left}): process rank {killed} (of 2) of this run stopped or '
                    f'stopped answering (killed, out of memory, or stuck?), and this one cannot '
                    f'go on without it; {model_dir}/last.t7 continues from round 0 epoch 1; '
                    f'continue with: {TORCHRUN_PRINTED} --standalone --nproc_per_node 2 main.py '
                    f'--model_dir {model_dir} --resume last.t7 --workers 0 --device cpu']
    assert f'[rank{left}]: Traceback' not in proc.stderr
    assert 'after writing last.t7' not in proc.stdout        # no promise it could not keep
    assert torch.load(model_dir / 'last.t7', weights_only=True)['next']['epoch'] == 1


# ----------------------------------------------------------------------------- 3. a share of one
def test_a_share_of_one_image_per_process_is_refused():
    import datasets
    import numpy as np
    from lib.build import DeviceSettings, build_pipeline
    from lib.config import defaults
    from lib.distributed import World
    from lib.errors import UserError
    images = datasets.ImageSet(np.zeros((8, 32, 32, 3), np.uint8), np.zeros(8, np.int64),
                               ['a'], 'test')
    settings = DeviceSettings(torch.device('cpu'), 'gpu', 'fp32', 'none')
    for size, batch in ((2, 2), (3, 3)):
        config = defaults(batch_size=batch, method='and')
        with pytest.raises(UserError, match=f'--batch_size {batch} over {size} processes leaves '
                                            f'each process 1 image, and each needs at least 2'):
            build_pipeline(config, settings, images, images, (0.5,) * 3, (0.2,) * 3,
                           World(0, size))
    build_pipeline(defaults(batch_size=4), settings, images, images, (0.5,) * 3, (0.2,) * 3,
                   World(1, 2))


# main.py that receives `signal` before it reads its images, or (`decoding`) once the first
# images came back from the processes that decode them, which are then busy with the next
# (each task takes 0.3 s).
SIGNAL_BEFORE_TRAINING = '''
import os, signal, sys, time
sys.path.insert(0, {root!r})
import datasets.decoding, lib.build, main
read, decode = lib.build.load_data, datasets.decoding.decoded_in_order
chunk = datasets.decoding._decode_chunk
def slow_chunk(jobs):
    time.sleep(0.3)
    return chunk(jobs)
datasets.decoding._decode_chunk = slow_chunk
def load_data(*args, **kwargs):
    if not {decoding!r}:
        os.kill(os.getpid(), signal.{signal})
    return read(*args, **kwargs)
def decoded_in_order(*args, **kwargs):
    for index, image in enumerate(decode(*args, **kwargs)):
        if index == 1:
            os.kill(os.getpid(), signal.{signal})
        yield image
lib.build.load_data, datasets.decoding.decoded_in_order = load_data, decoded_in_order
main.cli.exit_program(main.main(sys.argv[1:]))   # as main.py ends
'''


@pytest.mark.parametrize('signum, decoding', [(signal.SIGHUP, False), (signal.SIGTERM, True),
                                              (signal.SIGINT, True)])
def test_a_stop_signal_before_training_quits_at_once_and_leaves_no_folder(tiny_folder, tmp_path,
                                                                          signum, decoding):
    """Where the default action killed the run silently and left its run.lock (or, for
    Ctrl-C, said only 'interrupted'): one line, the signal's exit code, the folder the run made
    taken back, and the processes decoding images ended (they inherit the run's handlers by
    fork: left to them, the run waited on them)."""
    script = tmp_path / 'signalled.py'
    script.write_text(SIGNAL_BEFORE_TRAINING.format(root=ROOT, signal=signal.Signals(signum).name,
                                                    decoding=decoding))
    name = 'Ctrl-C' if signum == signal.SIGINT else signal.Signals(signum).name
    model_dir = tmp_path / 'new' / 'run'
    proc = subprocess.run([sys.executable, str(script),
                           *fast_args(tiny_folder, model_dir, *MECHANICS, '--rounds', '1',
                                      '--epochs', '1', '--no-tensorboard'),
                           *(['--workers', '2', '--no-cache'] if decoding else [])],
                          capture_output=True, text=True, cwd=ROOT, timeout=60,
                          start_new_session=True)
    assert proc.returncode == 128 + signum, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == \
        f'stopped by {name}: nothing was trained or written'
    assert 'Traceback' not in proc.stderr
    assert not (tmp_path / 'new').exists()


@pytest.mark.parametrize('when, extra, ending', [
    ('close', [], 'done: best kNN top-1'),              # its checkpoint being written
    ('evaluate', [], 'done: best kNN top-1'),           # its kNN pass
    ('evaluate', ['--epochs', '2', '--stop-after', '1'], 'stopping after 1 epoch')])
def test_a_stop_signal_after_the_last_epochs_steps_lets_the_run_end(
        when, extra, ending, tiny_folder, tmp_path, run_main, monkeypatch):
    """SIGTERM after the steps of the run's last epoch (or --stop-after's), while it is being
    evaluated or its checkpoint is still being written: the run ends as it would have (its
    result, exit code 0, its end record), after a line saying that it ends once the file is
    written; before, this said 'nothing was trained or written', or 'stopping at the next
    step', of which there is none."""
    import lib.build
    from lib.run_log import RunLog
    owner, name = (RunLog, 'close') if when == 'close' else (lib.build, 'evaluate')
    real = getattr(owner, name)

    def signalled(*args, **kwargs):     # (close: in the engine's `finally`, by the writer's wait)
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, signalled)
    code, out, err = run_main(*fast_args(tiny_folder, tmp_path, *MECHANICS, '--rounds', '1',
                                         '--epochs', '1', '--no-tensorboard', *extra))
    assert code == 0, err
    assert 'SIGTERM: the run is ending: it stops once its last checkpoint is written' in out
    assert 'next step' not in out and 'nothing was trained' not in out + err
    assert any(line.startswith(ending) for line in out.splitlines()[-2:]), out
    assert records(tmp_path, 'epoch')


def test_a_stop_signal_in_an_evaluation_stops_at_the_next_epochs_first_step(
        tiny_folder, tmp_path, run_main, monkeypatch):
    """SIGTERM in the kNN pass of an epoch that is not the last: the run stops at the next
    step, the first of the next epoch, with last.t7 continuing from it."""
    import lib.build
    evaluate = lib.build.evaluate

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        monkeypatch.setattr(lib.build, 'evaluate', evaluate)
        return evaluate(*args, **kwargs)
    monkeypatch.setattr(lib.build, 'evaluate', signalled)
    code, out, err = run_main(*fast_args(tiny_folder, tmp_path, *MECHANICS, '--rounds', '1',
                                         '--epochs', '3', '--no-tensorboard'))
    assert code == 0, err
    assert 'SIGTERM: stopping at the next step, after writing last.t7' in out
    assert [(r['round'], r['epoch']) for r in records(tmp_path, 'epoch')] == [(0, 0)]
    held = torch.load(tmp_path / 'last.t7', weights_only=True)['next']
    assert (held['round'], held['epoch']) == (0, 1)


def test_no_stop_line_while_an_error_is_said_nor_once_the_run_has_ended(tiny_folder, tmp_path,
                                                                        run_main, monkeypatch):
    """A signal while an error is on its way to its line (torchrun ends the other processes
    when one fails) adds no stop line; one after the run (its folder being unlocked) is
    ignored: the run's own result and exit code stand, not 'nothing was trained'."""
    import lib.console
    import lib.engine
    from lib.run_folder import RunLock

    def lost_worker(*args, **kwargs):
        raise RuntimeError('DataLoader worker (pid 1) is killed by signal: Killed.')
    lost_loader_line = lib.console.lost_loader_line

    def signalled(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        return lost_loader_line(*args)
    monkeypatch.setattr(lib.engine, 'run_epoch', lost_worker)
    monkeypatch.setattr(lib.console, 'lost_loader_line', signalled)
    flags = fast_args(tiny_folder, tmp_path / 'a', *MECHANICS, '--rounds', '1', '--epochs', '1',
                      '--no-tensorboard')
    code, out, err = run_main(*flags)
    assert code == 2 and 'a data-loader worker process was killed' in err
    assert 'SIGTERM' not in out + err
    monkeypatch.undo()
    release = RunLock.release

    def unlocked(self):
        os.kill(os.getpid(), signal.SIGINT)
        release(self)
    monkeypatch.setattr(RunLock, 'release', unlocked)
    code, out, err = run_main(*flags[:3], tmp_path / 'b', *flags[4:])
    assert code == 0, err
    assert out.splitlines()[-1].startswith('files: ') and err == ''


# ----------------------------------------------------------------------------- 4. SIGHUP
def test_sighup_stops_at_a_step_like_sigterm_and_resumes_exactly(tiny_folder, tmp_path,
                                                                  run_main, monkeypatch,
                                                                  unbroken_run):
    signal_at(monkeypatch, signal.SIGHUP, (0, 1, 0))
    code, out, err = run_main(*fast_args(tiny_folder, tmp_path, *UNBROKEN_FLAGS['cpu']))
    monkeypatch.undo()
    assert code == 0, err
    assert 'SIGHUP: stopping at the next step, after writing last.t7' in out
    (stop,) = records(tmp_path, 'stop')
    assert (stop['signal'], stop['round'], stop['epoch'], stop['step']) == ('SIGHUP', 0, 1, 1)
    assert stop['continue_with'] == (f'{PYTHON} main.py --model_dir {tmp_path} --resume last.t7 '
                                     f'--workers 0 --device cpu')     # (as typed: fast_args)
    code, out, err = run_main('--model_dir', tmp_path, '--resume', 'last.t7', '--workers', '0',
                              '--pipeline', 'cpu')
    assert code == 0, err
    assert_same_training_state(unbroken_run('cpu'), torch.load(tmp_path / 'last.t7',
                                                               weights_only=True))


HUNG_UP = '''
import os, signal, sys, time
sys.path.insert(0, {root!r})
from lib.stopping import StopSignals, write_line
time.sleep(0.5)                          # the terminal is gone by now
with StopSignals(write_line) as stop:
    os.kill(os.getpid(), signal.SIGHUP)
    for i in range(200):
        print('still writing', i, flush=True)
        sys.stderr.write('and here\\n')
open(sys.argv[1], 'w').write(repr((stop.name, os.isatty(1), os.isatty(2))))
'''


def test_after_a_hangup_writes_to_the_closed_terminal_do_not_end_the_run(tmp_path):
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, '-c', HUNG_UP.format(root=ROOT),
                             str(tmp_path / 'result')], stdout=slave, stderr=slave)
    os.close(slave)
    os.close(master)                     # the terminal window closes
    assert proc.wait(timeout=60) == 0
    assert (tmp_path / 'result').read_text() == "('SIGHUP', False, False)"


# ----------------------------------------------------------------------------- 5. compile
def test_a_compiler_switched_off_by_the_environment_is_said_and_recorded(tiny_folder, tmp_path,
                                                                          run_main):
    import torch._dynamo
    # As TORCH_COMPILE_DISABLE=1 would, set and put back with torch's own config.patch (on
    # PyTorch 2.14 monkeypatch's undo leaves the option undefined: every later
    # torch.compile in this process raises AttributeError).
    with torch._dynamo.config.patch(disable=True):
        code, out, err = run_main(*fast_args(tiny_folder, tmp_path, '--rounds', '1',
                                             '--epochs', '1', '--compile', 'default',
                                             *MECHANICS))
    assert code == 0, err
    assert 'compile: none (asked for default), TORCH_COMPILE_DISABLE=1 in the environment ' \
           'makes torch.compile return the code as it is' in out
    assert 'agrees with the eager step' not in out and 'compile none)' in out
    (start,) = records(tmp_path, 'start')
    assert start['compile']['used'] == 'none' and start['compile']['check'] is None


# ----------------------------------------------------------------------------- 6. torchrun's env
@pytest.mark.parametrize('environment, message', [
    ({'WORLD_SIZE': '2'}, 'error (rank ?): WORLD_SIZE=2 is set in the environment but RANK is '
                          'not: torchrun sets both (and MASTER_ADDR, MASTER_PORT); unset '
                          'WORLD_SIZE to run one process'),
    ({'WORLD_SIZE': 'abc'}, 'error (rank ?): WORLD_SIZE=abc in the environment is not a number '
                            'of processes (torchrun sets it); unset it to run one process'),
    ({'WORLD_SIZE': '2', 'RANK': '2'}, 'error (rank 2): RANK=2 in the environment is not a rank '
                                       'from 0 to 1 (torchrun sets it); unset it and WORLD_SIZE '
                                       'to run one process')])
def test_torchruns_variables_set_by_hand_are_one_line(environment, message, run_main,
                                                      monkeypatch):
    """Left over in a shell, or set by hand: one line, not a KeyError or ValueError traceback."""
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv('TORCHELASTIC_RUN_ID', raising=False)
    assert run_main('--device', 'cpu') == (2, '', message + '\n')


def test_a_group_joined_without_torchrun_says_that_it_waits(run_main, monkeypatch):
    """Without torchrun nothing else says why the run waits (for processes that may never
    come, up to the backend's timeout of 30 minutes): rank 0 says so first."""
    import torch.distributed

    def no_peers(*args, **kwargs):
        raise RuntimeError('timed out')
    monkeypatch.setattr(torch.distributed, 'init_process_group', no_peers)
    for name, value in (('WORLD_SIZE', '2'), ('RANK', '0'), ('MASTER_ADDR', '127.0.0.1'),
                        ('MASTER_PORT', '29533')):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv('TORCHELASTIC_RUN_ID', raising=False)
    code, out, err = run_main('--device', 'cpu')
    assert code == 2 and err.startswith('error (rank 0): the 2 processes of this run did not')
    assert out == ('joining a group of 2 processes at 127.0.0.1:29533 as rank 0, as WORLD_SIZE '
                   'and RANK set in the environment (not by torchrun) ask: this waits until all '
                   '2 have joined\n')


# ----------------------------------------------------------------------------- 7. folders
@pytest.mark.parametrize('bad', ['--log-dir', '--model_dir'])
def test_a_folder_that_cannot_be_written_is_refused_before_anything_is_left(tiny_folder,
                                                                             tmp_path, run_main,
                                                                             bad):
    blocker = tmp_path / 'a-file'
    blocker.write_text('x')
    model_dir, log_dir = tmp_path / 'run', tmp_path / 'logs'
    if bad == '--log-dir':
        log_dir = blocker / 'runs'
    else:
        model_dir = blocker / 'run'
    code, out, err = run_main('--data-root', tiny_folder, '--model_dir', model_dir, '--log-dir',
                              log_dir, '--device', 'cpu', '--workers', '0', '--epochs', '1',
                              '--batch_size', '8', *MECHANICS)
    assert code == 2 and err.startswith(f'error: {bad} ') and 'cannot be written: Not a ' \
        'directory' in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ['a-file']          # no folder, no run.lock


# ----------------------------------------------------------------------------- 8. commands
def test_printed_commands_work_from_the_folder_they_were_printed_in(tiny_folder, tmp_path,
                                                                   run_main, monkeypatch):
    """A run started in another folder than the project's (here, in this process) prints the
    command that continues it; typed as printed, in that folder, it is a program that works."""
    elsewhere = tmp_path / 'elsewhere'
    os.makedirs(elsewhere)
    main_py = os.path.join(ROOT, 'main.py')
    monkeypatch.chdir(elsewhere)
    code, out, err = run_main(*fast_args(tiny_folder, 'run', '--rounds', '1', '--epochs', '2',
                                         '--stop-after', '1', *MECHANICS, '--no-tensorboard'))
    assert code == 0, err
    printed = continue_line(out)
    assert printed == f'{PYTHON} {main_py} --model_dir run --resume last.t7 --workers 0 ' \
        '--device cpu'
    words = shlex.split(printed)
    proc = subprocess.run([sys.executable, *words[1:]], capture_output=True, text=True,
                          cwd=elsewhere, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert 'resuming at round 0 epoch 1' in proc.stdout
    for tool in ('embed', 'retrieve', 'export', 'linear_probe', 'visualize'):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', f'{tool}.py'),
                               '--help'], capture_output=True, text=True, cwd=elsewhere,
                              timeout=120)
        assert proc.returncode == 0 and 'usage:' in proc.stdout, proc.stderr


NOHUP = '''
import os, signal, sys
sys.path.insert(0, {root!r})
from lib.stopping import StopSignals, write_line
signal.signal(signal.SIGHUP, signal.SIG_IGN)         # what nohup does
with StopSignals(write_line) as stop:
    os.kill(os.getpid(), signal.SIGHUP)
print('stopped' if stop() else 'still running')
'''


def test_under_nohup_a_closed_terminal_does_not_stop_the_run():
    proc = subprocess.run([sys.executable, '-c', NOHUP.format(root=ROOT)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == 'still running\n', proc.stderr


RANK_SIGNALLED = '''
import os, signal, sys
sys.path.insert(0, {root!r})
sys.path.insert(0, os.path.join({root!r}, 'tests'))
import lib.pipelines
import main
from conftest import _signalling
if os.environ['RANK'] == {rank!r}:
    for cls in (lib.pipelines.LoaderPipeline, lib.pipelines.TensorPipeline):
        cls.train_batches = _signalling(cls.train_batches, signal.SIGTERM, (0, 0, 1))
main.cli.exit_program(main.main(sys.argv[1:]))   # as main.py ends
'''


@pytest.mark.parametrize('rank', ['0', '1'])
def test_a_stop_signal_to_one_process_stops_all_at_the_next_step(tiny_folder, tmp_path, rank):
    """Epochs of 5 steps (fewer than the GPU's 20 between checks): on the CPU every step is a
    check, so the processes agree on the step after the signal, whichever got it."""
    script = tmp_path / 'signalled.py'
    script.write_text(RANK_SIGNALLED.format(root=ROOT, rank=rank))
    model_dir = tmp_path / 'ck'
    proc = subprocess.run([*TORCHRUN, str(script),
                           *fast_args(tiny_folder, model_dir, *WITH_SOBEL, '--rounds', '1',
                                      '--epochs', '2', '--batch_size', '4', '--pipeline', 'gpu',
                                      '--no-tensorboard')],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    who = 'SIGTERM' if rank == '0' else 'a stop signal to another process'
    assert f'stopped by {who} at round 0 epoch 0 step 2: ' in proc.stdout
    position = torch.load(model_dir / 'last.t7', weights_only=True)['next']
    assert (position['round'], position['epoch'], position['step']) == (0, 0, 2)
    (stop,) = records(model_dir, 'stop')
    assert stop['signal'] == who and stop['step'] == 2
