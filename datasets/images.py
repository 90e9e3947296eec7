"""How an image file becomes RGB pixels: one reader for every path that decodes a file
(training data on both pipelines, `--eval-root`, embedding, retrieval and its figure, the hub
transform), so an image means the same everywhere.

What is read, and how:
- **Upright.** The EXIF orientation is applied (a phone photo stored sideways is read as every
  viewer shows it); torchvision's own loader ignores it.
- **Depth is scaled, never clipped.** 8-bit images are read as they are. 16-bit greyscale
  (`I;16`, and 16-bit PGM, which Pillow holds as 32-bit `I` scaled to 0..65535) becomes
  round(value / 257), its 8-bit equivalent. 16-bit colour PNGs Pillow itself reduces to 8 bits
  (their high byte, at most one level under value / 257). Floating-point images are read as
  fractions of full intensity when every value is in [0, 1] (x 255, rounded) and refused
  otherwise; other 32-bit integer images are refused: their full-intensity value is not in the
  file, so no scale is right. Plain `convert('RGB')` would clip both to white or black.
- **The first frame** of an animated GIF or multi-page TIFF.
- **Transparency is dropped**: a transparent pixel is read as the colour stored under it (what
  `convert('RGB')` gives; a palette image with transparency goes through RGBA, which is the same
  colours without Pillow's warning).
- Pillow's own warnings (palette transparency, decompression-bomb size, corrupt EXIF) never reach
  the terminal raw: an `ImageNotes` collects them, with the project's own observations, into
  one line per kind and run.
"""
import io
import os
import warnings
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .file_kind import IMAGE_KINDS, describe_bytes

# File names read as images (.jfif: how some browsers save JPEGs); AVIF where Pillow reads it.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.jfif', '.png', '.bmp', '.gif', '.ppm', '.pgm', '.tif',
                    '.tiff', '.webp') + (('.avif',) if '.avif' in Image.registered_extensions()
                                         else ())
SIXTEEN_BIT = 257               # 65535 / 255: a 16-bit value over this is its 8-bit equivalent
# Pillow reads these formats' 16-bit greyscale as mode I, already scaled to 0..65535 (PNG in
# Pillow releases before the I;16 mode).
SIXTEEN_BIT_AS_I = ('PPM', 'PNG')
# What an image was read as: stored with embeddings, so that ones made by an earlier reader
# (before orientation and bit depth were read right) are not mixed with new ones.
READER_VERSION = 2
# Formats whose extra frames are animation or pages (a phone's MPO JPEG also has several
# frames, a preview and a depth map, which are not worth a note).
ANIMATED_FORMATS = ('GIF', 'PNG', 'TIFF', 'WEBP')


class UnreadableImage(ValueError):
    """An image file that cannot be read as pixels; the message is the reason, one phrase
    (never a Python object's repr)."""


def shown(path):
    """`path` as it can be printed on one line: a file name that is not valid UTF-8 (Latin-1
    bytes from a Windows zip tool, say) keeps its bytes visible as escapes, e.g.
    'caf\\xe9.png', and control characters (a newline in a name) are escaped too."""
    text = os.fsencode(path).decode('utf-8', 'backslashreplace')
    return ''.join(c if c.isprintable() or c == ' ' else repr(c)[1:-1] for c in text)


