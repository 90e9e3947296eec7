"""The gallery images nearest to query images, by a trained checkpoint's embeddings.

    python -m tools.retrieve --ckpt checkpoint/ckpt.t7 --gallery photos/ --query a.jpg b.jpg --k 10
    python -m tools.retrieve --ckpt checkpoint/ckpt.t7 --gallery photos.npz --query a.jpg \
        --figure fig/neighbours.png

For each query it prints the k most similar gallery images as `rank  similarity  path` lines;
similarity is the cosine of the two unit-length embeddings (1: the same embedding, 0:
unrelated). A gallery given as a folder is embedded once and cached next to the checkpoint,
keyed by the folder's files and the checkpoint; a gallery .npz is one `python -m tools.embed`
wrote. `--figure` draws each query (blue frame) and its neighbours in a row.
"""
import os
import sys

if not __package__:     # run by its path, python3 tools/<name>.py: the project's packages
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = 'tools'

from lib import cli  # noqa: E402
from tools.layout import CELL

DEFAULT_K = 10


def build_parser():
    p = cli.Parser(prog='python -m tools.retrieve',
                   description='The gallery images most similar to query images.')
    cli.add_checkpoint_option(p)
    p.add_argument('--gallery', required=True, metavar='DIR_OR_NPZ',
                   help='a folder of images (embedded once, cached next to the checkpoint) or '
                        'an .npz from python -m tools.embed')
    p.add_argument('--query', required=True, nargs='+', metavar='IMG',
                   help='query images; a folder gives all its images (any depth)')
    p.add_argument('--k', type=cli.POSITIVE_INT, default=DEFAULT_K,
                   help='neighbours per query (default: %(default)s)')
    p.add_argument('--figure', default=None, type=cli.output_file('.png', '.jpg', '.jpeg'),
                   metavar='PATH', help='also draw the queries and their neighbours in an image '
                                        '(.png, .jpg)')
    p.add_argument('--cell', type=cli.POSITIVE_INT, default=CELL,
                   help='image side in the figure, pixels (default: %(default)s)')
    cli.add_reading_options(p)
    cli.add_device_option(p)
    return p


if __name__ == '__main__':
    cli.parse_first(lambda: build_parser().parse_args())

# The engine, imported once the flags are known to be right (importing torch takes seconds).
import numpy as np  # noqa: E402
import torch  # noqa: E402

import datasets  # noqa: E402
from datasets import describe_file, shown  # noqa: E402

from lib.analysis import load_network  # noqa: E402
from lib.build import image_reading, pick_device  # noqa: E402
from lib.console import tool_command  # noqa: E402
from lib.core.knn import nearest  # noqa: E402
from lib.checkpoint import checkpoint_digest  # noqa: E402
from .embed import (ImageList, embed_files, embed_folder, file_fingerprint,  # noqa: E402
                    list_folder, report_skipped, save_embeddings)
from lib.errors import UserError  # noqa: E402


def cache_path(checkpoint, fingerprint):
    """Next to the checkpoint (relative to here when it is below here, as the user typed it)."""
    stem = os.path.splitext(checkpoint)[0]
    return f'{stem}.gallery-{fingerprint}.npz'


def load_npz(path):
    """{name: array} of the .npz at `path`; a UserError for a file that is no .npz of
    embeddings or is damaged (cut off by a kill, a copy that stopped short)."""
    kind = describe_file(path)
    if kind is not None:
        raise UserError(f'cannot read gallery {shown(path)}: it is {kind}, not an .npz of '
                        f'embeddings (python -m tools.embed writes them)')
    try:
        f = open(path, 'rb')            # (np.load leaves its own file open when it fails)
    except OSError as err:
        raise UserError(f'cannot read gallery {shown(path)}: {err.strerror or err}') from None
    with f:
        try:
            data = np.load(f, allow_pickle=False)
            if isinstance(data, np.lib.npyio.NpzFile):      # (else one .npy array)
                with data:
                    return {key: data[key] for key in data.files}
        except Exception as err:        # whatever numpy and zipfile make of damaged bytes
            # (their own texts can quote kilobytes of the file, or advise allow_pickle)
            raise UserError(f'cannot read gallery {shown(path)}: it is damaged or cut off '
                            f'({type(err).__name__}); embed its images again') from None
    raise UserError(f'cannot read gallery {shown(path)}: it is one NumPy array (.npy), not an '
                    f'.npz of embeddings (python -m tools.embed writes them)')


