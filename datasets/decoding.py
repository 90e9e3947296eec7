"""Image files read into pixels on every core, through the decoded-image cache.

`read_files` gives, in the order of the paths, what `datasets.images` reads of each file: from
the cache (`datasets.image_cache`) when it holds the file, else decoded by a pool of processes
(`Reading.workers`, default every core this process may use) and put in the cache. The pixels,
the digests, the notes and the reasons a file cannot be read are the ones the one-process
reader gives, whatever the number of processes, the order they finish in, or the cache: each
process runs that reader on whole files, the results are taken back in order, and the notes
are replayed in order with each file's name.

A file the cache's file index does not know (new, changed, or a copy elsewhere) is read and
hashed by a worker; when the cache already holds its content it is not decoded again.

Worker processes ignore Ctrl-C (the main process decides how to stop, and ends them); they
are forked on Linux (nothing to import again) and spawned elsewhere.
"""
import hashlib
import multiprocessing
import os
import signal
import sys
import time
import warnings
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import numpy as np

from .errors import DataError
from .image_cache import HELD_LOCKS, PackWriter, size_rule
from .images import (ImageNotes, UnreadableImage, failure_reason, open_image, shown,
                     stored_size, to_rgb)

MAX_CHUNK = 32                  # files a worker decodes per task (fewer for short lists)
TASKS_AHEAD = 4                 # tasks in flight per worker: the results wait in memory


class DecodingError(DataError):
    """A worker process died (killed, out of memory); the message is one line."""


def cpu_count():
    """The cores this process may use (its affinity mask: a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass
class Reading:
    """How files are read: `cache` (an ImageCache, or None to keep the pixels in memory),
    `workers` (decoding processes; None: every core; 0 or 1: this process alone), `progress`
    (progress(iterable, total=, desc=, unit=) -> iterable: a bar for the decoding) and `say`
    (for the one line said while waiting for another process that fills the same cache)."""
    cache: object = None
    workers: int = 1
    progress: object = None
    say: object = None
    said_waiting: bool = False

    @property
    def processes(self):
        return cpu_count() if self.workers is None else max(1, int(self.workers))


@dataclass
class ReadStats:
    """What reading cost: files asked for, found in the cache (`from_cache`, of which
    `hashed` were read to find them), decoded, the seconds spent reading (not the caller's
    time between files), the decoding processes; the cache folder read (None without one)
    and whether what was decoded went into it (`cached`)."""
    files: int = 0
    from_cache: int = 0
    hashed: int = 0
    decoded: int = 0
    seconds: float = 0.0
    processes: int = 1
    cache: str = None
    cached: bool = False


@dataclass
class FileRead:
    """One file as read: its `digest` (SHA-1 of its bytes; None when it could not be opened),
    `header` (width, height as stored), and either its pixels (`pixels()`: H x W x 3 uint8)
    or the `reason` it cannot be read (one phrase). `place` is where the cache holds it."""
    position: int
    path: str
    digest: bytes = None
    header: tuple = None
    reason: str = None
    image: np.ndarray = field(default=None, repr=False)
    place: tuple = None                  # (block, row) in the cache's packs
    packs: object = field(default=None, repr=False)

    def pixels(self):
        return self.image if self.image is not None else self.packs.image(self.place)

    @property
    def shape(self):
        return self.image.shape if self.image is not None else self.packs.shape_of(self.place)


class RecordedNotes(ImageNotes):
    """The notes one file gives, recorded as (kind, detail) pairs to be replayed in order."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def add(self, kind, name, detail=None):
        self.calls.append((kind, detail))