# ----------------------------------------------------------------------------- notes
class ImageNotes:
    """What was noticed while reading a run's images, said once per kind: how many images, and
    one example. `lines()` gives the notes to print."""

    # kind: (verb, what) as in "3 images have 16 bits per channel: ..."
    TEXTS = {
        'orientation': ('are', 'stored rotated or mirrored (EXIF orientation): read upright, '
                               'as viewers show them'),
        'sixteen_bit': ('have', '16 bits per channel: read as value / 257, rounded, their '
                                '8-bit equivalent'),
        'sixteen_bit_colour': ('have', '16 bits per colour channel: reduced to 8 bits by '
                                       'Pillow, within one level of value / 257'),
        'float': ('have', 'floating-point pixels in [0, 1]: read as fractions of full '
                          'intensity (x 255, rounded)'),
        'transparency': ('have', 'transparent pixels: read without transparency, as the '
                                 'colours stored under it'),
        'large': ('have', 'more than {limit:,} pixels (Pillow\'s decompression-bomb warning '
                          'size): read all the same'),
        'frames': ('have', 'several frames (animation or pages): the first frame is read'),
    }
    SINGULAR = {'are': 'is', 'have': 'has'}

    def __init__(self):
        self.found = {}          # kind -> [count, example path, detail]

    def add(self, kind, name, detail=None):
        entry = self.found.setdefault((kind, detail), [0, name, detail])
        entry[0] += 1

    def lines(self):
        """One 'note: ...' line per kind noticed, in a fixed order, e.g. 'note: 3 images have
        16 bits per channel: read as ... (e.g. scans/a.png)'."""
        lines = []
        for (kind, _), (count, name, detail) in sorted(self.found.items(),
                                                      key=lambda item: (item[0][0],
                                                                        item[0][1] or '')):
            verb, what = self.TEXTS.get(kind, ('gave', f'a warning from Pillow ({detail}): '
                                                      f'read all the same'))
            if count == 1:
                verb = self.SINGULAR.get(verb, verb)
            images = f'{count} image' + ('' if count == 1 else 's')
            what = what.format(limit=Image.MAX_IMAGE_PIXELS)    # (as set when reading)
            lines.append(f'note: {images} {verb} {what} (e.g. {shown(name)})')
        return lines


def _warning_kind(message):
    text = str(message)
    if 'decompression bomb' in text:
        return 'large', None
    if 'Transparency' in text or 'transparency' in text:
        return 'transparency', None
    return 'pillow', ' '.join(text.split()) if text else type(message).__name__


@contextmanager
def _pillow_warnings(notes, name):
    """Pillow's warnings inside, as notes (when a collector is given); without one they reach
    the caller as Python warnings, the library convention."""
    if notes is None:
        yield
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        yield
    for warning in caught:
        kind, detail = _warning_kind(warning.message)
        notes.add(kind, name, detail)


# ----------------------------------------------------------------------------- reading
def unreadable_reason(err, head=b''):
    """One phrase for why Pillow could not read a file: its own message without object reprs,
    or what the file is instead (an HTML page, an archive)."""
    if isinstance(err, UnidentifiedImageError):
        if not head:
            return 'an empty file (0 bytes)'
        kind = describe_bytes(head)
        if kind in IMAGE_KINDS:
            return f'a damaged {kind[2:]}: Pillow cannot read it'
        return (f'it is {kind}, not an image' if kind
                else 'not an image file: no format Pillow reads')
    if isinstance(err, Image.DecompressionBombError):
        return (f'more than twice Pillow\'s decompression-bomb limit of '
                f'{Image.MAX_IMAGE_PIXELS:,} pixels')
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if 'truncated' in text.lower():     # 'image file is truncated (...)', 'Truncated File Read'
        text = 'the file ends before its image does (cut off, or not completely copied)'
        kind = describe_bytes(head) if head else None
        return f'a damaged {kind[2:]}: {text}' if kind in IMAGE_KINDS else text
    return text.split(' <_io.')[0].split(' <PIL.')[0]


def failure_reason(err):
    """The phrase for an OSError (a missing file, a broken link, no permission) or an
    UnreadableImage met while reading an image file."""
    if isinstance(err, OSError) and err.strerror:
        if isinstance(err, FileNotFoundError) and err.filename and \
                os.path.islink(err.filename):   # (ls lists it: "no such file" puzzles)
            return f'a link to {shown(os.readlink(err.filename))}, which does not exist'
        return err.strerror
    return str(err) or type(err).__name__


