"""The model folder is the run's record, and nothing spoils it in silence: one live run per
folder, a resumed position means the same images, log.jsonl survives a cut-off line and never
claims an epoch that last.t7 cannot continue after, and the free-space check counts what a run
replaces."""
import errno
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections import Counter

import pytest
import torch

import lib.build
import lib.checkpoint as ckpt
import lib.run_folder
import tools.export
import lib.pipelines
import lib.run_log
import tools.visualize
from conftest import MECHANICS, PYTHON, ROOT, fast_args
from lib.checkpoint_writer import CheckpointWriter
from lib.errors import UserError
from lib.resume import check_resume_position, repeated_epoch_note
from lib.run_folder import acquire, prepare_model_dir, space_needed

MiB = 2**20
STARTED = r'started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d'


def one_error_line(result, *needles):
    code, out, err = result
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith('error: '), (out, err)
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def folder_bytes(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))
            if (folder / name).is_file()}


# ----------------------------------------------------------------------------- 1. one live run
HOLD = '''
import sys, time
sys.path.insert(0, {root!r})
from lib.run_folder import acquire
lock = acquire({folder!r})
print('ready', flush=True)
time.sleep(600)
'''


@pytest.fixture
def lock_holder():
    """start(folder): a separate process that holds `folder`'s lock, once it said so."""
    started = []

    def start(folder):
        proc = subprocess.Popen([sys.executable, '-c', HOLD.format(root=ROOT, folder=str(folder))],
                                stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout.readline().strip() == 'ready'
        return proc
    yield start
    for proc in started:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_a_held_folder_is_refused_naming_the_live_run_until_it_is_killed(tmp_path,
                                                                          lock_holder):
    holder = lock_holder(tmp_path)
    with pytest.raises(UserError) as refused:
        acquire(tmp_path)
    assert re.search(rf'is in use by a live run \(process {holder.pid}, {STARTED}\)',
                     str(refused.value)), refused.value
    holder.send_signal(signal.SIGKILL)              # a run killed: the OS drops its lock
    holder.wait()
    with acquire(tmp_path) as lock:
        assert lock.held
        assert json.loads((tmp_path / 'run.lock').read_text())['pid'] == os.getpid()
        with pytest.raises(UserError, match=f'process {os.getpid()}, '):
            acquire(tmp_path)                       # one hold at a time, in one process too
    assert (tmp_path / 'run.lock').read_text() == ''  # released: it names no run
    with acquire(tmp_path) as lock:
        assert lock.held


def test_one_live_run_per_model_dir(tiny_folder, tmp_path, run_main, lock_holder):
    """Training, resuming and --init-from are refused while a run holds the folder, without
    touching it; --test_only and the analysis commands only read, and go on; once the holder is
    killed, the folder is free."""
    flags = ['--rounds', '1', '--epochs', '1', '--no-tensorboard', '--quiet', *MECHANICS]
    code, _, err = run_main(*fast_args(tiny_folder, tmp_path / 'run', *flags))
    assert code == 0, err
    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'ckpt.t7').write_bytes((tmp_path / 'run' / 'ckpt.t7').read_bytes())
    holder = lock_holder(tmp_path / 'run')
    before = folder_bytes(tmp_path / 'run')
    live = rf'--model_dir {tmp_path / "run"} is in use by a live run \(process {holder.pid}, '
    for argv in (fast_args(tiny_folder, tmp_path / 'run', *flags),
                 ['--resume', 'last.t7', '--model_dir', tmp_path / 'run', '--rounds', '2'],
                 fast_args(tiny_folder, tmp_path / 'run', '--init-from',
                           tmp_path / 'other' / 'ckpt.t7', '--rounds', '2', *MECHANICS)):
        line = one_error_line(run_main(*argv))
        assert re.search(live + STARTED + r'\)', line), line
    assert folder_bytes(tmp_path / 'run') == before
    code, out, err = run_main('--resume', 'ckpt.t7', '--model_dir', tmp_path / 'run',
                              '--test_only', '--workers', '0')
    assert code == 0 and f'kNN accuracy of {tmp_path / "run" / "ckpt.t7"}' in out, err
    assert tools.export.main(['--ckpt', str(tmp_path / 'run' / 'ckpt.t7'), '--device', 'cpu',
                            '--out', str(tmp_path / 'test.npz')]) == 0
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    code, out, err = run_main('--resume', 'last.t7', '--model_dir', tmp_path / 'run',
                              '--rounds', '2', '--workers', '0')
    assert code == 0 and 'done:' in out, err


