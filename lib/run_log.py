"""A run's records: console lines, a JSON-lines file next to the checkpoints, and TensorBoard.

`model_dir/log.jsonl` gets one JSON object per epoch (`"type": "epoch"`) and per anchor
discovery (`"type": "round"`), accuracies in percent, so curves can be drawn without
TensorBoard (`python -m lib.visualize curve`). TensorBoard (tensorboardX) gets, under
`log_dir/name/`: sampled per-step losses and lr (`train/*`), per-epoch kNN top-1/top-5, UE
weight and seconds, and per round the anchor count, their consistency and a histogram of the
bank entropies. A missing tensorboardX only costs the TensorBoard part.
"""
import json
import os
import time


class RunLog:
    def __init__(self, model_dir, log_dir, name, tensorboard=True, quiet=False, enabled=True):
        self.enabled, self.quiet = enabled, quiet
        self.jsonl_path = os.path.join(model_dir, 'log.jsonl')
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

    def steps(self, first_step, samples, lr):
        """Sampled training losses: `samples` = [(step in epoch, {name: value})]."""
        if self.writer is None:
            return
        for step, losses in samples:
            for name, value in losses.items():
                self.writer.add_scalar(f'train/loss_{name}', value, first_step + step)
            self.writer.add_scalar('train/lr', lr, first_step + step)

    def epoch(self, record):
        """One epoch: round, epoch, global_epoch, lr, ue_weight, loss{}, knn_top1/5 (%), ..."""
        self._append({'type': 'epoch', **record})
        if self.writer is not None:
            step = record['global_epoch']
            self.writer.add_scalar('knn/top1', record['knn_top1'], step)
            self.writer.add_scalar('knn/top5', record['knn_top5'], step)
            self.writer.add_scalar('train/ue_weight', record['ue_weight'], step)
            self.writer.add_scalar('time/epoch_seconds', record['seconds'], step)
            for name, value in record['loss'].items():
                self.writer.add_scalar(f'epoch/loss_{name}', value, step)
            self.writer.flush()

    def round(self, record, entropy=None):
        """An anchor discovery: round, anchors, consistency (%), seconds; entropy: N tensor."""
        self._append({'type': 'round', **record})
        if self.writer is not None:
            self.writer.add_scalar('anchors/count', record['anchors'], record['round'])
            self.writer.add_scalar('anchors/consistency', record['consistency'], record['round'])
            if entropy is not None:
                self.writer.add_histogram('bank/entropy', entropy.float().cpu().numpy(),
                                          record['round'])
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