def gallery_from_folder(loaded, images, checkpoint, device, say, reading=None):
    """(ImageList, features) of a gallery folder's ImageList: from the cache next to the
    checkpoint when the folder's files and the checkpoint are unchanged, else embedded (files
    read through `reading`, a datasets.Reading) and cached."""
    fingerprint = file_fingerprint(images.root, images.paths,
                                   reading.cache if reading is not None else None)
    cached, digest = cache_path(checkpoint, fingerprint), checkpoint_digest(checkpoint)
    if os.path.isfile(cached):
        try:
            data = load_npz(cached)
        except UserError as err:        # a damaged cache is made again
            say(f'note: {err}; embedding the gallery again')
            data = {}
        if str(data.get('checkpoint_digest')) == digest and \
                reader_version(data) == datasets.READER_VERSION:
            say(f'gallery {shown(images.root)}: {len(data["paths"])} embeddings from the cache '
                f'{shown(cached)}')
            return (ImageList(images.root, [str(p) for p in data['paths']]),
                    torch.from_numpy(data['features']).to(device))
    images, features, fingerprint = embed_folder(loaded, images, device,
                                                 show=sys.stderr.isatty(), say=say,
                                                 reading=reading)
    cached = cache_path(checkpoint, fingerprint)    # (of the bytes read: safe if files changed)
    try:
        save_embeddings(cached, images, features, loaded, checkpoint, fingerprint=fingerprint,
                        checkpoint_digest=digest)
        say(f'gallery {shown(images.root)}: {cli.plural(features.shape[0], "image")} embedded, '
            f'cached in {shown(cached)}')
    except OSError as err:
        say(f'gallery {shown(images.root)}: {cli.plural(features.shape[0], "image")} embedded '
            f'(not cached: {err.strerror or err})')
    return images, features


def gallery_from_npz(loaded, path, checkpoint, device, say):
    """(ImageList, features) of an .npz that tools.embed wrote: refused when another checkpoint
    made it (its similarities to these queries would mean nothing); its image size and
    normalisation are compared with the checkpoint's (and said once when they differ)."""
    data = load_npz(path)
    if 'features' not in data or 'paths' not in data:
        raise UserError(f'{path} is not a gallery: it needs features and paths '
                        f'(python -m tools.embed writes them)')
    if reader_version(data) != datasets.READER_VERSION:
        say(f'note: {shown(path)} was embedded by an earlier version of the image reader, '
            f'which read EXIF-rotated photos sideways and clipped 16-bit images: embed it again '
            f'with {tool_command("embed").rstrip()} if the gallery holds such images')
    if str(data.get('features_of')) == 'bank':
        say(f'note: {shown(path)} holds the memory bank\'s rows (tools.export --features bank), '
            f'to which the queries\' network embeddings are compared, as the kNN evaluation '
            f'does')
    made_by = str(data['checkpoint_digest']) if 'checkpoint_digest' in data else None
    if made_by is None:
        say(f'note: {path} does not say which checkpoint embedded it: that it is {checkpoint} '
            f'could not be checked')
    elif made_by != checkpoint_digest(checkpoint):
        fix = 'give the image folder as --gallery'
        if 'root' in data:
            fix += ', or embed it again: ' + tool_command(
                'embed', '--ckpt', checkpoint, '--images', str(data['root']), '--out', path)
        embedded_by = str(data['checkpoint']) if 'checkpoint' in data else 'unknown'
        same_file = embedded_by != 'unknown' and os.path.realpath(embedded_by) == \
            os.path.realpath(checkpoint)
        which = (f'an earlier {checkpoint}, written over since (the run trained on)'
                 if same_file else f'another checkpoint ({embedded_by})')
        raise UserError(f'{path} was embedded with {which}, so its similarities to these '
                        f'queries would mean nothing: {fix}')
    features = torch.from_numpy(data['features'].astype(np.float32)).to(device)
    width = loaded.net.linear.out_features
    if features.shape[1] != width:
        raise UserError(f'{path} holds {features.shape[1]}-d embeddings, but the checkpoint '
                        f'makes {width}-d ones')
    made_with = (int(data.get('image_size', loaded.image_size)),
                 tuple(np.round(data.get('mean', loaded.mean), 4)),
                 tuple(np.round(data.get('std', loaded.std), 4)))
    wanted = (loaded.image_size, tuple(np.round(loaded.mean, 4)), tuple(np.round(loaded.std, 4)))
    if made_with != wanted:
        say(f'note: {path} was embedded at {made_with[0]} px with mean {made_with[1]} std '
            f'{made_with[2]}; the checkpoint\'s are {wanted[0]} px, mean {wanted[1]} std '
            f'{wanted[2]}: the queries are embedded with the checkpoint\'s')
    root = str(data['root']) if 'root' in data else os.path.dirname(os.path.abspath(path))
    return ImageList(root, [str(p) for p in data['paths']], fingerprint=str(
        data['kept_fingerprint']) if 'kept_fingerprint' in data else None), features


def refuse_changed_files(gallery, path, checkpoint, cache=None):
    """A UserError where the files of a gallery .npz are no longer the bytes it embedded
    (replaced, edited, removed): a figure would show today's files beside the similarities
    of others."""
    if gallery.fingerprint is not None and \
            file_fingerprint(gallery.root, gallery.paths, cache) != gallery.fingerprint:
        raise UserError(f'cannot draw the figure: the files under {shown(gallery.root)} are not '
                        f'those {shown(path)} embedded (some were replaced, edited or removed '
                        f'since), so its images would not be the ones ranked: embed them again: '
                        + tool_command('embed', '--ckpt', checkpoint, '--images', gallery.root,
                                       '--out', path))


