"""One command-line vocabulary for every entry point (main.py and the commands in tools/):
the parser, the validated types, the options they share, and the one wrapper that turns a
user's error into one line and exit code 2.

Every long flag takes both spellings, `--batch_size` and `--batch-size` (`spellings`).
"""
import argparse
import codecs
import difflib
import gc
import math
import os
import select
import sys
from contextlib import contextmanager

import datasets
from datasets import DataError

from .errors import UserError
from .run_folder import BEST


# ----------------------------------------------------------------------------- types
def checked(kind, test, requirement):
    """An argparse type: `kind(text)` that must pass `test`, else '<text> is not <requirement>'."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text} is not {requirement}') from None
        if not test(value):
            raise argparse.ArgumentTypeError(f'{text} is not {requirement}')
        return value
    parse.__name__ = requirement        # what argparse names in its messages
    return parse


POSITIVE_INT = checked(int, lambda v: v >= 1, 'an integer >= 1')
NON_NEGATIVE_INT = checked(int, lambda v: v >= 0, 'an integer >= 0')
# (inf and nan are no numbers here: no option of this project means anything with them)
POSITIVE_FLOAT = checked(float, lambda v: math.isfinite(v) and v > 0, 'a number > 0')
NON_NEGATIVE_FLOAT = checked(float, lambda v: math.isfinite(v) and v >= 0, 'a number >= 0')
FINITE_FLOAT = checked(float, math.isfinite, 'a finite number')
DEVICES = ('auto', 'cuda', 'cpu')


def output_file(*suffixes):
    """An argparse type: a file this command can write (missing folders are made), checked
    when the flags are read, before minutes of work: not a folder, nor under a file, nor in a
    folder that cannot be written; with `suffixes` ('.png', ...), a name ending in one (the
    format is taken from it)."""
    def parse(text):
        if os.path.isdir(text):
            raise argparse.ArgumentTypeError(f'{text} is a folder; give the name of a file '
                                             f'to write')
        if suffixes and not text.lower().endswith(suffixes):
            names = ', '.join(suffixes[:-1]) + ' or ' + suffixes[-1] if len(suffixes) > 1 \
                else suffixes[0]
            raise argparse.ArgumentTypeError(f'{text} does not end in {names} (the format '
                                             f'written)')
        folder = os.path.dirname(os.path.abspath(text))
        while not os.path.exists(folder):           # the nearest folder that is there
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder):
            raise argparse.ArgumentTypeError(f'{text} cannot be written: {folder} is a file, '
                                             f'not a folder')
        if not os.access(folder, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f'{text} cannot be written: no permission to '
                                             f'write in {folder}')
        return text
    parse.__name__ = 'a file to write'
    return parse


OUTPUT_FILE = output_file()


# ----------------------------------------------------------------------------- the parser
class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr and exit code 2 (argparse's own usage
    block is noise to someone who mistyped one flag), naming the flag meant where a typed one
    is close to it. A flag is taken only when whole: argparse's abbreviations (--epoch for
    --epochs) would let a flag this project adds later change what an old command means."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('allow_abbrev', False)
        super().__init__(*args, **kwargs)
        self._words = []

    def parse_known_args(self, args=None, namespace=None):
        self._words = list(sys.argv[1:] if args is None else args)     # (for `error`)
        return super().parse_known_args(args, namespace)

    def error(self, message):
        # A mistyped flag is named with the one meant, also where argparse first misses a
        # required flag (--image for --images: "the following arguments are required").
        unknown, said = [], False
        if message.startswith('unrecognized arguments:'):
            unknown, said = message.split(':', 1)[1].split(), True
        elif message.startswith('the following arguments are required:'):
            unknown = [word for word in self._words
                       if word.split('=')[0] not in self._option_string_actions]
        known = list(self._option_string_actions) + [   # (and the typed subcommand's)
            flag for action in self._actions if isinstance(action, argparse._SubParsersAction)
            for name, sub in action.choices.items() if name in self._words
            for flag in sub._option_string_actions]
        for word in (word.split('=')[0] for word in unknown if word.startswith('--')):
            close = difflib.get_close_matches(word, known, n=1)
            if close:
                message += f' (did you mean {close[0]}?)' if said else \
                    f' ({word}: did you mean {close[0]}?)'
                break
        raise SystemExit(one_line_error(message))


def spellings(flag, *more):
    """A long flag in both spellings, `--batch_size` and `--batch-size` (the released names
    use underscores, the rest of the world dashes), as argparse's own option strings."""
    body = flag[2:]
    return tuple(dict.fromkeys((flag, '--' + body.replace('_', '-'), '--' + body.replace('-', '_'))
                               + more))