def test_start_up_removes_only_the_temporaries_of_dead_processes(tmp_path):
    ended = subprocess.Popen([sys.executable, '-c', ''])
    ended.wait()                    # its id names no process now
    dead, live = f'last.t7.tmp{ended.pid}', f'ckpt.t7.tmp{os.getpid()}'
    for name in (dead, live, 'notes.tmp1'):
        (tmp_path / name).write_bytes(b'partial')
    lock = prepare_model_dir(str(tmp_path), checkpoint_bytes=1)
    lock.release()                  # (having recorded nothing: its run.lock taken back)
    assert sorted(os.listdir(tmp_path)) == sorted([live, 'notes.tmp1'])




def test_a_run_that_locks_a_removed_run_lock_locks_the_new_one(tmp_path, monkeypatch):
    """A refused run takes its new run.lock back; a second run that opened that file before
    and locks it once freed holds a file no later run sees: it locks the folder's anew."""
    first = prepare_model_dir(str(tmp_path / 'ck'))
    flock = lib.run_folder.fcntl.flock

    def after_the_first_is_refused(fd, operation):
        first.release()             # (recorded nothing: run.lock removed)
        monkeypatch.setattr(lib.run_folder.fcntl, 'flock', flock)
        return flock(fd, operation)
    monkeypatch.setattr(lib.run_folder.fcntl, 'flock', after_the_first_is_refused)
    with acquire(tmp_path / 'ck') as second:
        held = os.fstat(second._handle.fileno())
        assert (held.st_ino, held.st_nlink) == (os.stat(tmp_path / 'ck' / 'run.lock').st_ino, 1)


def test_a_lock_on_a_file_no_longer_at_run_lock_is_taken_anew(tmp_path, monkeypatch):
    """As on NFS, where a removed file still open keeps a link: the lock is judged by the
    file at run.lock now (its inode), not by the link count."""
    folder = tmp_path / 'ck'
    folder.mkdir()
    flock = lib.run_folder.fcntl.flock

    def replaced_meanwhile(fd, operation):
        os.link(folder / 'run.lock', tmp_path / 'still-linked')        # (nlink stays 1)
        (tmp_path / 'new').write_text('')
        os.replace(tmp_path / 'new', folder / 'run.lock')
        monkeypatch.setattr(lib.run_folder.fcntl, 'flock', flock)
        return flock(fd, operation)
    monkeypatch.setattr(lib.run_folder.fcntl, 'flock', replaced_meanwhile)
    with acquire(folder) as lock:
        assert os.fstat(lock._handle.fileno()).st_ino == os.stat(folder / 'run.lock').st_ino


# ----------------------------------------------------------------------------- one run a folder
QUICK = ['--rounds', '1', '--epochs', '1', '--no-tensorboard', '--quiet', *MECHANICS]


def suggested(line):
    """The argv of each main.py command an error line suggests (run from the project)."""
    return [shlex.split(words) for words in
            re.findall(re.escape(PYTHON) + r' main\.py (.+?)(?=, or |; or |$)', line)]


