"""Feeding the training step: which images, and their augmented views.

Both pipelines draw the same image order: epoch (round r, epoch e) shuffles with a seed
derived from (seed, r, e) alone, so a run resumed at any epoch sees the data a never-stopped
run would have seen, and every rank of a distributed run agrees on the global batch.

- `LoaderPipeline` (`--pipeline cpu`): the released path, torchvision transforms on PIL
  images in DataLoader workers, batches copied to the device.
- `TensorPipeline` (`--pipeline gpu`, the CUDA default): the training set as a uint8 tensor
  on the device, batches indexed there and augmented by `datasets.augment` in one batched call
  per view; when the images do not fit the memory budget (--data-memory), each batch is
  gathered from the host's mapped image cache and copied to the device instead, to the same
  result. It also runs on CPU tensors (tests, gloo runs).
Each yields `(views, indexes)`: views V*B x 3 x H x W float32 normalised, view-major
(all first views, then all second views), indexes B long, both on the training device.
"""
import numpy as np
import torch
from PIL import Image

from datasets import AugmentedViews, Plain, fit_square, test_transform, train_transform

from .stopping import ignore_interrupts

TEST_BATCH_SIZE = 100           # evaluation batch, as released (no effect on the result)
EVAL_BATCH_GPU = 1000           # evaluation batch of the GPU pipeline (fewer launches)


