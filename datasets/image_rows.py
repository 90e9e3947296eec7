"""Images read on demand: N x H x W x 3 uint8 rows kept in memory-mapped files (the packs of
the decoded-image cache, STL-10's binary arrays) instead of in the process's memory.

A data set larger than memory is then read through the page cache: the process holds only
the rows it is working on, and its private memory (RssAnon) does not grow with the data.
`ImageRows` answers the indexing that the pipelines, the statistics and the figures use on
an array (`rows[i]`, `rows[a:b]`, `rows[index_array]`, `len`, `shape`); every answer is a new
C-contiguous array. The helpers below (`chunks`, `pixel_digest`, `channel_statistics`) work
the same on a plain numpy array, chunk by chunk, so that their memory is bounded too.
"""
import hashlib

import numpy as np

CHUNK_BYTES = 64 << 20          # rows per chunk of the statistics: about 64 MB of pixels


class MappedArray:
    """A uint8 array in a file, mapped on first use (in each process: a DataLoader worker
    started by spawn gets the file's name, not its bytes): `count` rows of `row_shape` at
    `offset`, stored in `order` and read back as H x W x 3 (`order`, a permutation of the
    row axes, as numpy's transpose takes it; None: stored as H x W x 3)."""

    def __init__(self, path, count, row_shape, offset=0, order=None):
        self.path, self.count, self.offset = path, int(count), int(offset)
        self.row_shape, self.order = tuple(int(v) for v in row_shape), order
        self._array = None

    @property
    def array(self):
        if self._array is None:
            stored = np.memmap(self.path, dtype=np.uint8, mode='r', offset=self.offset,
                               shape=(self.count, *self.row_shape))
            self._array = stored if self.order is None else \
                stored.transpose(0, *(axis + 1 for axis in self.order))
        return self._array

    @property
    def shape(self):
        return self.array.shape

    def __getstate__(self):
        return {**self.__dict__, '_array': None}


def _block_array(block):
    return block.array if isinstance(block, MappedArray) else block


class ImageRows:
    """N images, row i being `blocks[block_of[i]][row_of[i]]`; blocks are MappedArrays or
    arrays (K x H x W x 3 uint8, all of one H x W)."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, blocks, block_of, row_of):
        self.blocks = list(blocks)
        self.block_of = np.asarray(block_of, dtype=np.int64)
        self.row_of = np.asarray(row_of, dtype=np.int64)
        if self.block_of.shape != self.row_of.shape or self.block_of.ndim != 1:
            raise ValueError('block_of and row_of must be vectors of one length')
        shapes = {tuple(_block_array(b).shape[1:]) for b in self.blocks}
        if len(shapes) > 1:
            raise ValueError(f'blocks of different image shapes: {sorted(shapes)}')
        self.image_shape = shapes.pop() if shapes else (0, 0, 3)

    @classmethod
    def of_block(cls, block):
        """Every row of one block, in order."""
        count = _block_array(block).shape[0]
        return cls([block], np.zeros(count, np.int64), np.arange(count))

    def __len__(self):
        return len(self.row_of)

    @property
    def shape(self):
        return (len(self), *self.image_shape)

    @property
    def nbytes(self):
        return len(self) * int(np.prod(self.image_shape))

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            index = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= index < len(self):
                raise IndexError(f'row {key} of {len(self)}')
            return np.array(_block_array(self.blocks[self.block_of[index]])[self.row_of[index]])
        if isinstance(key, slice):
            return self._gather(np.arange(len(self))[key])
        return self._gather(np.arange(len(self))[np.asarray(key)])

    def _gather(self, positions):
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        out = np.empty((len(positions), *self.image_shape), dtype=np.uint8)
        if not len(positions):
            return out
        blocks, rows = self.block_of[positions], self.row_of[positions]
        for block in np.unique(blocks):
            where = np.flatnonzero(blocks == block)
            wanted = rows[where]
            array = _block_array(self.blocks[block])
            if wanted[-1] - wanted[0] == len(wanted) - 1 and np.all(np.diff(wanted) == 1):
                out[where] = array[wanted[0]:wanted[-1] + 1]        # one run: a slice
            else:
                out[where] = array[wanted]
        return out

    def select(self, indices):
        """The ImageRows of rows `indices`, in that order (nothing is read)."""
        indices = np.asarray(indices, dtype=np.int64)
        return ImageRows(self.blocks, self.block_of[indices], self.row_of[indices])

    def __array__(self, dtype=None, copy=None):
        everything = self[:]
        return everything if dtype is None else everything.astype(dtype)

    def __repr__(self):
        return f'ImageRows({len(self)} x {self.image_shape}, {len(self.blocks)} blocks)'


def concatenate(parts):
    """One ImageRows of several (ImageRows or arrays), in order."""
    blocks, block_of, row_of = [], [], []
    for part in parts:
        if not isinstance(part, ImageRows):
            part = ImageRows.of_block(part)
        block_of.append(part.block_of + len(blocks))
        row_of.append(part.row_of)
        blocks += part.blocks
    return ImageRows(blocks, np.concatenate(block_of) if block_of else [],
                     np.concatenate(row_of) if row_of else [])


def take(images, indices):
    """`images[indices]` that stays on disk for ImageRows (an array is indexed as numpy does)."""
    return images.select(indices) if isinstance(images, ImageRows) else images[indices]


def chunks(images, chunk_bytes=None):
    """(start, array) of consecutive rows of `images` (an array or ImageRows), about
    `chunk_bytes` (default CHUNK_BYTES) at a time."""
    per_image = max(1, int(np.prod(images.shape[1:])))
    step = max(1, (chunk_bytes or CHUNK_BYTES) // per_image)
    for start in range(0, len(images), step):
        yield start, np.asarray(images[start:start + step])


def pixel_digest(images):
    """SHA-1 of the rows' bytes in order, read chunk by chunk: the same digest as
    `hashlib.sha1(np.ascontiguousarray(images).tobytes())`, without holding the array."""
    digest = hashlib.sha1()
    for _, chunk in chunks(images):
        digest.update(np.ascontiguousarray(chunk).data)
    return digest


def channel_statistics(images):
    """(mean, std) per channel of `images` (N x H x W x 3 uint8), as fractions of 255, in the
    convention of the released CIFAR constants: the mean over every pixel, and the std the
    mean over images of each image's own per-channel standard deviation. Read chunk by chunk.

    The mean is the exact integer sum divided once (the whole-array float64 mean it replaces
    agrees to about 1e-16); each image's std is numpy's float64 std of that image, as before."""
    count = len(images)
    if count == 0:
        raise ValueError('channel_statistics of no images')
    sums = np.zeros(3, dtype=np.int64)
    stds = np.empty((count, 3), dtype=np.float64)
    for start, chunk in chunks(images):
        sums += chunk.reshape(-1, 3).sum(axis=0, dtype=np.int64)
        pixels = chunk.reshape(len(chunk), -1, 3).astype(np.float64) / 255.0
        stds[start:start + len(chunk)] = pixels.std(axis=1)
    pixels_per_channel = count * int(np.prod(images.shape[1:3]))
    return sums / pixels_per_channel / 255.0, stds.mean(axis=0)