def test_a_new_run_is_refused_where_a_run_trained(tiny_folder, tmp_path, run_main, monkeypatch):
    """A fresh run or an --init-from into a folder that holds a run would overwrite its
    checkpoints and splice its log: refused, naming what is there, the folder untouched, and
    both commands printed work. A run that ended before its first epoch (a log of a start
    record, a stale run.lock and config.json) does not hold the folder."""
    monkeypatch.chdir(ROOT)
    quick = tmp_path / 'quick'
    assert run_main(*fast_args(tiny_folder, quick, *QUICK))[0] == 0
    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'ckpt.t7').write_bytes((quick / 'ckpt.t7').read_bytes())
    before = folder_bytes(quick)
    lines = [one_error_line(run_main(*fast_args(tiny_folder, quick, *QUICK, *more)),
                            f'--model_dir {quick} holds a run (last.t7 at round 0 epoch 0, '
                            f'finished)')
             for more in ((), ('--init-from', tmp_path / 'other', '--rounds', '2'))]
    assert folder_bytes(quick) == before
    (elsewhere,) = suggested(lines[0])          # (a finished run: nothing to continue)
    code, _, err = run_main(*elsewhere)
    assert code == 0 and (tmp_path / 'quick-2' / 'last.t7').exists(), err
    assert folder_bytes(quick) == before
    ended = tmp_path / 'ended'
    ended.mkdir()
    (ended / 'log.jsonl').write_text('{"type": "start", "options": {}}\n')
    (ended / 'config.json').write_text('{}')
    (ended / 'run.lock').write_text('')
    code, _, err = run_main(*fast_args(tiny_folder, ended, *QUICK))
    assert code == 0 and (ended / 'last.t7').exists(), err


def test_a_run_resumed_into_another_runs_folder_is_refused(tiny_folder, tmp_path, run_main,
                                                           monkeypatch):
    """--resume of one run with --model_dir of another, finished one: refused, that folder
    untouched; continued in its own folder or in an unused (new) one, it trains."""
    monkeypatch.chdir(ROOT)
    quick, photos = tmp_path / 'quick', tmp_path / 'photos'
    assert run_main(*fast_args(tiny_folder, quick, *QUICK))[0] == 0
    assert run_main(*fast_args(tiny_folder, photos, *QUICK, '--rounds', '2',
                               '--stop-after', '1'))[0] == 0
    before = folder_bytes(quick)
    line = one_error_line(run_main('--resume', photos, '--model_dir', quick, '--workers', '0'),
                          f'--model_dir {quick} holds a run (last.t7 at round 0 epoch 0, '
                          f'finished)')
    assert folder_bytes(quick) == before
    home, elsewhere = suggested(line)           # (quick's run finished: nothing to continue)
    assert elsewhere[-2:] == ['--model_dir', str(tmp_path / 'quick-2')]
    # A new run where a run stopped halfway: continuing that run is offered first, as the
    # continue command of this run's words of this machine.
    line = one_error_line(run_main(*fast_args(tiny_folder, photos, *QUICK)),
                          f'--model_dir {photos} holds a run (last.t7 at round 0 epoch 0)')
    assert suggested(line)[0][:8] == ['--model_dir', str(photos), '--resume', 'last.t7',
                                      '--workers', '0', '--device', 'cpu']
    for argv, folder in ((elsewhere, tmp_path / 'quick-2'), (home, photos)):
        code, out, err = run_main(*argv)
        assert code == 0 and f'{folder / "last.t7"} the last (round 1 epoch 0)' in out, err
        if folder != photos:    # typed again: its folder holds its finished continuation
            line = one_error_line(run_main(*argv), f'--model_dir {folder} holds a run '
                                                   f'(last.t7 at round 1 epoch 0, finished)')
            assert [words[-2:] for words in suggested(line)] == [
                ['--model_dir', str(photos)], ['--model_dir', str(tmp_path / 'quick-2-2')]]
    assert folder_bytes(quick) == before
    # A finished run typed into another run's folder: nothing to do there, and the command
    # that trains it on continues it in its own folder, not over the other run.
    code, out, err = run_main('--resume', photos, '--model_dir', quick, '--workers', '0')
    assert code == 0 and 'already finished' in out, err
    (more,) = suggested(next(line for line in out.splitlines() if 'more rounds' in line))
    assert more[-4:] == ['--rounds', '3', '--model_dir', str(photos)]
    code, out, err = run_main(*more)
    assert code == 0 and f'{photos / "last.t7"} the last (round 2 epoch 0)' in out, err
    assert folder_bytes(quick) == before


