"""What kind of file something is, from its first bytes: so that a file which is not what a
command expects (an HTML page saved by a failed download, an archive not yet unpacked) is
named as what it is, instead of as a damaged image or checkpoint."""

# (leading bytes, what they are). Checked in order; a PyTorch checkpoint is a zip archive
# (torch.save since 1.6) or a pickle (older files), so neither is listed here.
SIGNATURES = (
    (b'\x1f\x8b', 'a gzip archive'),
    (b'BZh', 'a bzip2 archive'),
    (b'\xfd7zXZ\x00', 'an xz archive'),
    (b"7z\xbc\xaf'\x1c", 'a 7-Zip archive'),
    (b'Rar!\x1a\x07', 'a RAR archive'),
    (b'%PDF-', 'a PDF document'),
    (b'version https://git-lfs', 'a Git LFS pointer (a small text file that stands for the '
                                 'real file, which was never fetched)'),
    (b'\x89PNG\r\n\x1a\n', 'a PNG image'),
    (b'\xff\xd8\xff', 'a JPEG image'),
    (b'GIF8', 'a GIF image'),
    (b'II*\x00', 'a TIFF image'),
    (b'MM\x00*', 'a TIFF image'),
)
IMAGE_KINDS = ('a PNG image', 'a JPEG image', 'a GIF image', 'a TIFF image', 'a WebP image')
HTML_STARTS = (b'<!doctype html', b'<html', b'<head', b'<body', b'<!--')
HEAD_BYTES = 512


def describe_bytes(head):
    """'an HTML page', 'a gzip archive', 'a text file', ... for the first bytes of a file, or
    None when they are none of the kinds recognised here (a checkpoint, a binary file)."""
    for signature, kind in SIGNATURES:
        if head.startswith(signature):
            return kind
    if head.startswith(b'RIFF') and head[8:12] == b'WEBP':
        return 'a WebP image'
    if len(head) > 262 and head[257:262] == b'ustar':
        return 'a tar archive'
    text = head.lstrip(b'\xef\xbb\xbf \t\r\n').lower()
    if text.startswith(HTML_STARTS):
        return 'an HTML page'
    if text.startswith((b'<?xml', b'<svg')):
        return 'an SVG drawing (vectors, not pixels)' if b'<svg' in text else 'an XML file'
    if text.startswith((b'{', b'[')) and _is_text(head):
        return 'a JSON text file'
    if head and _is_text(head):
        return 'a text file'
    return None


def _is_text(head):
    """Whether these bytes read as UTF-8 text (a cut-off last character allowed)."""
    if b'\x00' in head:
        return False
    try:
        head.decode('utf-8')
    except UnicodeDecodeError as err:
        return err.start >= len(head) - 3 and len(head) >= HEAD_BYTES
    return True


def describe_file(path):
    """describe_bytes of the file at `path`; None when it cannot be opened."""
    try:
        with open(path, 'rb') as f:
            return describe_bytes(f.read(HEAD_BYTES))
    except OSError:
        return None