def thumbnail(path, side):
    """A side x side RGB array of the image at `path` (centre square, for the figure), read as
    it was embedded: upright, 8 bits per channel."""
    with open(path, 'rb') as f:
        # Pillow's warnings were said (as notes) when the image was embedded: not again here.
        return datasets.decode_image(f.read(), side, notes=datasets.ImageNotes())


def neighbours_figure(queries, root, paths, similarities, positions, out, cell):
    """The grid: each query, then its neighbours; returns the PNG's (width, height)."""
    from .figures import NeighbourRow, draw_retrieval
    rows = []
    for query, sims, found in zip(queries, similarities.tolist(), positions.tolist()):
        try:
            neighbours = [thumbnail(os.path.join(root, paths[i]), cell) for i in found]
        except (OSError, ValueError) as err:
            raise UserError(f'cannot draw the figure: a gallery image is not readable at '
                            f'{shown(root)} ({err}); give the gallery folder, not only its '
                            f'.npz') from None
        rows.append(NeighbourRow(shown(os.path.basename(query)), thumbnail(query, cell),
                                 neighbours, sims))
    image = draw_retrieval(rows, cell=cell)
    with cli.writing(out):
        image.save(out)
    return image.size


def reader_version(npz):
    """The image reader's version an .npz of embeddings was made with (0: before it was
    stored)."""
    return int(npz['reader_version']) if 'reader_version' in npz else 0


def query_paths(given, say):
    """The query images: each path given, a folder standing for all its images (any depth,
    datasets.folders' rules, its notes said)."""
    paths = []
    for query in given:
        if os.path.isdir(query):
            listing = datasets.list_images(query)
            if not listing.paths:
                raise UserError('query folder ' + listing.empty_text(query))
            for note in listing.notes(query):
                say(note)
            paths += [os.path.join(query, path) for path in listing.paths]
        elif os.path.isfile(query):
            paths.append(query)
        else:
            raise UserError(f'query image {shown(query)} does not exist')
    return paths


def refuse_figure_over_inputs(figure, queries, gallery):
    """A UserError where the --figure file would be written over a query image, or into the
    gallery folder (over one of its images, or as a new one the next embedding reads)."""
    target = os.path.realpath(figure)
    for query in queries:
        if os.path.realpath(query) == target:
            raise UserError(f'--figure {shown(figure)} is the query image {shown(query)}, which '
                            f'the figure would be written over: give another file')
    if os.path.isdir(gallery) and os.path.commonpath(
            [target, os.path.realpath(gallery)]) == os.path.realpath(gallery):
        raise UserError(f'--figure {shown(figure)} is in the gallery folder {shown(gallery)}, '
                        f'where it would replace or join its images: write it elsewhere')


def retrieve(argv):
    args = build_parser().parse_args(argv)
    args.query = query_paths(args.query, print)
    if not os.path.exists(args.gallery):
        raise UserError(f'no gallery at {shown(args.gallery)} (a folder of images or an .npz)')
    if args.figure:
        refuse_figure_over_inputs(args.figure, args.query, args.gallery)
    device = pick_device(args.device)
    loaded = load_network(args.ckpt, device)
    reading = image_reading(args, print)
    if os.path.isdir(args.gallery):
        gallery, features = gallery_from_folder(loaded, list_folder(args.gallery), args.ckpt,
                                                device, print, reading)
    else:
        gallery, features = gallery_from_npz(loaded, args.gallery, args.ckpt, device, print)
    # (Checked once the gallery is embedded, not on its files: which are readable is known
    # only then, and the embeddings are cached for the next command.)
    if args.k > features.shape[0]:
        raise UserError(f'--k {args.k} is more than the '
                        f'{cli.plural(features.shape[0], "readable image")} of the gallery '
                        f'{shown(args.gallery)}')
    done = embed_files(loaded.net, '', args.query, loaded.image_size, loaded.mean, loaded.std,
                       device, reading=reading)
    if not done.kept:
        report_skipped(done.skipped)
        raise UserError('no query image could be read')
    for note in done.notes:
        print(note)
    queries = [args.query[i] for i in done.kept]
    similarities, positions = nearest(done.features, features, args.k)
    for query, sims, found in zip(queries, similarities.tolist(), positions.tolist()):
        print(f'query {shown(query)}')
        for rank, (sim, index) in enumerate(zip(sims, found), start=1):
            print(f'{rank:4d}  {sim:.4f}  {shown(gallery.paths[index])}')
    report_skipped(done.skipped)
    if args.figure:
        if not os.path.isdir(args.gallery):
            refuse_changed_files(gallery, args.gallery, args.ckpt, reading.cache)
        wrote = cli.wrote_or_replaced(args.figure)
        width, height = neighbours_figure(queries, gallery.root, gallery.paths, similarities,
                                          positions, args.figure, args.cell)
        print(f'{wrote} {shown(args.figure)} ({width} x {height} px)')


def main(argv=None):
    return cli.run(retrieve, argv)


if __name__ == '__main__':
    cli.exit_program(main())