def test_a_run_that_trained_keeps_its_folders_and_takes_back_none_it_did_not_make(
        tiny_folder, tmp_path, run_main, monkeypatch):
    """A run in a folder it made (np/run, np new) keeps it; a folder another made beside it
    meanwhile (np/other, empty) is left alone."""
    import main
    real_train = main.train

    def train_and_make_a_sibling(*args, **kwargs):
        (tmp_path / 'np' / 'other').mkdir()
        return real_train(*args, **kwargs)
    monkeypatch.setattr(main, 'train', train_and_make_a_sibling)
    code, _, err = run_main(*fast_args(tiny_folder, tmp_path / 'np' / 'run', *QUICK))
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / 'np')) == ['other', 'run']
    assert (tmp_path / 'np' / 'run' / 'last.t7').exists()


@pytest.mark.parametrize('refused', ['no images', 'Ctrl-C while reading'])
def test_a_run_ended_before_its_first_record_leaves_nothing_it_made(tmp_path, run_main,
                                                                    monkeypatch, refused):
    """No model dir, run.lock or TensorBoard folder of its own left behind; a folder that was
    there keeps what it held."""
    (tmp_path / 'empty').mkdir()
    if refused != 'no images':
        def interrupted(*args):
            raise KeyboardInterrupt
        monkeypatch.setattr(lib.build, 'run_data', interrupted)
    flags = ['--dataset', 'folder', '--data-root', tmp_path / 'empty', '--workers', '0',
             '--log-dir', tmp_path / 'runs', *MECHANICS]
    code, _, err = run_main(*flags, '--model_dir', tmp_path / 'new' / 'ck1')
    assert code == (2 if refused == 'no images' else 130), err
    assert sorted(os.listdir(tmp_path)) == ['empty']
    kept = tmp_path / 'kept'
    (kept / 'runs').mkdir(parents=True)
    for name, text in (('notes.txt', 'mine'), ('config.json', '{}'), ('run.lock', '')):
        (kept / name).write_text(text)
    before = folder_bytes(kept)
    code, _, err = run_main(*flags, '--model_dir', kept, '--name', 'kept', '--log-dir',
                            kept / 'runs')
    assert code in (2, 130) and folder_bytes(kept) == before, err
    assert sorted(os.listdir(kept)) == ['config.json', 'notes.txt', 'run.lock', 'runs']
    assert os.listdir(kept / 'runs') == []

# ----------------------------------------------------------------------------- 2. positions
@pytest.fixture
def drawn(monkeypatch):
    """Counts the images each (round, epoch) trains on; `drawn.stop_at = k` sends this process
    SIGTERM while the k-th batch from then on is drawn (the trainer stops after that step)."""
    class Drawn(Counter):
        stop_at = None
    counts = Drawn()
    for cls in (lib.pipelines.LoaderPipeline, lib.pipelines.TensorPipeline):
        def wrapped(self, round_index, epoch, start_step=0, real=cls.train_batches):
            for views, indexes in real(self, round_index, epoch, start_step):
                if counts.stop_at is not None:
                    counts.stop_at -= 1
                    if counts.stop_at == 0:
                        os.kill(os.getpid(), signal.SIGTERM)
                counts[(round_index, epoch)] += len(indexes)
                yield views, indexes
        monkeypatch.setattr(cls, 'train_batches', wrapped)
    return counts


def epochs_logged(folder):
    return [(r['round'], r['epoch']) for r in lib.run_log.read_records(folder)
            if r['type'] == 'epoch']


