"""Which files of a folder are images: the one walk behind training folders, class trees,
`--eval-root`, embedding and retrieval.

- A folder of unlabeled images is walked at any depth; a class tree `<split>/<class>/*` takes
  the images directly inside each class folder (as it always has: a folder of thumbnails
  inside a class folder is not read, and a note counts the image files left so).
- Hidden files and folders (names starting with '.', such as Jupyter's `.ipynb_checkpoints`)
  are ignored at every level, class folders included.
- Links are followed, but a folder already walked is never walked again, so a link back up the
  tree (`photos/2023/parent -> ..`) ends no loop.
- Each real file counts once, however many paths reach it. Of the paths to one file the real
  one is kept (a link to it is left out), else the first in sorted order; in a class tree this
  holds across the whole split, so a link in one class to an image of another leaves that
  image in its own class.
- Only regular files are listed (a named pipe called `x.png` would block reading forever),
  and broken links with an image's name, so that reading names them as unreadable.
- The order is the sorted order of the relative paths, the same on every machine.
"""
import os
from collections import Counter, deque
from dataclasses import dataclass, field

from .images import IMAGE_EXTENSIONS, shown


class FolderError(ValueError):
    """A folder that cannot be used as asked; the message is one line."""


def is_hidden(name):
    return name.startswith('.')


def is_image_file(name):
    return not is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)


@dataclass
class Listing:
    """The image files under a folder."""
    paths: list                     # relative to the folder, sorted, each real file once
    repeated: int = 0               # paths left out: they reach a file already listed
    folders_again: int = 0          # links to folders already walked, not followed again
    others: list = field(default_factory=list)  # files whose names are of no image type

    def notes(self, folder):
        """The note lines on what was left out (none when nothing was)."""
        return other_files_notes(folder, self.others) + self.repeated_notes(folder)

    def empty_text(self, folder):
        """What a folder without images is told: their types, and what it holds instead."""
        return (f'{shown(folder)} holds no images ({", ".join(IMAGE_EXTENSIONS)}), at any depth'
                + (f'; it holds {counted_by_kind(self.others)}' if self.others else ''))

    def repeated_notes(self, folder):
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


@dataclass(frozen=True)
class Found:
    """One image path met by a walk."""
    path: str           # relative to the folder walked
    link: bool          # reached through a link to the file itself
    identity: tuple     # (device, inode) of the file, None for a broken link


def _entry_kind(entry):
    """'folder', 'file', 'broken' (a link to nothing) or None (anything else: a pipe, a
    socket, a device)."""
    try:
        if entry.is_dir():                  # follows links
            return 'folder'
        if entry.is_file():
            return 'file'
        if entry.is_symlink() and not os.path.exists(entry.path):
            return 'broken'
    except OSError:
        return 'broken' if entry.is_symlink() else None
    return None


def _identity(path):
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def other_files_notes(folder, others):
    """A note on the files `others` (paths) under `folder` that are not read, their names
    being of no image type (a phone's .heic, a .txt, a name without an extension), counted by
    kind; none when there are none."""
    if not others:
        return []
    return [f'note: under {shown(folder)}, {counted_by_kind(others)} '
            + ('is' if len(others) == 1 else 'are') + ' not read; the image types read are '
            + ', '.join(IMAGE_EXTENSIONS)]


def counted_by_kind(others):
    """'3 files not named as images (1 .heic, 1 .txt, 1 without an extension)'."""
    kinds = Counter(os.path.splitext(path)[1].lower() or 'without an extension'
                    for path in others)
    listed = [f'{count} {kind}' for kind, count in kinds.most_common(5)]
    if len(kinds) > 5:
        listed.append(f'{len(kinds) - 5} more kinds')
    return (f'{len(others)} file' + ('' if len(others) == 1 else 's')
            + f' not named as images ({", ".join(listed)})')


def _walk(folder, any_depth=True, links=True):
    """The image files under `folder` (Found, in no particular order), how many folder links
    were not followed, and the paths of the other files (not hidden, of no image type). The
    real tree is walked before the folders that links lead to, so a folder reached both ways
    keeps its real path. Without `any_depth`, only `folder`'s own files; with `links=False`,
    folder links are not followed."""
    found, again, visited, others = [], 0, set(), []
    real_folders, linked_folders = deque([('', folder)]), deque()
    while real_folders or linked_folders:
        relative, directory = (real_folders or linked_folders).popleft()
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
            kind, path = _entry_kind(entry), os.path.join(relative, entry.name)
            if kind == 'folder' and any_depth and (links or not entry.is_symlink()):
                (linked_folders if entry.is_symlink() else real_folders).append(
                    (path, entry.path))
            elif kind in ('file', 'broken') and is_image_file(entry.name):
                found.append(Found(path, entry.is_symlink(), _identity(entry.path)))
            elif kind == 'file':
                others.append(path)
    return found, again, others