class OnOff(argparse.BooleanOptionalAction):
    """--x and --no-x, as argparse.BooleanOptionalAction, with --no_x too: every flag takes
    both spellings, the off ones included (argparse makes --no-sobel only)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        on = [flag for flag in option_strings if flag.startswith('--')]
        made = [flag for flag in self.option_strings if flag not in option_strings]
        self.off = list(dict.fromkeys([f'--no{sep}{flag[2:].replace(other, sep)}'
                                       for sep, other in (('-', '_'), ('_', '-'))
                                       for flag in on] + made))     # (argparse's: --no-aug_loss)
        self.option_strings = list(dict.fromkeys(option_strings)) + self.off

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, option_string not in self.off)

    def format_usage(self):
        return f'{self.option_strings[0]} | {self.off[0]}'     # (the help lists them all)


def one_line_error(message, label='error'):
    """Print `error: message` on stderr; returns the exit code 2."""
    print(f'{label}: {message}', file=sys.stderr, flush=True)
    return 2


def plural(count, word, plural_word=None):
    """'1 round', '2 rounds'; `plural_word` where adding an s is wrong ('classes')."""
    return f'{count} {word if count == 1 else plural_word or word + "s"}'


@contextmanager
def writing(path):
    """For a block that writes `path`, a file the user named: its folder made first, and an
    OSError as one line (a UserError: exit code 2): a full disk, a read-only mount, a folder
    that takes no files (/proc), which the checks of `output_file` cannot all see before."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        yield
    except OSError as err:
        raise UserError(f'cannot write {datasets.shown(path)}: {err.strerror or err}') from None


def wrote_or_replaced(path):
    """'replaced' where `path` already exists, else 'wrote': asked before a command writes its
    file, for the line that names it (a file written over is said so)."""
    return 'replaced' if os.path.exists(path) else 'wrote'


def _escape_bytes(err):
    """A codec error handler: the undecodable bytes of a file name (lone surrogates
    U+DC80..U+DCFF, PEP 383) as \\xNN, anything else unencodable as \\uNNNN."""
    if not isinstance(err, UnicodeEncodeError):
        raise err
    text = err.object[err.start:err.end]
    return ''.join(f'\\x{ord(c) - 0xDC00:02x}' if 0xDC80 <= ord(c) <= 0xDCFF
                   else f'\\u{ord(c):04x}' for c in text), err.end


ESCAPE_BYTES = 'superand-escape-bytes'
codecs.register_error(ESCAPE_BYTES, _escape_bytes)


def parse_first(parse, interrupted='interrupted'):
    """For an entry point run as a program, before its heavy imports: `parse()` its flags, so
    that --help and a mistyped flag are answered at once (importing torch takes seconds), then
    import torchvision (and torch) here, where a pair that does not match is said in one line
    with exit code 2 rather than in a traceback, and so is a Ctrl-C in those seconds (the line
    `interrupted`, exit code 130). The program parses its flags again after."""
    parse()                     # exits on --help (0) or a flag error (2, one line)
    try:
        datasets.import_torchvision()
    except DataError as err:
        sys.exit(one_line_error(err))
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr, flush=True)
        sys.exit(130)


def exit_program(code):
    """sys.exit(code) without the shutdown's garbage collections: how main.py and the tools
    end, as a process's last call.

    Python's shutdown runs its cyclic garbage collector, more than once, over every object
    that torch and its compiler (dynamo, sympy) made at import: 0.8 s after a tiny run on 2
    cores (Python 3.11, PyTorch 2.14.1; bench/shutdown.py). Here one collection finalises
    what is garbage now, and gc.freeze() keeps the rest out of the shutdown's collections.
    atexit handlers still run and stdout and stderr are still flushed, but no object alive
    now is finalised, module globals included (a module's functions hold its dict in a
    cycle): a file left open would lose what it had buffered. Python does not promise to
    finalise them either, and every file here is closed by a `with` or a `finally`."""
    try:
        gc.collect()
        gc.freeze()
    except KeyboardInterrupt:       # a Ctrl-C this late: the run's own exit code stands
        pass
    sys.exit(code)


