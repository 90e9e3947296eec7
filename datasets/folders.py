"""Which files of a folder are images: the one walk behind training folders, class trees,
`--eval-root`, embedding and retrieval.

- Hidden files and folders (names starting with '.', such as Jupyter's `.ipynb_checkpoints`)
  are ignored at every level, class folders included.
- Links are followed, but a folder already walked is never walked again, so a link back up
  the tree (`photos/2023/parent -> ..`) ends no loop.
- Each real file counts once, however many links reach it: of the paths that lead to one file,
  the first in sorted order is kept.
- The order is the sorted order of the relative paths, the same on every machine.
- A broken link with an image's name is listed, so that reading it names it as unreadable.
"""
import os
from dataclasses import dataclass, field

from .images import IMAGE_EXTENSIONS, shown


class FolderError(ValueError):
    """A folder that cannot be used as asked; the message is one line."""


def is_image_file(name):
    return not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS)


def is_hidden(name):
    return name.startswith('.')


@dataclass
class Listing:
    """The image files under a folder."""
    paths: list                     # relative to the folder, sorted, each real file once
    repeated: int = 0               # paths left out: they reach a file already listed
    folders_again: int = 0          # links to folders already walked, not followed again

    def notes(self, folder):
        """One note line on what was left out, or none."""
        parts = []
        if self.repeated:
            parts.append(f'{self.repeated} path' + (' reaches' if self.repeated == 1 else
                                                     's reach') + ' a file already listed')
        if self.folders_again:
            parts.append(f'{self.folders_again} link' + ('' if self.folders_again == 1 else 's')
                         + ' to a folder already walked (a loop, or a second way in)')
        if not parts:
            return []
        return [f'note: under {shown(folder)}, {" and ".join(parts)}: each file is read once']


def _walk(folder):
    """The image files under `folder`, as (relative path, whether it is a link) in no
    particular order, and how many folder links were not followed. The real tree is walked
    before the folders that links lead to, so a folder reached both ways keeps its real path."""
    found, again, visited = [], 0, set()
    real_folders, linked_folders = [('', folder)], []
    while real_folders or linked_folders:
        relative, directory = (real_folders or linked_folders).pop(0)
        real = os.path.realpath(directory)
        if real in visited:
            again += 1
            continue
        visited.add(real)
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError:             # an unreadable folder is skipped, as os.walk does
            continue
        for entry in entries:
            if is_hidden(entry.name):
                continue
            path = os.path.join(relative, entry.name)
            try:
                link, is_dir = entry.is_symlink(), entry.is_dir()     # is_dir follows links
            except OSError:
                link, is_dir = True, False
            if is_dir:
                (linked_folders if link else real_folders).append((path, entry.path))
            elif is_image_file(entry.name):
                found.append((path, link))
    return found, again


def _identity(path):
    """What makes a file the same file: (device, inode), or None when it cannot be stat'ed
    (a broken link, listed to be named later)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def list_images(folder, seen=None):
    """The Listing of every image file under `folder`, at any depth (the module's rules).
    Of several paths to one file the first real one is kept, else the first link, in sorted
    order. `seen` (file identities), shared between calls, makes a file that an earlier call
    listed count as repeated."""
    seen = set() if seen is None else seen
    found, again = _walk(folder)
    paths, repeated = [], 0
    for path, _ in sorted(found, key=lambda item: (item[1], item[0])):   # real files first
        identity = _identity(os.path.join(folder, path))
        if identity is not None and identity in seen:
            repeated += 1
            continue
        if identity is not None:
            seen.add(identity)
        paths.append(path)
    return Listing(sorted(paths), repeated, again)


def subfolders(folder):
    """The visible sub-folders of `folder` (links followed), sorted by name."""
    return sorted(entry.name for entry in os.scandir(folder)
                  if not is_hidden(entry.name) and entry.is_dir())


@dataclass
class ClassTree:
    """A split of a class tree, `folder/<class>/...`: classes in sorted name order, each
    image's path (relative to `folder`) and class number."""
    classes: list
    paths: list
    targets: list
    notes: list = field(default_factory=list)


def list_class_tree(folder):
    """The ClassTree of `folder`: every visible sub-folder is a class, its images at any depth
    (each real file once in the whole split). Raises FolderError for a folder without class
    folders or a class folder without images."""
    classes = subfolders(folder)
    if not classes:
        raise FolderError(f'{shown(folder)} holds no class folders (expected '
                          f'{shown(folder)}/<class>/*)')
    paths, targets, seen = [], [], set()
    repeated = again = 0
    for label, name in enumerate(classes):
        listing = list_images(os.path.join(folder, name), seen)
        if not listing.paths:
            held = ('only images already listed under another class (links to them), and '
                    'each file counts once' if listing.repeated else
                    f'no images ({", ".join(IMAGE_EXTENSIONS)})')
            raise FolderError(f'class folder {shown(os.path.join(folder, name))} holds {held}')
        paths += [os.path.join(name, path) for path in listing.paths]
        targets += [label] * len(listing.paths)
        repeated, again = repeated + listing.repeated, again + listing.folders_again
    return ClassTree(classes, paths, targets, Listing([], repeated, again).notes(folder))


def is_class_tree(folder):
    """Whether `folder` holds class folders of images only: visible sub-folders, each with
    images at some depth, and no loose images beside them."""
    entries = [entry for entry in os.scandir(folder) if not is_hidden(entry.name)]
    if any(is_image_file(entry.name) and not entry.is_dir() for entry in entries):
        return False
    classes = [entry.path for entry in entries if entry.is_dir()]
    return bool(classes) and all(list_images(path).paths for path in classes)


def describe_class_difference(found, expected):
    """'it lacks c06 and has extra c11', every name given: how the class list `found` differs
    from `expected`."""
    missing = [name for name in expected if name not in found]
    extra = [name for name in found if name not in expected]
    parts = []
    if missing:
        parts.append('lacks ' + ', '.join(map(shown, missing)))
    if extra:
        parts.append('has extra ' + ', '.join(map(shown, extra)))
    return 'it ' + ' and '.join(parts)
