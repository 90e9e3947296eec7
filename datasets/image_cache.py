"""The decoded-image cache: what `datasets.images` made of each image file, kept on disk, so
that the next start (a new run, a resume, an evaluation, an embedding) maps it instead of
decoding every file again.

What a cached image is keyed by: the SHA-1 of the file's bytes, the size it was decoded to
(`rule`: 'stored', kept at its own size, or '<S>px', fitted to an S x S square), and the
reader: READER_VERSION with the versions of Pillow, its codecs and torchvision (a release that
decodes a JPEG one level differently is another reader). What is read from the cache is
therefore what a fresh decode of that file gives.

Layout under the cache folder (default `$XDG_CACHE_HOME/super-and`, else
`~/.cache/super-and`; `rm -r` it to reclaim the space whenever no run is reading from it: a
run maps the packs, and its loader workers may open them again):

    images-r<READER_VERSION>-<reader hash>/
        files.npz           the file index: (device, inode) -> path, size, mtime, ctime,
                            SHA-1 and header size; a file whose path, size, mtime and ctime
                            are unchanged is not read again (any write changes its ctime)
        lock                held while the file index is merged or dead files are removed
        fill-NN.lock        held by the process reading one list of files; another process
                            that reads the same list waits for it (torchrun ranks), then
                            finds what it wrote
        <rule>/<id>.pack    rows of H x W x 3 uint8 back to back, never changed once written
        <rule>/<id>.json    its manifest: the rows' SHA-1s, the shape, a CRC-32 of the pack,
                            the pack's inode and times, the notes each image gave, and the
                            files that could not be read (with why)
        <kind>/<key>.json   small results kept with the images: the channel mean and
                            std of a list of images, the pixel digest of a binary file

Why it is never read wrong:
- Packs and manifests are written under temporary names, flushed to disk (fsync) and renamed
  into place, the manifest last: a process killed at any point (SIGKILL mid-write) leaves
  only a temporary file, which no reader opens and a later writer removes.
- A manifest is used only if it parses, names this format and reader, and its pack has the
  size it says. A pack whose inode, size or times differ from what its writer recorded (a
  copied or replaced file) is read whole and used only if its CRC-32 matches. Anything else
  in the folder (a truncated pack, a foreign file) is ignored, removed by the next writer, and
  its images are decoded again.
- Two processes never write the same file: each pack has a name of its own; the file index is
  merged under the lock.
A cache folder that cannot be written is read for what it holds and otherwise left alone;
when a write fails (read-only, full) the run is told once and goes on without it.
"""
import errno
import hashlib
import importlib.metadata
import json
import os
import resource
import time
import zlib
from contextlib import contextmanager

import numpy as np

from .image_rows import ImageRows, MappedArray
from .images import READER_VERSION, shown

FORMAT = 'super-and-image-pack'
FORMAT_VERSION = 1
INDEX_VERSION = 2               # of files.npz (2: each entry keeps its path's digest)
SEGMENT_BYTES = 256 << 20       # a pack is written when its rows reach this size ...
SEGMENT_SECONDS = 30            # ... or this long after the last one: a kill loses no more
STALE_SECONDS = 3600            # temporary files older than this belong to dead writers
# A file whose mtime or ctime is this close to the moment it was looked at may still be being
# written within one tick of the file system's clock: it is not put in the file index (it is
# read again next time), as git does with its "racily clean" entries.
RACY_SECONDS = 2
FILL_SLOTS = 64                  # fill-NN.lock files: lists that share one wait for each other


def default_folder():
    """$XDG_CACHE_HOME/super-and, or ~/.cache/super-and (XDG_CACHE_HOME is used only when it is
    an absolute path, as the XDG base-directory specification says)."""
    base = os.environ.get('XDG_CACHE_HOME', '')
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'super-and')


