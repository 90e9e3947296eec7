"""Progress bars for long loops: tqdm on a terminal, nothing when output goes to a file (CI,
logs), where the one-line-per-epoch summaries are the record."""
import sys


def progress_bar(iterable, total=None, desc=None, enabled=True, leave=False, unit='step'):
    """`iterable`, with a tqdm bar (rate, time left) when enabled and stderr is a terminal."""
    if not enabled or not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=leave, dynamic_ncols=True,
                unit=unit)