def test_a_resume_mid_epoch_keeps_the_batch_size_and_seed(tiny_folder, tmp_path, run_main,
                                                         drawn, capsys):
    """20 images at --batch_size 8: 2 steps (16 images) an epoch. Stopped after step 1 of
    epoch 0, a resume at another batch size or seed is refused; one at batch 8 finishes the
    epoch with the 8 images left; at that epoch boundary, --batch_size 4 is allowed and said.
    On the way, a cut-off last line of log.jsonl (a run killed while appending) is kept apart
    from the next record."""
    drawn.stop_at = 1
    code, out, err = run_main(*fast_args(tiny_folder, tmp_path, *MECHANICS, '--rounds', '1',
                                         '--epochs', '2', '--seed', '5', '--no-tensorboard'))
    assert code == 0 and 'stopped by SIGTERM at round 0 epoch 0 step 1' in out, err
    assert drawn == {(0, 0): 8}
    assert torch.load(tmp_path / 'last.t7', weights_only=True)['next']['step'] == 1
    before = folder_bytes(tmp_path)
    typed = ('--resume', 'last.t7', '--model_dir', str(tmp_path), '--batch_size', '4')
    line = one_error_line(run_main(*typed),
                          f'{tmp_path / "last.t7"} stopped inside round 0 epoch 0, after step 1 '
                          f'with --batch_size 8; with --batch_size 4 that step would count other '
                          f'images')
    finish, then = [shlex.split(words) for words in re.findall(
        re.escape(PYTHON) + r' main\.py (.+?)(?=; then |$)', line)]
    assert finish == ['--resume', 'last.t7', '--model_dir', str(tmp_path), '--batch_size', '8',
                      '--stop-after', '1'] and then == list(typed)
    one_error_line(run_main('--resume', 'last.t7', '--model_dir', tmp_path, '--seed', '3'),
                   'after step 1 with --seed 5; with --seed 3 the epoch would be shuffled '
                   'otherwise')
    assert folder_bytes(tmp_path) == before and drawn == {(0, 0): 8}

    fragment = '{"type": "epoch", "round": 0, "ep'
    with open(tmp_path / 'log.jsonl', 'a') as log:
        log.write(fragment)                         # cut off by a kill: no newline
    torn_line = len((tmp_path / 'log.jsonl').read_text().splitlines())
    code, out, err = run_main('--resume', 'last.t7', '--model_dir', tmp_path, '--batch_size', '8',
                              '--stop-after', '1')
    assert code == 0 and 'resuming at round 0 epoch 0 step 1' in out, err
    assert drawn == {(0, 0): 16}                    # the 8 images left of epoch 0, no more
    lines = (tmp_path / 'log.jsonl').read_text().splitlines()
    assert lines[torn_line - 1] == fragment
    assert json.loads(lines[torn_line])['type'] == 'start'
    assert epochs_logged(tmp_path) == [(0, 0)]
    assert f'note: {tmp_path / "log.jsonl"} line {torn_line} is not a whole log record' in \
        capsys.readouterr().err
    assert torch.load(tmp_path / 'last.t7', weights_only=True)['next'] == \
        {'round': 0, 'epoch': 1, 'step': 0}

    code, out, err = run_main('--resume', 'last.t7', '--model_dir', tmp_path, '--batch_size', '4')
    assert code == 0 and 'done:' in out, err
    assert ("note: --batch_size 4 replaces the run's --batch_size 8 from round 0 epoch 1 on"
            in out)
    assert '5 steps of 4 images' in out
    assert drawn == {(0, 0): 16, (0, 1): 20}
    assert epochs_logged(tmp_path) == [(0, 0), (0, 1)]


def last_t7(step, round_index=0, epoch=1, **config):
    return {'next': {'round': round_index, 'epoch': epoch, 'step': step},
            'config': {'batch_size': 8, 'seed': 0, 'epochs': 4, **config}}


OPTIONS = {'batch_size': 8, 'seed': 0, 'epochs': 4, 'rounds': 3}


@pytest.mark.parametrize('state, changes, refused', [
    (last_t7(step=3), {'epochs': 6}, 'stopped inside round 0 epoch 1, after step 3 with '
                                     '--epochs 4; with --epochs 6 the epoch would change its '
                                     'schedule halfway, so this resume is refused'),
    (last_t7(step=0, round_index=1, epoch=0), {'epochs': 6},
     '--epochs 6 contradicts the run in last.t7, now at round 1 epoch 0 of 4-epoch rounds'),
    (last_t7(step=0, epoch=3), {'epochs': 3}, '--epochs 3 contradicts the run'),
])
def test_a_changed_round_length_is_refused_where_it_renumbers_epochs(state, changes, refused):
    with pytest.raises(UserError, match=re.escape(refused)):
        check_resume_position(state, {**OPTIONS, **changes}, 'last.t7')


