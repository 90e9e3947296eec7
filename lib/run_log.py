"""A run's records: `model_dir/log.jsonl` (the one record of a run), config.json and
TensorBoard; and the reader of `log.jsonl`, for the analysis and comparison scripts.

`log.jsonl` holds one JSON object per line, `type` saying which:
- `start`, at every start or resume: the resolved options, the training data's fingerprint,
  the git commit, the versions of Python and PyTorch, the device, and how the images were
  read (files decoded or from the image cache, seconds, processes) and where they are held;
- `round`, at each anchor discovery: anchors (of entries), consistency (%, null without
  labels), the mean (anchor, neighbour) cosine, seconds;
- `epoch`, after each epoch: round, epoch, global_epoch, lr, weights {loss name: weight this
  epoch}, loss {name: mean}, knn_top1 / knn_top5 (%, runs with labels), best_top1, bank statistics
  (runs without labels), seconds;
- `stop`, when a signal (SIGTERM, SIGHUP, Ctrl-C) stopped the run at a step: the signal, round,
  epoch and step last.t7 continues from, and the command that continues it;
- `end`, when the run finishes: best_top1 (and where), final_top1, seconds of this invocation.
Accuracies are percentages. A record is appended once the checkpoints written before it are on
disk (so no epoch is claimed that last.t7 cannot continue after), always on a line of its own;
readers skip a line cut off by a kill, with a note naming it. TensorBoard (tensorboardX) gets,
under `log_dir/name/`: sampled per-step losses and lr (`train/*`), per-epoch kNN, loss weights
and seconds, and per round the anchor count, their consistency and a histogram of the bank
entropies. A missing tensorboardX only costs the TensorBoard part.
"""
import json
import os
import platform
import subprocess
import sys
import time

from .errors import UserError

LOG_NAME = 'log.jsonl'
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def environment(device):
    """Where the numbers come from: git commit, Python, PyTorch, CUDA and the device's name."""
    import torch        # here: the log's readers (compare.py, the curve) do without it
    try:
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'],
                               cwd=ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip() != '' if commit else None
    except (OSError, subprocess.SubprocessError):
        commit = dirty = None
    name = (torch.cuda.get_device_name(device) if device.type == 'cuda'
            else f'CPU ({platform.machine()}, {os.cpu_count()} cores)')
    return dict(git_commit=commit, git_dirty=dirty, python=platform.python_version(),
                torch=torch.__version__, cuda=torch.version.cuda, device=name)