# ----------------------------------------------------------------------------- one file
def decode_file(path, size, known=frozenset()):
    """(kind, digest, header, pixels, reason, notes) of one file, as `datasets.images` reads
    it. kind: 'image'; 'unreadable' (bytes that are no readable image); 'oserror' (it cannot
    be opened: missing, a broken link, no permission); 'known' (its SHA-1 is in `known`: not
    decoded, only its header size read)."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as err:
        return 'oserror', None, None, None, failure_reason(err), []
    digest = hashlib.sha1(data).digest()
    notes = RecordedNotes()
    if digest in known:
        try:
            with open_image(data) as img:
                header = img.size
        except Exception:           # noqa: BLE001 (an unreadable file the cache knows)
            header = None
        return 'known', digest, header, None, None, []
    try:
        img = open_image(data, notes, path)
        with img:
            header = img.size            # (draft mode changes it)
            pixels = np.asarray(to_rgb(img, size, notes, path))
    except UnreadableImage as err:
        return 'unreadable', digest, None, None, failure_reason(err), notes.calls
    except MemoryError:                  # the machine's, not the file's: stop, cache nothing
        raise DecodingError(f'out of memory while decoding {shown(path)} ({len(data):,} bytes):'
                            f' give fewer --workers, or free memory') from None
    return 'image', digest, header, pixels, None, notes.calls


_KNOWN = frozenset()            # the digests the workers need not decode (set before forking)


def _worker_starts(known, parent):
    """In each worker: Ctrl-C is the main process's to answer, and SIGTERM and SIGHUP end the
    worker whatever handler it inherited by fork (the main process ends its workers with
    SIGTERM); the cache's locks the main process holds are not the worker's to keep (its
    copies of them closed); and the worker ends with the main process (killed, it would
    otherwise wait for tasks for ever)."""
    global _KNOWN
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for stop in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, signal.SIG_DFL)
    for descriptor in list(HELD_LOCKS):
        try:
            os.close(descriptor)
        except OSError:
            pass
    _end_with_parent(parent)
    if known is not None:       # spawned: the set travels as an argument
        _KNOWN = known


def _end_with_parent(parent):
    """SIGKILL this process when its parent dies (Linux's PR_SET_PDEATHSIG)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)           # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:                  # it died before prctl took effect
        os._exit(1)


def _decode_chunk(jobs):
    return [decode_file(path, size, _KNOWN) for path, size in jobs]


def _stop(executor, abort):
    if not abort:
        executor.shutdown(wait=True)
        return
    executor.shutdown(wait=False, cancel_futures=True)
    if hasattr(executor, 'terminate_workers'):          # Python 3.14
        executor.terminate_workers()
        return
    for process in list((getattr(executor, '_processes', None) or {}).values()):
        process.terminate()
    for process in list((getattr(executor, '_processes', None) or {}).values()):
        process.join(5)


def decoded_in_order(jobs, processes, known=frozenset()):
    """`decode_file` of each (path, size) of `jobs`, in order: in this process, or on a pool of
    `processes` with a bounded number of tasks in flight (the results wait in order, so the
    memory they take does not grow with the list)."""
    global _KNOWN
    if processes <= 1 or len(jobs) < 2 * processes:
        for path, size in jobs:
            yield decode_file(path, size, known)
        return
    chunk = max(1, min(MAX_CHUNK, len(jobs) // (processes * TASKS_AHEAD)))
    tasks = (jobs[start:start + chunk] for start in range(0, len(jobs), chunk))
    fork = sys.platform.startswith('linux')
    _KNOWN = known              # forked workers find it here
    executor = ProcessPoolExecutor(processes, initializer=_worker_starts,
                                   initargs=(None if fork else known, os.getpid()),
                                   mp_context=multiprocessing.get_context(
                                       'fork' if fork else 'spawn'))
    pending, finished = deque(), False
    try:
        with warnings.catch_warnings():
            # Python 3.12 warns of fork() in a process with threads: the workers decode with
            # Pillow and numpy only and take no lock of those threads (as DataLoader forks).
            warnings.filterwarnings('ignore', message='.*use of fork\\(\\) may lead to deadlocks',
                                    category=DeprecationWarning)
            for task in tasks:
                pending.append(executor.submit(_decode_chunk, task))
                if len(pending) >= processes * TASKS_AHEAD:
                    break
        while pending:
            try:
                results = pending.popleft().result()
            except BrokenProcessPool:
                raise DecodingError(f'a process decoding images died (killed, or out of '
                                    f'memory?); {processes} were decoding at once: --workers '
                                    f'N sets how many') from None
            task = next(tasks, None)
            if task is not None:
                pending.append(executor.submit(_decode_chunk, task))
            yield from results
        finished = True
    finally:
        _KNOWN = frozenset()
        _stop(executor, abort=not finished)


# ----------------------------------------------------------------------------- many files
def read_files(paths, size, reading, notes=None, stats=None):
    """FileRead of each path, in order (see the module's docstring); `size` None keeps each
    image at its stored size, else fits it to a size x size square (`datasets.images`).
    `notes` (an ImageNotes) gets what each file gave, in order; `stats` (a ReadStats) what it
    cost. The cache's own lines (a folder that cannot be written, ...) are in its `notes`.

    When some files are not in the cache, its fill lock of these files is held while they are
    read: another process reading the same files (a second run, a torchrun rank) waits, then
    finds them in the cache."""
    stats = stats if stats is not None else ReadStats()
    stats.files += len(paths)
    reads = _reads(paths, size, reading, notes, stats)
    try:
        while True:
            started = time.time()
            try:
                read = next(reads)
            except StopIteration:
                return
            finally:
                stats.seconds += time.time() - started
            yield read
    finally:
        reads.close()


def _reads(paths, size, reading, notes, stats):
    cache = reading.cache
    if cache is None:
        yield from _merged(paths, size, reading, notes, stats, [None] * len(paths),
                           [None] * len(paths), None)
        return
    stats.cache, rule = cache.root, size_rule(size)

    def identified():
        infos, known, stat_time = [None] * len(paths), [None] * len(paths), time.time()
        for i, path in enumerate(paths):
            try:
                infos[i], known[i] = cache.identify(path)
            except OSError:
                pass                            # said when it is read
        return infos, known, stat_time
    packs = cache.packs(rule)
    infos, known, stat_time = identified()
    if all(entry is not None and packs.lookup(entry[0]) is not None for entry in known):
        yield from _merged(paths, size, reading, notes, stats, infos, known, packs, stat_time)
        return

    def waiting():
        if reading.say and not reading.said_waiting:      # (once, not once per split)
            reading.said_waiting = True
            reading.say(f'waiting for another process that is reading these images into the '
                        f'cache {shown(cache.root)}')
    with cache.filling(rule, paths, waiting) as (packs, waited):
        if waited:                              # what the other process wrote
            infos, known, stat_time = identified()
        yield from _merged(paths, size, reading, notes, stats, infos, known, packs, stat_time)
        cache.save_files()
    stats.cached = cache.writable


def _merged(paths, size, reading, notes, stats, infos, known, packs, stat_time=None):
    """The cached files and the decoded ones, in order; the decoded ones go into the cache."""
    def cached(i):
        return packs.lookup(known[i][0]) if packs is not None and known[i] else None

    missing = [i for i in range(len(paths)) if cached(i) is None]
    writer = PackWriter(packs) if packs is not None else None
    processes = reading.processes if len(missing) >= 2 * reading.processes else 1
    stats.processes = max(stats.processes, processes)
    known_keys = frozenset(packs.where) | frozenset(packs.unreadable) if packs is not None \
        else frozenset()
    pool = decoded_in_order([(paths[i], size) for i in missing], processes, known_keys)
    bar = reading.progress(pool, total=len(missing), desc='reading images', unit='image') \
        if reading.progress is not None and missing else pool
    decoded = iter(bar)
    missing = set(missing)

    def replay(found, path):
        if notes is not None:
            for kind, detail in found:
                notes.add(kind, path, detail)

    def from_cache(i, path, digest, header, entry):
        kind, what, found = entry
        stats.from_cache += 1
        replay(found, path)
        if kind == 'unreadable':
            return FileRead(i, path, digest, reason=what)
        return FileRead(i, path, digest, header, place=what, packs=packs)

    try:
        for i, path in enumerate(paths):
            if i not in missing:
                yield from_cache(i, path, *known[i], cached(i))
                continue
            kind, digest, header, pixels, reason, found = next(decoded)
            if kind == 'known':         # (in the packs: they only grow while a process reads)
                stats.hashed += 1
                entry = packs.lookup(digest)
                if entry[0] == 'image' and header is not None and infos[i] is not None:
                    packs.cache.remember(path, infos[i], digest, header, stat_time)
                yield from_cache(i, path, digest, header, entry)
                continue
            stats.decoded += 1
            replay(found, path)
            if writer is not None and kind == 'image':
                writer.add(digest, pixels, found)
                if infos[i] is not None:
                    packs.cache.remember(path, infos[i], digest, header, stat_time)
            elif writer is not None and kind == 'unreadable':
                writer.add_unreadable(digest, reason, found)
            yield FileRead(i, path, digest, header, reason=reason, image=pixels)
    finally:
        if writer is not None:
            writer.close()
        pool.close()                    # (the pool's processes end here, not when collected)
        if bar is not pool and hasattr(bar, 'close'):
            bar.close()


def header_sizes(paths, reading):
    """(width, height) as stored of each file, from the cache's file index when it holds the
    file unchanged, else from the file's header (no decoding). Raises OSError or
    UnreadableImage for a file that cannot be read."""
    cache = reading.cache
    for path in paths:
        if cache is not None:
            try:
                _, known = cache.identify(path)
            except OSError:
                known = None
            if known is not None:
                yield known[1]
                continue
        yield stored_size(path)