def test_what_a_resume_may_change_at_an_epoch_boundary():
    assert check_resume_position(last_t7(step=0), {**OPTIONS, 'epochs': 6, 'seed': 2},
                                 'last.t7') == [
        "note: --seed 2 --epochs 6 replaces the run's --seed 0 --epochs 4 from round 0 epoch 1 "
        "on (last.t7 ends at an epoch boundary, so no image is skipped or trained twice); the "
        "run no longer equals one trained with --seed 0 --epochs 4 throughout"]
    assert check_resume_position(last_t7(step=5), OPTIONS, 'last.t7') == []
    # A finished run trains nothing, so nothing is said (main.py says it is finished).
    assert check_resume_position(last_t7(step=0, round_index=3, epoch=0),
                                 {**OPTIONS, 'batch_size': 4}, 'last.t7') == []


# ----------------------------------------------------------------------------- 3. torn lines
def test_a_record_after_a_cut_off_line_starts_a_line_of_its_own(tmp_path):
    path = tmp_path / 'log.jsonl'
    path.write_text('{"type": "start"}\n{"type": "epoch", "rou')
    log = lib.run_log.RunLog(str(tmp_path))
    log.end(ckpt.Progress(best_acc=0.5), 1.0)
    log.end(ckpt.Progress(best_acc=0.6), 1.0)
    lines = path.read_text().split('\n')
    assert lines[:2] == ['{"type": "start"}', '{"type": "epoch", "rou']
    assert [json.loads(line)['best_top1'] for line in lines[2:4]] == [50.0, 60.0]
    assert lines[4:] == ['']