def epoch_seed(seed, round_index, epoch):
    """A 63-bit seed for one epoch, a pure function of (seed, round, epoch)."""
    return int(np.random.SeedSequence([seed, round_index, epoch]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


def epoch_order(num_images, batch_size, seed, round_index, epoch):
    """steps x B dataset indexes of one epoch: a seeded shuffle, incomplete last batch dropped."""
    generator = torch.Generator().manual_seed(epoch_seed(seed, round_index, epoch))
    order = torch.randperm(num_images, generator=generator)
    steps = num_images // batch_size
    return order[:steps * batch_size].view(steps, batch_size)


def rank_slice(batch_size, rank, world_size):
    """This rank's share of every global batch of `batch_size` images."""
    local = batch_size // world_size
    return slice(rank * local, (rank + 1) * local)


class LoaderPipeline:
    def __init__(self, train_set, test_set, mean, std, image_size, views, batch_size,
                 workers, device, seed, flip=True, color=True, rank=0, world_size=1):
        self.train_set, self.test_set = train_set, test_set
        self.views, self.batch_size, self.workers = views, batch_size, workers
        self.share = rank_slice(batch_size, rank, world_size)
        self.device, self.seed = torch.device(device), seed
        self.augmented = AugmentedViews(train_set, train_transform(mean, std, image_size, flip,
                                                                   color), views)
        self.num_test = len(test_set) if test_set is not None else 0
        self.eval_transform = test_transform(mean, std, image_size)
        self.eval_batch = TEST_BATCH_SIZE

    @property
    def steps_per_epoch(self):
        return len(self.train_set) // self.batch_size

    def _loader(self, dataset, batch_sampler=None):
        batching = (dict(batch_sampler=batch_sampler) if batch_sampler is not None
                    else dict(batch_size=self.eval_batch, shuffle=False))
        return torch.utils.data.DataLoader(dataset, num_workers=self.workers,
                                           pin_memory=self.device.type == 'cuda',
                                           worker_init_fn=ignore_interrupts, **batching)

    def train_batches(self, round_index, epoch, start_step=0):
        order = epoch_order(len(self.train_set), self.batch_size, self.seed, round_index, epoch)
        # Every image's augmentation is seeded from (epoch seed, index): the same views whichever
        # loader process makes them and wherever in the epoch a resumed run starts.
        self.augmented.set_epoch(epoch_seed(self.seed, round_index, epoch))
        loader = self._loader(self.augmented, order[start_step:, self.share].tolist())
        for batch in loader:
            # Each pinned view is copied on its own (asynchronously), then joined on the device.
            views = torch.cat([view.to(self.device, non_blocking=True)
                               for view in batch[:self.views]])
            yield views, batch[-1].to(self.device, non_blocking=True)

    def eval_batches(self, split='test', shard=None):
        """(images, targets) of a split through the test transform, in dataset order; only
        the images [start, stop) with `shard`."""
        image_set = self.test_set if split == 'test' else self.train_set
        dataset = Plain(image_set, self.eval_transform)
        if shard is not None:
            dataset = torch.utils.data.Subset(dataset, range(*shard))
        for images, targets, _ in self._loader(dataset):
            yield images.to(self.device, non_blocking=True), targets.to(self.device)


class TensorPipeline:
    """The training set as one uint8 tensor on the device, augmented there in batches; or,
    when the images take more than `memory_budget` bytes, each batch gathered on the host
    (from the image cache's mapped files, a thread one batch ahead), copied to the device
    (pinned, asynchronously) and augmented there. Both give the same batches."""

    def __init__(self, train_set, test_set, mean, std, image_size, views, batch_size,
                 device, seed, flip=True, color=True, wrap_augment=None, rank=0,
                 world_size=1, memory_budget=None):
        from datasets.augment import NUM_UNIFORMS, BatchAugment
        self.device, self.seed = torch.device(device), seed
        self.views, self.batch_size = views, batch_size
        self.share = rank_slice(batch_size, rank, world_size)
        self.train_set, self.test_set, self.image_size = train_set, test_set, image_size
        self.num_train = len(train_set)
        self.num_test = len(test_set) if test_set is not None else 0
        stored = train_set.images.shape[1:3]
        # What the device holds: the training and test images, and when the training images
        # are kept larger than the crops (folder data), their copy at the test size for the
        # evaluations that embed them (train_eval_images).
        self.data_bytes = train_set.images.nbytes + (test_set.images.nbytes
                                                     if test_set is not None else 0) + \
            (len(train_set) * 3 * image_size ** 2 if stored != (image_size, image_size) else 0)
        self.memory_budget = memory_budget
        self.resident = memory_budget is None or self.data_bytes <= memory_budget
        self.train_targets = torch.from_numpy(train_set.targets).to(self.device)
        if test_set is not None:
            self.test_targets = torch.from_numpy(test_set.targets).to(self.device)
        if self.resident:
            self.train_images = self._to_device(train_set.images)    # N x 3 x H x W uint8
            if test_set is not None:
                self.test_images = self._to_device(test_set.images)
        self._train_eval_images = None
        self.num_uniforms = NUM_UNIFORMS
        augment = BatchAugment(image_size, mean, std, flip=flip, color=color).to(self.device)
        # What augments: `augment`, or what `wrap_augment` makes of it (lib/build.py: compiled)
        self.augment = wrap_augment(augment) if wrap_augment else augment
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        # Evaluation batches only bound memory (eval-mode BN): larger is faster on a GPU.
        self.eval_batch = EVAL_BATCH_GPU if self.device.type == 'cuda' else TEST_BATCH_SIZE

    def _to_device(self, images, fitted=False):
        """N x 3 x H x W uint8 on the device of N x H x W x 3 host images (an array or
        ImageRows), copied a chunk at a time: the host never holds a second copy. `fitted`:
        as the test transform sees them, image_size square (see train_eval_images)."""
        from datasets.image_rows import chunks
        shape = (self.image_size, self.image_size) if fitted else images.shape[1:3]
        out = torch.empty((len(images), 3, *shape), dtype=torch.uint8, device=self.device)
        for start, chunk in chunks(images):
            out[start:start + len(chunk)] = self._upload(self._fitted(chunk) if fitted
                                                         else chunk)
        return out

    def _upload(self, rows):
        """B x 3 x H x W uint8 on the device of B x H x W x 3 host rows (pinned on CUDA, so
        the copy is asynchronous)."""
        batch = torch.from_numpy(np.ascontiguousarray(rows))
        if self.device.type == 'cuda':
            batch = batch.pin_memory()
        return batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()

    def _fitted(self, rows):
        """Training images as the test transform sees them (see train_eval_images)."""
        if rows.shape[1:3] == (self.image_size, self.image_size):
            return rows
        return np.stack([np.asarray(fit_square(Image.fromarray(image), self.image_size))
                         for image in rows])

    @property
    def train_eval_images(self):
        """The training images as the test transform sees them: resized (shorter side) and
        centre-cropped to image_size by PIL, once, as the cpu pipeline does per image. Folder
        data keeps training images 8/7 larger to crop from; evaluated at that size they would
        give other embeddings than on the cpu pipeline."""
        if self._train_eval_images is None:
            stored = self.train_set.images
            if stored.shape[1:3] == (self.image_size, self.image_size):
                self._train_eval_images = self.train_images
            else:
                self._train_eval_images = self._to_device(stored, fitted=True)
        return self._train_eval_images

    @property
    def steps_per_epoch(self):
        return self.num_train // self.batch_size

    def epoch_uniforms(self, round_index, epoch):
        """All random numbers of an epoch in one draw: steps x views x B x NUM_UNIFORMS (the
        global batch: every rank draws the same and takes its share)."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(epoch_seed(self.seed, round_index, epoch) ^ 0x5A17)
        shape = (self.steps_per_epoch, self.views, self.batch_size, self.num_uniforms)
        return torch.rand(shape, generator=generator, device=self.device)

    def train_batches(self, round_index, epoch, start_step=0):
        order = epoch_order(self.num_train, self.batch_size, self.seed, round_index, epoch)
        shares = order[:, self.share]
        order = shares.to(self.device)
        uniforms = self.epoch_uniforms(round_index, epoch)
        steps = range(start_step, order.shape[0])
        images = (self.train_images[order[step]] for step in steps) if self.resident else \
            self._streamed(shares, steps)
        for step, batch in zip(steps, images):
            views = torch.cat([self.augment(batch, uniforms[step, v, self.share])
                               for v in range(self.views)])
            yield views, order[step]

    def _streamed(self, shares, steps):
        """The device batches of `shares[step]` for each step, each gathered on the host by a
        thread while the one before trains."""
        from concurrent.futures import ThreadPoolExecutor
        rows = self.train_set.images
        with ThreadPoolExecutor(1, thread_name_prefix='batch-gather') as gather:
            ahead = None
            for step in steps:
                current = ahead or gather.submit(rows.__getitem__, shares[step].numpy())
                if step + 1 < steps.stop:
                    ahead = gather.submit(rows.__getitem__, shares[step + 1].numpy())
                yield self._upload(current.result())

    def eval_batches(self, split='test', shard=None):
        """(images, targets) of a split through the test transform, normalised; only the
        images [start, stop) with `shard`."""
        targets = self.test_targets if split == 'test' else self.train_targets
        start, stop = shard if shard is not None else (0, len(targets))
        for first in range(start, stop, self.eval_batch):
            last = min(first + self.eval_batch, stop)
            if self.resident:
                images = self.test_images if split == 'test' else self.train_eval_images
                batch = images[first:last]
            elif split == 'test':
                batch = self._upload(self.test_set.images[first:last])
            else:
                batch = self._upload(self._fitted(self.train_set.images[first:last]))
            yield (batch.float().div_(255) - self.mean) / self.std, targets[first:last]