def open_image(source, notes=None, name=None):
    """The PIL image of `source` (the bytes of an encoded file, a path, or a PIL image, given
    back as it is), not yet decoded. Raises UnreadableImage."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        with open(source, 'rb') as f:        # OSError (a missing file, a broken link) passes
            data = f.read()
    try:
        with _pillow_warnings(notes, name):
            return Image.open(io.BytesIO(data))
    except MemoryError:         # the machine's state, not the file's: never "unreadable"
        raise
    except Exception as err:    # Pillow's plugins raise many types; each means "not readable"
        raise UnreadableImage(unreadable_reason(err, data[:512])) from None


def to_rgb(img, size=None, notes=None, name=None, draft=True):
    """An RGB PIL image of `img`, upright and scaled to 8 bits (the module's rules), and with
    `size` resized (shorter side, antialiased) and centre-cropped to size x size. With `draft`,
    a large JPEG not yet loaded is decoded at a reduced scale that is still at least `size`
    (PIL's draft mode, which changes `img` in place). Raises UnreadableImage."""
    try:
        with _pillow_warnings(notes, name):
            if notes is not None and img.format in ANIMATED_FORMATS \
                    and getattr(img, 'n_frames', 1) > 1:
                notes.add('frames', name)
            if notes is not None and img.mode in ('RGB', 'RGBA') and _sixteen_bit_tiles(img):
                notes.add('sixteen_bit_colour', name)
            if size is not None and draft:
                img.draft('RGB', (size, size))
            if notes is not None and _orientation(img) in TURNED:
                notes.add('orientation', name)
            file_format = img.format
            rgb = _eight_bit_rgb(ImageOps.exif_transpose(img), file_format, notes, name)
    except (UnreadableImage, MemoryError):
        raise
    except Exception as err:    # Pillow's decoders raise many types; each means "not readable"
        reason = unreadable_reason(err)
        if img.format and not isinstance(err, Image.DecompressionBombError):
            reason = f'a damaged {img.format} image: {reason}'
        raise UnreadableImage(reason) from None
    return fit_square(rgb, size) if size is not None else rgb


TURNED = range(2, 9)             # EXIF orientations that flip or rotate (1: as stored)


def _sixteen_bit_tiles(img):
    """Whether a colour image not yet loaded is stored with 16 bits per channel, which Pillow
    reduces to 8 as it loads it (PNG raw modes such as 'RGB;16B', PPM with maxval > 255)."""
    for tile in img.tile or ():
        args = tile[3] if len(tile) > 3 else None
        if isinstance(args, str) and ';16' in args:
            return True
        if isinstance(args, tuple) and len(args) > 1 and isinstance(args[1], int) \
                and args[1] > 255:
            return True
    return False


def _orientation(img):
    try:
        return img.getexif().get(0x0112)
    except Exception:           # a corrupt EXIF block: exif_transpose ignores it too
        return None


def _eight_bit_rgb(img, file_format, notes, name):
    """RGB with 8 bits per channel, scaling high bit depths instead of clipping them."""
    mode = img.mode
    if mode.startswith('I;16') or mode == 'I' and file_format in SIXTEEN_BIT_AS_I:
        values = np.asarray(img).astype(np.int64)
        if notes is not None:
            notes.add('sixteen_bit', name)
        return _grey(((values + SIXTEEN_BIT // 2) // SIXTEEN_BIT).clip(0, 255))
    if mode == 'I':
        values = np.asarray(img)
        raise UnreadableImage(f'a 32-bit integer image (values {values.min()} to '
                              f'{values.max()}) does not say which value is full intensity, '
                              f'so it is not read: convert it to 8 or 16 bits')
    if mode == 'F':
        values = np.asarray(img, dtype=np.float64)
        if not np.isfinite(values).all():
            raise UnreadableImage('a floating-point image with NaN or infinite values is not '
                                  'read')
        if values.min() < 0 or values.max() > 1:
            raise UnreadableImage(f'a floating-point image with values from {values.min():g} '
                                  f'to {values.max():g} is read only when every value lies in '
                                  f'[0, 1] (fractions of full intensity)')
        if notes is not None:
            notes.add('float', name)
        return _grey(np.round(values * 255))
    if mode == 'P' and 'transparency' in img.info or mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
        rgba = img.convert('RGBA')
        if notes is not None and rgba.getextrema()[3][0] < 255:
            notes.add('transparency', name)
        return rgba.convert('RGB')
    return img.convert('RGB')


def _grey(values):
    return Image.fromarray(values.astype(np.uint8), 'L').convert('RGB')


def fit_square(img, size):
    """Resize the shorter side to `size` (bilinear, antialiased), then centre-crop size x size:
    torchvision's Resize(size) + CenterCrop(size), done once at load time."""
    if img.size == (size, size):
        return img
    import torchvision.transforms.functional as F
    return F.center_crop(F.resize(img, size), size)


def decode_image(data, size=None, notes=None, name=None):
    """H x W x 3 uint8 of the encoded image `data` (bytes): as it is (upright, 8 bits), or
    fitted to a `size` x `size` square. Raises UnreadableImage."""
    img = open_image(data, notes, name)
    with img:
        return np.asarray(to_rgb(img, size, notes, name))


def stored_size(path, notes=None):
    """(width, height) of the image at `path` as stored, read from its header (no decoding).
    Raises OSError or UnreadableImage."""
    with open_image(path, notes, path) as img:
        return img.size