def script(path):
    """A script of this repository (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3],
                                                  os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readers_skip_a_cut_off_line_with_a_note_naming_it(tmp_path, capsys):
    path = tmp_path / 'log.jsonl'
    records = [{'type': 'epoch', 'round': 0, 'epoch': e, 'global_epoch': e, 'knn_top1': 10.0 + e,
                'loss': {'and': 1.0}, 'seconds': 2.0} for e in range(3)]
    path.write_text(json.dumps(records[0]) + '\n'
                    + '{"type": "epoch", "round": 0, "epoch": 1, "glo\n'       # cut off
                    + '{"type": "epoch", "ro' + json.dumps(records[1]) + '\n'  # the old writer
                    + '\n' + json.dumps(records[2]) + '\n'
                    + '{"type": "end", "best')                                 # cut off, last
    notes = []
    assert lib.run_log.read_records(path, note=notes.append) == records
    assert notes[0] == f'note: {path} line 2 is not a whole log record: skipped'
    assert notes[1] == (f'note: {path} line 3 begins with a cut-off record: skipped up to '
                        f'column 22, the record after it kept')
    assert notes[2] == f'note: {path} line 6 is not a whole log record: skipped'
    assert len(notes) == 3
    assert [r['knn_top1'] for r in lib.run_log.epoch_records(tmp_path)] == [10.0, 11.0, 12.0]
    err = capsys.readouterr().err                   # the default: notes on stderr
    assert f'{path} line 2 ' in err and f'{path} line 6 ' in err
    code = tools.visualize.main(['curve', '--log', str(path), '--out', str(tmp_path / 'c.png')])
    out, err = capsys.readouterr()
    assert code == 0 and 'wrote' in out and f'note: {path} line 6 ' in err
    assert script('bench/compare_curve.py').main([str(path)]) == 0
    out, err = capsys.readouterr()
    assert '| 0 | 25.80 | 10.00 | -15.80 |' in out and f'note: {path} line 2 ' in err


def test_the_comparison_table_reads_past_a_cut_off_line(tmp_path, capsys):
    compare = script('experiments/compare.py')
    (tmp_path / 'log.jsonl').write_text(
        '{"type": "start"}\n{"type": "epoch", "round": 1, "ep'          # killed while appending
        + json.dumps({'type': 'end', 'final_top1': 61.5, 'best_top1': 62.0, 'best_round': 1,
                      'best_epoch': 3}) + '\n')                        # the next run's record
    assert compare.summary(str(tmp_path)) == (61.5, 62.0, (1, 3))
    assert f'note: {tmp_path / "log.jsonl"} line 2 begins with a cut-off record' in \
        capsys.readouterr().err


def test_a_log_of_no_records_at_all_is_refused(tmp_path):
    path = tmp_path / 'notes.txt'
    path.write_text('not a log\n')
    with pytest.raises(UserError, match=re.escape(f'{path} holds no log records: line 1 is not '
                                                  f'one')):
        lib.run_log.read_records(path)


# ----------------------------------------------------------------------------- 4. save order
class Blocked:
    """save_atomic held until `release` is set; `started` is set when a write begins."""

    def __init__(self, monkeypatch, fail=None):
        self.started, self.release, self.fail = threading.Event(), threading.Event(), fail
        self.real, self.order = ckpt.save_atomic, []
        monkeypatch.setattr(ckpt, 'save_atomic', self)

    def __call__(self, state, path):
        self.started.set()
        assert self.release.wait(timeout=60)
        self.order.append(os.path.basename(path))
        if self.fail:
            raise self.fail
        self.real(state, path)


def test_the_epoch_record_waits_for_last_t7(tmp_path, monkeypatch):
    blocked = Blocked(monkeypatch)
    writer = CheckpointWriter()
    log = lib.run_log.RunLog(str(tmp_path), after=writer.then)
    writer.submit([({'net': {}, 'npc': {}, 'round': 0, 'epoch': 0}, str(tmp_path / 'ckpt.t7')),
                   ({'net': {}, 'npc': {}, 'next': 1}, str(tmp_path / 'last.t7'))])
    log.epoch({'round': 0, 'epoch': 0, 'global_epoch': 0, 'loss': {}})
    assert blocked.started.wait(timeout=60)
    assert not (tmp_path / 'log.jsonl').exists()      # last.t7 is not written yet
    blocked.release.set()
    writer.wait()
    assert blocked.order == ['ckpt.t7', 'last.t7']
    assert [r['type'] for r in lib.run_log.read_records(tmp_path)] == ['epoch']
    log.end(ckpt.Progress(), 1.0)                       # nothing being written: at once
    assert [r['type'] for r in lib.run_log.read_records(tmp_path)] == ['epoch', 'end']


def test_a_failed_save_removes_its_temporary_and_logs_no_epoch(tmp_path, monkeypatch):
    (tmp_path / 'last.t7').write_bytes(b'the previous epoch')

    def disk_full(state, f):          # as torch.save meets a full disk: its zip writer fails
        f.write(b'part of a checkpoint')
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos')
    monkeypatch.setattr(ckpt.torch, 'save', disk_full)
    writer = CheckpointWriter()
    log = lib.run_log.RunLog(str(tmp_path), after=writer.then)
    writer.submit([({'net': {}, 'npc': {}}, str(tmp_path / 'last.t7'))])
    log.epoch({'round': 0, 'epoch': 1, 'global_epoch': 1, 'loss': {}})
    with pytest.raises(UserError, match=re.escape(
            f'cannot write checkpoint {tmp_path / "last.t7"}: No space left on device')):
        writer.wait()
    assert sorted(os.listdir(tmp_path)) == ['last.t7']
    assert (tmp_path / 'last.t7').read_bytes() == b'the previous epoch'


def test_a_resume_says_which_epoch_it_repeats(tmp_path):
    torch.save({'net': {}, 'npc': {}, 'round': 1, 'epoch': 2}, tmp_path / 'ckpt.t7')
    last = str(tmp_path / 'last.t7')
    assert repeated_epoch_note(last, ckpt.Progress(round=1, epoch=2)) == (
        f'note: {tmp_path / "ckpt.t7"} holds round 1 epoch 2, which {last} had not reached (the '
        f'run was stopped between writing the two): training repeats from round 1 epoch 2')
    assert repeated_epoch_note(last, ckpt.Progress(round=1, epoch=3)) is None
    assert repeated_epoch_note(last, ckpt.Progress(round=2, epoch=0)) is None


# ----------------------------------------------------------------------------- 5. free space
def sparse(path, size):
    with open(path, 'wb') as f:
        f.truncate(size)


def test_free_space_counts_the_checkpoints_a_run_replaces(tmp_path, monkeypatch):
    """The issue's numbers: checkpoints of 180,000,000 bytes (171.7 MiB; 3 of them 515 MiB),
    442 MiB free. A stopped run's last.t7 and ckpt.t7 are replaced, so resuming needs one more
    file's room (172 MiB), not three."""
    monkeypatch.setattr(lib.run_folder.shutil, 'disk_usage',
                        lambda path: type('usage', (), {'free': 442 * MiB})())
    size = 180_000_000
    fresh = tmp_path / 'fresh'
    with pytest.raises(UserError, match=re.escape(
            f'--model_dir {fresh} has 442 MiB free, but the checkpoints need about 515 MiB more '
            f'(last.t7, ckpt.t7 and a temporary copy while writing)')):
        prepare_model_dir(str(fresh), size)
    stopped = tmp_path / 'stopped'
    stopped.mkdir()
    sparse(stopped / 'last.t7', size)
    sparse(stopped / 'ckpt.t7', size)
    assert space_needed(str(stopped), size) == (size, 2 * size)
    prepare_model_dir(str(stopped), size).release()
    # Only last.t7 there, at most one checkpoint's size counted: 515 - 172 = 343 MiB needed.
    (stopped / 'ckpt.t7').unlink()
    sparse(stopped / 'last.t7', 3 * size)
    monkeypatch.setattr(lib.run_folder.shutil, 'disk_usage',
                        lambda path: type('usage', (), {'free': 300 * MiB})())
    with pytest.raises(UserError, match=re.escape(
            'has 300 MiB free, but the checkpoints need about 343 MiB more (last.t7, ckpt.t7 '
            'and a temporary copy while writing; the 172 MiB of the checkpoints there, which '
            'they replace, already counted)')):
        prepare_model_dir(str(stopped), size)
    with acquire(stopped) as lock:                      # the failed check released its hold
        assert lock.held