def run(main_body, argv=None, error_label='error', interrupted='interrupted'):
    """Call `main_body(argv)`; a user's error (UserError, DataError) prints one line and gives
    exit code 2, Ctrl-C gives 130 and one line (`interrupted`), no traceback."""
    # A file name that is not valid UTF-8 (Latin-1 bytes, say) reaches Python with escaped
    # bytes (PEP 383); printing one must show its bytes, as datasets.shown does, not end the
    # run or print it one way on stdout and another on stderr.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, 'reconfigure'):
            stream.reconfigure(errors=ESCAPE_BYTES)
    try:
        return main_body(argv) or 0
    except SystemExit as exit_:       # --help (0), or a flag error already printed (2)
        return exit_.code
    except (UserError, DataError) as err:
        return one_line_error(err, error_label)
    except KeyboardInterrupt as err:      # its message, where the raiser gave one
        print(str(err) or interrupted, file=sys.stderr, flush=True)
        return getattr(err, 'exit_code', 130)
    except BrokenPipeError:
        if not stdout_is_closed():
            raise                   # another pipe (a worker's, a socket's): a bug to show
        # The reader went away (`| head`): no traceback, and no second one when Python flushes
        # stdout at exit (the Python docs' recipe: stdout onto /dev/null).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def stdout_is_closed():
    """Whether stdout is a pipe whose reader has gone away (poll says POLLERR)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):   # no file behind stdout, no poll
        return False


# ----------------------------------------------------------------------------- shared options
SUBSET_HELP = 'seeded random subsets of N training and N test images'
DEVICE_HELP = 'auto = CUDA when present'


def add_data_options(p):
    """--data-root, --subset and --device of the analysis commands, which read the data the
    checkpoint was trained on (their defaults: the checkpoint's)."""
    p.add_argument(*spellings('--data-root'), dest='data_root', default=None, metavar='DIR',
                   help='where the checkpoint\'s training data is, when it is no longer where '
                        'the run read it: torchvision\'s files, an image-folder tree '
                        'train/<class>/*, test/<class>/*, or the folder of unlabeled images '
                        '(default: the checkpoint\'s)')
    p.add_argument('--subset', default=None, type=POSITIVE_INT, metavar='N',
                   help=SUBSET_HELP + ' (default: the checkpoint\'s)')
    add_device_option(p)


def add_device_option(p):
    p.add_argument('--device', default='auto', choices=DEVICES,
                   help=DEVICE_HELP + ' (default: %(default)s)')


def add_reading_options(p):
    """--workers, --cache and --cache-dir, as main.py has them, for the commands that read
    image files."""
    p.add_argument('--workers', type=NON_NEGATIVE_INT, default=None, metavar='N',
                   help='processes that decode image files not in the image cache (default: '
                        'every core; 0: this process only)')
    p.add_argument('--cache', action=OnOff, default=True,
                   help='keep decoded images in the image cache, so the next command on the '
                        'same files maps them instead of decoding them again (default: on)')
    p.add_argument(*spellings('--cache-dir'), dest='cache_dir', default=None, metavar='DIR',
                   help='the image cache\'s folder (default: $XDG_CACHE_HOME/super-and, else '
                        '~/.cache/super-and)')


def add_quiet_option(p):
    p.add_argument('--quiet', action='store_true',
                   help='no progress bars (shown on a terminal only) and no start line: only '
                        'the result and what went wrong')


def checkpoint_file(text):
    """An argparse type: a checkpoint file as typed, or a run's folder meaning its ckpt.t7
    (its best epoch), as main.py's --resume FOLDER --test_only reads it."""
    return os.path.join(text, BEST) if os.path.isdir(text) else text


checkpoint_file.__name__ = 'a checkpoint'


def add_checkpoint_option(p, many=False):
    p.add_argument('--ckpt', required=True, nargs='+' if many else None, metavar='PATH',
                   type=checkpoint_file,
                   help='checkpoint file' + ('s' if many else '') + ' (ckpt.t7, last.t7, or a '
                        'released file), or a run\'s folder for its ckpt.t7')


FEATURES_HELP = ('training side of the kNN: the memory bank (as released) or the network\'s '
                 'embeddings of the training images (test transform, eval mode); runs without '
                 'a bank always use network')


def add_features_option(p, flag='--knn-features', default='bank', help=None):
    """The kNN's training side, in one word everywhere: bank or network (--knn-features as in
    main.py is accepted wherever the flag is called --features). `help` replaces the kNN's
    text where the flag means something else."""
    names = spellings('--knn-features') if flag == '--knn-features' else \
        (flag,) + spellings('--knn-features')
    p.add_argument(*names, dest='knn_features', default=default, choices=('bank', 'network'),
                   help=(help or FEATURES_HELP) + ' (default: %(default)s)')