class RunLog:
    """The records of a run: log.jsonl (rank 0, `enabled`), config.json and TensorBoard events
    under `tensorboard_folder` (None: none).

    `after`: a function that calls its argument once the checkpoints submitted so far are on
    disk (`CheckpointWriter.then`), so that no record claims an epoch before last.t7 can
    continue after it; None appends at once."""

    def __init__(self, model_dir, tensorboard_folder=None, enabled=True, after=None):
        self.enabled, self.model_dir = enabled, model_dir
        self._after = after or (lambda function: function())
        self.jsonl_path = os.path.join(model_dir, LOG_NAME)
        self.tensorboard_folder, self.writer = tensorboard_folder, None
        if enabled and tensorboard_folder:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                print('tensorboardX is not installed: no TensorBoard events (log.jsonl is '
                      'written all the same)')
            else:
                self.writer = SummaryWriter(tensorboard_folder)

    def _append(self, record):
        if self.enabled:
            line = json.dumps({**record, 'time': time.time()})
            self._after(lambda: append_line(self.jsonl_path, line))

    def start(self, options, fingerprint, device, resumed_from=None, compile=None, data=None):
        """A run starts or resumes: its resolved `options` (also written to config.json), the
        training data's fingerprint, where the numbers come from (`environment`), the
        compile mode it trains with, why, the first step's check and any fallback
        (`compile`, lib/fast_path.py CompileReport.record), and how the data was read and
        where it is held (`data`, lib/build.py RunData.record)."""
        if self.enabled:
            with open(os.path.join(self.model_dir, 'config.json'), 'w') as f:
                json.dump(options, f, indent=1, sort_keys=True)
        self._append({'type': 'start', 'options': options, 'fingerprint': fingerprint,
                      **environment(device), 'resumed_from': resumed_from,
                      'compile': compile, 'data': data})

    def steps(self, first_step, samples, lr):
        """Sampled training losses: `samples` = [(step in epoch, {name: value})]."""
        if self.writer is None:
            return
        for step, losses in samples:
            for name, value in losses.items():
                self.writer.add_scalar(f'train/loss_{name}', value, first_step + step)
            self.writer.add_scalar('train/lr', lr, first_step + step)

    def epoch(self, record):
        """One epoch: round, epoch, global_epoch, lr, weights{}, loss{}, knn_top1/5 (%), ..."""
        self._append({'type': 'epoch', **record})
        if self.writer is not None:
            step = record['global_epoch']
            for key, tag in (('knn_top1', 'knn/top1'), ('knn_top5', 'knn/top5'),
                             ('seconds', 'time/epoch_seconds')):
                if record.get(key) is not None:
                    self.writer.add_scalar(tag, record[key], step)
            from .core.losses import LOSSES     # (torch: the log's readers do without)
            for name, value in record['weights'].items():
                if LOSSES[name].scheduled:      # (the others weigh 1 throughout)
                    self.writer.add_scalar(f'train/{name}_weight', value, step)
            for name, value in record['loss'].items():
                self.writer.add_scalar(f'epoch/loss_{name}', value, step)
            for name, value in (record.get('bank') or {}).items():
                self.writer.add_scalar(f'bank/{name}', value, step)
            self.writer.flush()

    def round(self, record, entropy=None):
        """An anchor discovery: round, anchors, entries, consistency (%), neighbour_similarity,
        seconds; entropy: the bank's N entropies (a histogram)."""
        self._append({'type': 'round', **record})
        if self.writer is not None:
            self.writer.add_scalar('anchors/count', record['anchors'], record['round'])
            if record.get('consistency') is not None:
                self.writer.add_scalar('anchors/consistency', record['consistency'],
                                       record['round'])
            if entropy is not None:
                self.writer.add_histogram('bank/entropy', entropy.float().cpu().numpy(),
                                          record['round'])
            self.writer.flush()

    def stop(self, signal_name, round_index, epoch, step, continue_with):
        """A stop signal ended the run at a step (last.t7 continues from it): the record of
        what the console said, for when nobody saw it (SIGHUP: the terminal had closed)."""
        self._append({'type': 'stop', 'signal': signal_name, 'round': round_index,
                      'epoch': epoch, 'step': step, 'continue_with': continue_with})

    def end(self, progress, seconds):
        """The run finished: its best (and where) and final kNN top-1 (%), and the seconds of
        this invocation."""
        percent = (lambda acc: None if acc is None else 100 * acc)    # noqa: E731
        self._append({'type': 'end', 'best_top1': percent(progress.best_acc),
                      'best_round': progress.best_round, 'best_epoch': progress.best_epoch,
                      'final_top1': percent(progress.acc), 'seconds': seconds})

    def close(self):
        if self.writer is not None:
            self.writer.close()


def epoch_record(config, method, data, progress, round_index, epoch, lr, weights, losses,
                 accuracy, world):
    """What log.jsonl keeps of an epoch: the losses the run takes (`losses`: {name: mean})
    and their `weights` ({name: weight} this epoch), the kNN accuracy (`accuracy`: top-1,
    top-5 fractions), and without labels the bank's statistics."""
    from .core.neighbourhoods import bank_statistics   # (torch: the log's readers do without)
    record = dict(round=round_index, epoch=epoch,
                  global_epoch=round_index * config.epochs + epoch, lr=lr,
                  weights=dict(weights), loss=dict(losses))
    if accuracy is not None:
        record.update(knn_top1=100 * accuracy[0], knn_top5=100 * accuracy[1],
                      best_top1=100 * progress.best_acc)
    if data.stats_rows is not None and method.bank is not None and world.main:
        record['bank'] = bank_statistics(method.bank.memory, method.bank.temperature,
                                         data.stats_rows)
        if method.anchors is not None and method.anchors.num_anchors:
            record['bank']['anchor_similarity'] = method.anchors.neighbour_similarity(
                method.bank.memory)
    return record