def test_a_folder_removed_before_its_lock_is_made_again_and_locked(tmp_path):
    """Between making a folder and locking it, a refused run beside it may have taken it back."""
    from lib.run_folder import acquire
    with acquire(tmp_path / 'gone') as lock:
        assert lock.held and (tmp_path / 'gone' / 'run.lock').exists()


def test_a_bug_on_rank_0_preparing_the_folder_does_not_leave_the_others_waiting():
    """Rank 0 shares a line with the others (who stop with it) before its traceback."""
    from lib.run_folder import on_rank_0
    shared = []

    class Rank0:
        main = True

        def share(self, problem):
            shared.append(problem)
            return problem

    def bug():
        raise ValueError('a bug')
    with pytest.raises(ValueError, match='a bug'):
        on_rank_0(Rank0(), bug)
    assert shared == ['rank 0 failed while preparing --model_dir (its traceback says why)']


def test_an_unreadable_log_counts_as_a_held_run(tmp_path, monkeypatch):
    import lib.resume

    def unreadable(*args, **kwargs):                    # (root reads any file it may not)
        raise PermissionError(13, 'Permission denied')
    (tmp_path / 'log.jsonl').write_text('{"type": "start"}\n')
    monkeypatch.setattr(lib.resume, 'open', unreadable, raising=False)
    assert lib.resume.held_run(tmp_path) == ('log.jsonl', False)
    monkeypatch.undo()
    assert lib.resume.held_run(tmp_path) is None        # (readable: a start record only)
