"""A run's records: console lines, `model_dir/log.jsonl` (the one record of a run) and
TensorBoard; and the reader of `log.jsonl`, for the analysis and comparison scripts.

`log.jsonl` holds one JSON object per line, `type` saying which:
- `start`, at every start or resume: the resolved options, the training data's fingerprint,
  the git commit, the versions of Python and PyTorch, and the device;
- `round`, at each anchor discovery: anchors, consistency (%, null without labels), seconds;
- `epoch`, after each epoch: round, epoch, global_epoch, lr, ue_weight (runs with a UE loss),
  loss {name: mean}, knn_top1 / knn_top5 (%, runs with labels), best_top1, bank statistics
  (runs without labels), seconds;
- `end`, when the run finishes: best_top1 (and where), final_top1, seconds of this invocation.
Accuracies are percentages. TensorBoard (tensorboardX) gets, under `log_dir/name/`: sampled
per-step losses and lr (`train/*`), per-epoch kNN, UE weight and seconds, and per round the
anchor count, their consistency and a histogram of the bank entropies. A missing tensorboardX
only costs the TensorBoard part.
"""
import json
import os
import platform
import subprocess
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
    def __init__(self, model_dir, log_dir=None, name='', tensorboard=True, quiet=False,
                 enabled=True):
        self.enabled, self.quiet = enabled, quiet
        self.jsonl_path = os.path.join(model_dir, LOG_NAME)
        self.writer = None
        if enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                print('tensorboardX is not installed: no TensorBoard events (log.jsonl is '
                      'written all the same)')
            else:
                self.writer = SummaryWriter(os.path.join(log_dir, name))

    def line(self, text, always=False):
        """A console line (rank 0 only; under --quiet only the `always` ones)."""
        if self.enabled and (always or not self.quiet):
            print(text, flush=True)

    def _append(self, record):
        if self.enabled:
            with open(self.jsonl_path, 'a') as f:
                f.write(json.dumps({**record, 'time': time.time()}) + '\n')

    def start(self, options, fingerprint, environment_info, resumed_from=None):
        self._append({'type': 'start', 'options': options, 'fingerprint': fingerprint,
                      **environment_info, 'resumed_from': resumed_from})

    def steps(self, first_step, samples, lr):
        """Sampled training losses: `samples` = [(step in epoch, {name: value})]."""
        if self.writer is None:
            return
        for step, losses in samples:
            for name, value in losses.items():
                self.writer.add_scalar(f'train/loss_{name}', value, first_step + step)
            self.writer.add_scalar('train/lr', lr, first_step + step)

    def epoch(self, record):
        """One epoch: round, epoch, global_epoch, lr, loss{}, knn_top1/5 (%), ..."""
        self._append({'type': 'epoch', **record})
        if self.writer is not None:
            step = record['global_epoch']
            for key, tag in (('knn_top1', 'knn/top1'), ('knn_top5', 'knn/top5'),
                             ('ue_weight', 'train/ue_weight'), ('seconds', 'time/epoch_seconds')):
                if record.get(key) is not None:
                    self.writer.add_scalar(tag, record[key], step)
            for name, value in record['loss'].items():
                self.writer.add_scalar(f'epoch/loss_{name}', value, step)
            for name, value in (record.get('bank') or {}).items():
                self.writer.add_scalar(f'bank/{name}', value, step)
            self.writer.flush()

    def round(self, record, entropy=None):
        """An anchor discovery: round, anchors, consistency (%), seconds; entropy: N tensor."""
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

    def end(self, record):
        self._append({'type': 'end', **record})

    def close(self):
        if self.writer is not None:
            self.writer.close()


# ----------------------------------------------------------------------------- reading
def log_path(path):
    """A log file, or a model dir holding `log.jsonl`."""
    return os.path.join(path, LOG_NAME) if os.path.isdir(path) else path


def read_records(path):
    """Every record of a log (a file or a model dir), in order; a UserError if it is missing or
    a line is not JSON."""
    path = log_path(path)
    if not os.path.isfile(path):
        raise UserError(f'no training log at {path} (main.py writes model_dir/{LOG_NAME})')
    records = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or 'type' not in record:
                    raise ValueError('no "type"')
            except ValueError as err:
                raise UserError(f'{path} line {number} is not a log record ({err})') from None
            records.append(record)
    return records


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