def append_line(path, line):
    """Append `line` and a newline to the file `path`, on a line of its own: when the file does
    not end with a newline (a run killed while appending left a cut-off record), one comes
    first, so the new record is not glued onto the fragment. UserError if it cannot."""
    try:
        with open(path, 'ab+') as f:
            end, torn = f.seek(0, os.SEEK_END), False
            if end:
                f.seek(end - 1)
                torn = f.read(1) != b'\n'
            # Append mode: the write goes to the end, wherever the read left the position.
            f.write((('\n' if torn else '') + line + '\n').encode())
    except OSError as err:
        raise UserError(f'cannot append to {path}: {err.strerror or err}') from None


# ----------------------------------------------------------------------------- reading
def log_path(path):
    """A log file, or a model dir holding `log.jsonl`."""
    return os.path.join(path, LOG_NAME) if os.path.isdir(path) else path


def read_records(path, note=None):
    """Every record of a log (a file or a model dir), in order. A line that is not a whole
    record (one cut off when a run was killed while appending it) is skipped with one note
    naming the file and line, through `note` (default: printed on stderr); a record that a
    resume appended onto such a fragment, on the same line, is kept. A UserError if the log is
    missing or holds no record at all."""
    path = log_path(path)
    if not os.path.isfile(path):
        raise UserError(f'no training log at {path} (main.py writes model_dir/{LOG_NAME})')
    with open(path, 'rb') as f:
        head = f.read(2)
    if head == b'PK' or head[:1] == b'\x80':     # a zip archive or a pickle: torch.save's
        folder = os.path.dirname(path) or '.'
        fix = (f'give the run\'s folder ({folder}), which holds its {LOG_NAME}'
               if os.path.isfile(os.path.join(folder, LOG_NAME)) else
               f'give the folder of the run (its --model_dir), which holds its {LOG_NAME}')
        raise UserError(f'{path} is a checkpoint (or another binary file), not a training log: '
                        + fix)
    note = note or (lambda text: print(text, file=sys.stderr, flush=True))
    records, torn = [], []
    with open(path, errors='replace') as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record, problem = parse_record(line)
            if record is not None:
                records.append(record)
            if problem is not None:
                torn.append((number, problem))
    if not records and torn:
        raise UserError(f'{path} holds no log records: line {torn[0][0]} is not one, nor is '
                        f'any other line (not a log of main.py?)')
    for number, problem in torn:
        note(f'note: {path} line {number} {problem}')
    return records


RECORD_START = '{"type": '      # how RunLog writes every record (json.dumps, `type` first)


def parse_record(line):
    """(record, None) for a whole record; else (None, why), or (record, why) when the line
    begins with a cut-off record and a whole one follows it."""
    try:
        return whole_record(line), None
    except ValueError:
        pass
    start = line.find(RECORD_START, 1)
    while start > 0:
        try:
            return whole_record(line[start:]), (f'begins with a cut-off record: skipped up to '
                                                f'column {start + 1}, the record after it kept')
        except ValueError:
            start = line.find(RECORD_START, start + 1)
    return None, 'is not a whole log record: skipped'


def whole_record(text):
    record = json.loads(text)
    if not isinstance(record, dict) or 'type' not in record:
        raise ValueError('no "type"')
    return record


def epoch_records(path):
    """The epoch records of a log, in training order. When global_epoch goes back (a run
    resumed from an earlier checkpoint, or a new run in the same folder), the later records
    replace the earlier ones from that epoch on."""
    kept = []
    for record in read_records(path):
        if record['type'] != 'epoch':
            continue
        try:
            record['global_epoch'] = int(record['global_epoch'])
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f'{log_path(path)}: an epoch record without a global_epoch '
                            f'({type(err).__name__})') from None
        while kept and kept[-1]['global_epoch'] >= record['global_epoch']:
            kept.pop()
        kept.append(record)
    if not kept:
        raise UserError(f'{log_path(path)} holds no epoch records')
    return kept


def last_of(records, kind):
    """The last record of type `kind`, or None."""
    found = [r for r in records if r['type'] == kind]
    return found[-1] if found else None