def reader_id():
    """'r2-1a2b3c4d': READER_VERSION and a hash of the versions of the code that decodes."""
    from PIL import Image, __version__ as pillow, features
    # (the decompression-bomb limit decides which images are refused)
    parts = [f'pillow={pillow}', f'max_pixels={Image.MAX_IMAGE_PIXELS}']
    for name in ('jpg', 'zlib', 'libtiff', 'webp', 'libjpeg_turbo', 'avif'):
        try:
            parts.append(f'{name}={features.version(name)}')
        except (ValueError, KeyError):      # a name this Pillow does not know
            pass
    try:
        parts.append(f'torchvision={importlib.metadata.version("torchvision")}')
    except importlib.metadata.PackageNotFoundError:
        pass
    return f'r{READER_VERSION}-' + hashlib.sha1(' '.join(parts).encode()).hexdigest()[:8]


def size_rule(size):
    """The folder of images decoded to `size` (None: kept at their stored size)."""
    return 'stored' if size is None else f'{int(size)}px'


def _fsync_folder(folder):
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _write_atomically(path, write):
    """`write(file)` into a temporary file beside `path`, flushed to disk, renamed to `path`."""
    folder = os.path.dirname(path)
    temporary = os.path.join(folder, f'.tmp-{os.getpid()}-{os.urandom(6).hex()}'
                                     f'{os.path.splitext(path)[1]}')
    try:
        with open(temporary, 'xb') as f:
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.remove(temporary)
        except OSError:
            pass
        raise
    return result


def _stat_record(info):
    return [int(info.st_ino), int(info.st_size), int(info.st_mtime_ns), int(info.st_ctime_ns)]


def _crc_of_file(path):
    crc = 0
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(8 << 20), b''):
            crc = zlib.crc32(block, crc)
    return crc