def _once(found, seen):
    """The Found of `found` whose file `seen` (identities) does not hold yet, real files
    before links, in sorted path order; and how many were left out. `seen` grows."""
    kept, repeated = [], 0
    for item in sorted(found, key=lambda item: (item.link, item.path)):
        if item.identity is not None and item.identity in seen:
            repeated += 1
            continue
        if item.identity is not None:
            seen.add(item.identity)
        kept.append(item)
    return kept, repeated


def list_images(folder):
    """The Listing of every image file under `folder`, at any depth (the module's rules)."""
    found, again, others = _walk(folder)
    kept, repeated = _once(found, set())
    return Listing(sorted(item.path for item in kept), repeated, again, sorted(others))


def subfolders(folder):
    """The visible sub-folders of `folder` (links followed), sorted by name."""
    return sorted(entry.name for entry in os.scandir(folder)
                  if not is_hidden(entry.name) and _entry_kind(entry) == 'folder')


@dataclass
class ClassTree:
    """A split of a class tree, `folder/<class>/*`: classes in sorted name order, each image's
    path (relative to `folder`, sorted by class and then file name) and class number."""
    classes: list
    paths: list
    targets: list
    identities: list = field(repr=False, default_factory=list)   # of each file (or None)
    notes: list = field(default_factory=list)


def list_class_tree(folder):
    """The ClassTree of `folder`: every visible sub-folder is a class, its images those
    directly inside it, each real file once in the whole split. Raises FolderError for a
    folder without class folders or a class folder without images."""
    classes = subfolders(folder)
    if not classes:
        raise FolderError(f'{shown(folder)} holds no class folders (expected '
                          f'{shown(folder)}/<class>/*)')
    found, deeper_in, others = [], {}, []
    for label, name in enumerate(classes):
        # (deeper folders only counted: a link there, to a tree or a mount, is not walked)
        files, _, other_files = _walk(os.path.join(folder, name), links=False)
        others += [os.path.join(name, path) for path in other_files if os.sep not in path]
        found += [(label, Found(os.path.join(name, item.path), item.link, item.identity))
                  for item in files if os.sep not in item.path]
        deeper_in[name] = {item.identity or os.path.join(name, item.path) for item in files
                           if os.sep in item.path}
    listed = {item.identity for _, item in found}       # (a link deeper down to a class's image)
    deeper_in = {name: files - listed for name, files in deeper_in.items()}
    deeper = set().union(*deeper_in.values())
    kept, repeated = _once([item for _, item in found], set())
    kept = set(kept)
    chosen = sorted(((label, item) for label, item in found if item in kept),
                    key=lambda pair: (pair[0], pair[1].path))
    counts = [sum(label == c for label, _ in chosen) for c in range(len(classes))]
    for name, count in zip(classes, counts):
        if not count:
            below = len(deeper_in[name])
            held = ('only links to images of other classes, each of which counts in its own '
                    'class' if any(item.path.startswith(name + os.sep) for _, item in found)
                    else f'no images directly inside it ({below} in folders inside it, which '
                    f'a class does not read)' if below
                    else f'no images ({", ".join(IMAGE_EXTENSIONS)})')
            raise FolderError(f'class folder {shown(os.path.join(folder, name))} holds {held}')
    left_out = [f'note: under {shown(folder)}, {len(deeper)} image file'
                + (' in a folder inside a class folder is' if len(deeper) == 1 else
                   's in folders inside class folders are')
                + ' not read: a class holds the images directly inside its folder'] \
        if deeper else []
    return ClassTree(classes, [item.path for _, item in chosen],
                     [label for label, _ in chosen], [item.identity for _, item in chosen],
                     Listing([], repeated, others=others).notes(folder) + left_out)


def images_inside(folder):
    """The image files directly inside `folder` (the module's rules: hidden ones left out,
    broken links kept), as sorted names."""
    return sorted(item.path for item in _walk(folder, any_depth=False)[0])


def is_class_tree(folder):
    """Whether `folder` holds class folders of images only: visible sub-folders, each with
    images directly inside, and no loose images beside them."""
    entries = [entry for entry in os.scandir(folder) if not is_hidden(entry.name)]
    if any(is_image_file(entry.name) and _entry_kind(entry) != 'folder' for entry in entries):
        return False
    classes = [entry.path for entry in entries if _entry_kind(entry) == 'folder']
    return bool(classes) and all(images_inside(path) for path in classes)


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