def _allow_open_files(count):
    """Raise the soft limit of open files towards `count` (+ a margin): each mapped pack keeps a
    file descriptor, and 1,024 is a common default."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = count + 256
        if soft != resource.RLIM_INFINITY and soft < wanted:
            limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    except (ValueError, OSError):
        pass


# The descriptors of the locks this process holds: a forked decoding worker closes its copies,
# so that a worker outliving this process (killed) cannot keep a lock held.
HELD_LOCKS = set()


# ----------------------------------------------------------------------------- the packs
class Packs:
    """The packs of one rule: every cached image's place (block, row), its notes, and the
    files known to be unreadable. Blocks are MappedArrays of the packs, and in-memory arrays
    for rows whose pack could not be written."""

    def __init__(self, cache, rule):
        self.cache, self.rule = cache, rule
        self.folder = os.path.join(cache.folder, rule)
        self.blocks, self.shapes = [], []
        self.where = {}              # SHA-1 -> (block, row)
        self.notes = {}              # (block, row) -> [(kind, detail), ...]
        self.unreadable = {}         # SHA-1 -> (reason, [(kind, detail), ...])
        self._seen = set()           # manifest names read and used
        self._refused = {}           # manifest name -> why it is not used (removed on repair)

    def scan(self, repair=False):
        """Read the manifests not read yet; with `repair` (the writer's lock held), remove
        what is damaged or foreign (found now or by an earlier scan), and the temporary files
        of dead writers. A manifest that could not be read for a passing reason (too many
        open files, say) is neither used nor removed: it is read again next time."""
        try:
            names = sorted(os.listdir(self.folder))
        except OSError:
            return
        now = time.time()
        for name in names:
            path = os.path.join(self.folder, name)
            if name.startswith('.tmp-') or (name.endswith('.pack') and
                                            name[:-5] + '.json' not in names):
                if repair and self._older_than(path, now, STALE_SECONDS):
                    self._remove(path)
                continue
            if not name.endswith('.json'):
                if not name.endswith('.pack'):
                    self._refuse(path, repair, 'a file that is not the cache\'s')
                continue
            if name in self._refused:
                self._refuse(path, repair, self._refused[name])
                continue
            if name in self._seen:
                continue
            problem, lasting = self._load(path)
            if problem is None:
                self._seen.add(name)
            elif lasting:
                self._refused[name] = problem
                self._refuse(path, repair, problem)
        _allow_open_files(len(self.blocks))

    @staticmethod
    def _older_than(path, now, seconds):
        try:
            return now - os.stat(path).st_mtime > seconds
        except OSError:
            return False

    def _refuse(self, path, repair, problem):
        self.cache.said_once('damaged', f'note: the image cache {shown(self.cache.root)} holds '
                                        f'a file it cannot use ({shown(os.path.basename(path))}: '
                                        f'{problem}): its images are decoded again')
        if repair:
            self._refused.pop(os.path.basename(path), None)
            self._remove(path)
            if path.endswith('.json'):
                self._remove(path[:-5] + '.pack')

    @staticmethod
    def _remove(path):
        try:
            os.remove(path)
        except OSError:
            pass

    def _load(self, manifest_path):
        """Add the pack of a manifest: (None, None), or (a phrase saying what is wrong with
        it, whether that lasts: False for a failure to read that may pass)."""
        try:
            with open(manifest_path, 'rb') as f:
                text = f.read()
        except OSError as err:
            return f'not readable now ({err.strerror or err})', False
        try:
            manifest = json.loads(text)
            if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
                return 'not a manifest of this cache', True
            if manifest.get('version') != FORMAT_VERSION or \
                    manifest.get('reader') != self.cache.reader or \
                    manifest.get('rule') != self.rule:
                return 'written by another version', True
            rows, shape = int(manifest['rows']), tuple(int(v) for v in manifest['shape'])
            keys = bytes.fromhex(manifest['keys'])
            unreadable = manifest.get('unreadable', {})
            notes = manifest.get('notes', {})
            if len(shape) != 3 or shape[2] != 3 or min(shape) < 1 or len(keys) != 20 * rows:
                return 'a manifest that does not add up', True
        except (ValueError, KeyError, TypeError):
            return 'not a manifest of this cache', True
        if rows:
            pack = manifest_path[:-5] + '.pack'
            try:
                info = os.stat(pack)
            except FileNotFoundError:
                return 'its pack is missing', True
            except OSError as err:
                return f'its pack is not readable now ({err.strerror or err})', False
            if info.st_size != rows * int(np.prod(shape)):
                return 'a truncated pack', True
            if _stat_record(info) != manifest.get('stat'):
                # Not the very file its writer renamed into place (a copy, a replacement):
                # read it whole and use it only if its checksum is right.
                try:
                    if _crc_of_file(pack) != manifest.get('crc32'):
                        return 'a pack whose checksum is wrong', True
                except OSError as err:
                    return f'its pack is not readable now ({err.strerror or err})', False
            block = len(self.blocks)
            self.blocks.append(MappedArray(pack, rows, shape))
            self.shapes.append(shape)
            for row in range(rows):
                self.where.setdefault(keys[20 * row:20 * row + 20], (block, row))
            for row, found in notes.items():
                self.notes[(block, int(row))] = [tuple(note) for note in found]
        for key, (reason, found) in unreadable.items():
            self.unreadable.setdefault(bytes.fromhex(key), (reason, [tuple(n) for n in found]))
        return None, None

    def add_memory_block(self, keys, arrays, notes):
        """Rows that could not be written: held in memory, found as the cached ones are."""
        if not keys:
            return
        block = len(self.blocks)
        self.blocks.append(np.stack(arrays))
        self.shapes.append(arrays[0].shape)
        for row, (key, found) in enumerate(zip(keys, notes)):
            self.where.setdefault(key, (block, row))
            if found:
                self.notes[(block, row)] = found

    def lookup(self, key):
        """('image', (block, row), notes), ('unreadable', reason, notes) or None."""
        if key in self.where:
            place = self.where[key]
            return 'image', place, self.notes.get(place, [])
        if key in self.unreadable:
            reason, found = self.unreadable[key]
            return 'unreadable', reason, found
        return None

    def shape_of(self, place):
        return self.shapes[place[0]]

    def image(self, place):
        block = self.blocks[place[0]]
        array = block.array if isinstance(block, MappedArray) else block
        return np.array(array[place[1]])

    def rows(self, places):
        """The ImageRows of `places` [(block, row)], all of one shape."""
        used = sorted({block for block, _ in places})
        renumber = {block: i for i, block in enumerate(used)}
        return ImageRows([self.blocks[b] for b in used],
                         [renumber[block] for block, _ in places], [row for _, row in places])


class PackWriter:
    """Decoded images of one rule collected in memory and written as packs of about
    SEGMENT_BYTES (or every SEGMENT_SECONDS); `close` writes the rest. A failed write turns
    the cache read-only for the run (one note) and keeps the rows in memory."""

    def __init__(self, packs):
        self.packs = packs
        self._reset()
        self.started = time.time()

    def _reset(self):
        self.keys, self.arrays, self.notes, self.bytes = [], [], [], 0
        self.unreadable = {}
        self.started = time.time()

    def add(self, key, array, notes):
        if self.arrays and array.shape != self.arrays[0].shape:
            self.flush()                     # a pack holds images of one shape
        self.keys.append(key)
        self.arrays.append(array)
        self.notes.append(list(notes))
        self.bytes += array.nbytes
        self._maybe_flush()

    def add_unreadable(self, key, reason, notes):
        self.unreadable[key.hex()] = [reason, [list(note) for note in notes]]
        self._maybe_flush()

    def _maybe_flush(self):
        if self.bytes >= SEGMENT_BYTES or time.time() - self.started >= SEGMENT_SECONDS:
            self.flush()

    def flush(self):
        if not self.keys and not self.unreadable:
            return
        cache = self.packs.cache
        if cache.writable:
            try:
                self._write()
            except OSError as err:
                cache.write_failed(err)
        if not cache.writable:
            self.packs.add_memory_block(self.keys, self.arrays, self.notes)
            for key, (reason, found) in self.unreadable.items():
                self.packs.unreadable.setdefault(bytes.fromhex(key),
                                                 (reason, [tuple(n) for n in found]))
        self._reset()

    def close(self):
        self.flush()

    def _write(self):
        os.makedirs(self.packs.folder, exist_ok=True)
        name = f'{time.time_ns():x}-{os.getpid()}-{os.urandom(4).hex()}'
        pack = os.path.join(self.packs.folder, name + '.pack')
        crc, stat = 0, None
        if self.arrays:
            def write_rows(f):
                total = 0
                for array in self.arrays:
                    data = np.ascontiguousarray(array).data
                    f.write(data)
                    total = zlib.crc32(data, total)
                return total
            crc = _write_atomically(pack, write_rows)
            stat = _stat_record(os.stat(pack))
        manifest = dict(format=FORMAT, version=FORMAT_VERSION, reader=self.packs.cache.reader,
                        rule=self.packs.rule, rows=len(self.keys),
                        shape=list(self.arrays[0].shape) if self.arrays else [1, 1, 3],
                        crc32=crc, stat=stat, keys=b''.join(self.keys).hex(),
                        notes={str(row): found for row, found in enumerate(self.notes)
                               if found},
                        unreadable=self.unreadable)
        _write_atomically(os.path.join(self.packs.folder, name + '.json'),
                          lambda f: f.write(json.dumps(manifest).encode()))
        _fsync_folder(self.packs.folder)
        self.packs.scan()


# ----------------------------------------------------------------------------- the cache
class ImageCache:
    """The cache in folder `root` (see the module's docstring). `notes` collects the lines to
    say (a folder that cannot be written, a damaged file found, a wait for another process),
    each once."""

    def __init__(self, root=None):
        self.root = os.path.abspath(root or default_folder())
        self.reader = reader_id()
        self.folder = os.path.join(self.root, f'images-{self.reader}')
        self.notes, self._said = [], set()
        self.writable = True
        self._packs = {}
        self._files = None           # (device, inode) -> (size, mtime, ctime, sha1, w, h)
        self._new_files = {}
        try:
            os.makedirs(self.folder, exist_ok=True)
            probe = os.path.join(self.folder, 'lock')
            with open(probe, 'ab'):
                pass
        except OSError as err:
            self.write_failed(err)

    # --------------------------------------------------------------- what is said
    def said_once(self, kind, line):
        if kind not in self._said:
            self._said.add(kind)
            self.notes.append(line)

    def take_notes(self):
        found, self.notes = self.notes, []
        return found

    def write_failed(self, err):
        """The cache becomes read-only for this process, said once."""
        self.writable = False
        reason = err.strerror or str(err) if isinstance(err, OSError) else str(err)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            reason = 'the disk is full'
        self.said_once('unwritable', f'note: the image cache {shown(self.root)} cannot be '
                                     f'written ({reason}): images not in it are decoded and '
                                     f'held in memory for this run (--cache-dir DIR for '
                                     f'another place, --no-cache to go without)')

    # --------------------------------------------------------------- locks
    @contextmanager
    def _locked(self, name, waiting=None):
        """An exclusive flock on `name` in the cache folder: yields 'held', 'waited' (held after
        another process let it go; `waiting()` was called when the wait began) or None (it
        cannot be taken: the cache is then not written)."""
        if not self.writable:
            yield None
            return
        import fcntl
        try:
            descriptor = os.open(os.path.join(self.folder, name), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            self.write_failed(err)
            yield None
            return
        HELD_LOCKS.add(descriptor)
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                state = 'held'
            except BlockingIOError:
                if waiting:
                    waiting()
                fcntl.flock(descriptor, fcntl.LOCK_EX)
                state = 'waited'
            yield state
        finally:
            HELD_LOCKS.discard(descriptor)
            os.close(descriptor)             # releases the lock

    @contextmanager
    def filling(self, rule, paths, waiting=None):
        """Held while this process reads `paths` for `rule` (FILL_SLOTS lock files, chosen by a
        hash of the list): a process that reads the same list waits here (`waiting()` is called
        once), then finds the images in the packs and the file index, both read again once
        the lock is held. Yields (packs, whether it waited). Lock files are never removed (a
        removed one could be held by two processes at once)."""
        label = hashlib.sha1(rule.encode() + b'\0'.join(os.fsencode(os.path.abspath(p))
                                                         for p in paths)).digest()
        with self._locked(f'fill-{label[0] % FILL_SLOTS:02d}.lock', waiting) as held:
            if held == 'waited':
                self._files = None              # what the other process added meanwhile
            packs = self.packs(rule)
            if held:
                with self._locked('lock'):
                    packs.scan(repair=True)
            yield packs, held == 'waited'

    # --------------------------------------------------------------- packs
    def packs(self, rule):
        """The Packs of `rule`, read up to now."""
        if rule not in self._packs:
            self._packs[rule] = Packs(self, rule)
        packs = self._packs[rule]
        packs.scan()
        return packs

    # --------------------------------------------------------------- the file index
    def _load_files(self):
        found = {}
        path = os.path.join(self.folder, 'files.npz')
        try:
            # (our own file object: np.load leaves the one it opens open when the zip is bad)
            with open(path, 'rb') as f, np.load(f, allow_pickle=False) as data:
                if int(data['version']) != INDEX_VERSION:
                    raise ValueError('another version')
                ident, check = data['ident'], data['check']
                digest, header, where = data['digest'], data['header'], data['path']
            for i in range(len(ident)):
                found[(int(ident[i, 0]), int(ident[i, 1]))] = (
                    *(int(v) for v in check[i]), bytes(digest[i]), int(header[i, 0]),
                    int(header[i, 1]), bytes(where[i]))
        except OSError:             # none yet, or a cache folder that could not be made
            pass
        except Exception:           # a damaged or foreign files.npz: rebuilt from scratch
            self.said_once('damaged-index', f'note: the file index of the image cache '
                                            f'{shown(self.root)} is damaged: files are read '
                                            f'again to identify them')
        return found

    @staticmethod
    def _path_key(path):
        """8 bytes of the SHA-1 of `path` made whole: an index entry is the file's at that
        path only (file systems that number inodes as they meet files reuse numbers)."""
        return hashlib.sha1(os.fsencode(os.path.abspath(path))).digest()[:8]

    def identify(self, path):
        """(stat, known) of the file at `path`: `known` = (SHA-1, (width, height)) when the file
        index holds the file unchanged (the same device, inode, path, size, mtime and ctime),
        else None. Raises OSError when it cannot be stat'ed."""
        info = os.stat(path)
        if self._files is None:
            self._files = self._load_files()
        entry = self._files.get((info.st_dev, info.st_ino))
        if entry is not None and entry[:3] == (info.st_size, info.st_mtime_ns,
                                              info.st_ctime_ns) \
                and entry[6] == self._path_key(path):
            return info, (entry[3], (entry[4], entry[5]))
        return info, None

    def remember(self, path, info, digest, header, stat_time):
        """Put a file's identity in the index (written by `save_files`): its stat `info`,
        taken at `stat_time` before the file was read, its SHA-1 and its header size. A file
        changed within RACY_SECONDS of that stat is left out (it may have changed again
        within one tick of the file system's clock)."""
        if stat_time - max(info.st_mtime_ns, info.st_ctime_ns) / 1e9 < RACY_SECONDS:
            return
        entry = (int(info.st_size), int(info.st_mtime_ns), int(info.st_ctime_ns), digest,
                 int(header[0]), int(header[1]), self._path_key(path))
        self._new_files[(int(info.st_dev), int(info.st_ino))] = entry
        if self._files is not None:
            self._files[(int(info.st_dev), int(info.st_ino))] = entry

    def save_files(self):
        """Merge the new entries into files.npz on disk (under the lock)."""
        if not self._new_files or not self.writable:
            self._new_files = {}
            return
        with self._locked('lock') as held:
            if not held:
                return
            merged = self._load_files()
            merged.update(self._new_files)
            keys = list(merged)

            def joined(column, width):
                return np.frombuffer(b''.join(merged[k][column] for k in keys),
                                     dtype=np.uint8).reshape(-1, width)
            arrays = dict(
                version=np.int64(INDEX_VERSION),
                ident=np.asarray(keys, dtype=np.uint64).reshape(-1, 2),
                check=np.asarray([merged[k][:3] for k in keys], dtype=np.int64).reshape(-1, 3),
                digest=joined(3, 20), path=joined(6, 8),
                header=np.asarray([merged[k][4:6] for k in keys], dtype=np.int64).reshape(-1, 2))
            try:
                _write_atomically(os.path.join(self.folder, 'files.npz'),
                                  lambda f: np.savez(f, **arrays))
            except OSError as err:
                self.write_failed(err)
        self._new_files = {}

    # --------------------------------------------------------------- small results
    def memo(self, kind, key, compute):
        """A small JSON-able result of `compute()` kept under `kind`/`key` (a hex string): the
        channel statistics of a list of images, the pixel digest of a binary file. Read back
        when present and of this format, else computed and stored (when writable)."""
        path = os.path.join(self.folder, kind, f'{key}.json')
        try:
            with open(path) as f:
                stored = json.load(f)
            if stored.get('version') == FORMAT_VERSION and 'value' in stored:
                return stored['value']
        except (OSError, ValueError, TypeError, AttributeError):
            pass
        value = compute()
        if self.writable:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                record = json.dumps(dict(version=FORMAT_VERSION, value=value)).encode()
                _write_atomically(path, lambda f: f.write(record))
            except OSError as err:
                self.write_failed(err)
        return value
