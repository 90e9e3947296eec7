"""Progress bars for long loops: tqdm on a terminal, nothing when output goes to a file (CI,
logs), where the one-line-per-epoch summaries are the record."""
import sys


def progress_bar(iterable, total=None, desc=None, enabled=True, leave=False, unit='step',
                 initial=0):
    """`iterable`, with a tqdm bar (rate, time left) when enabled and stderr is a terminal;
    `initial`: the items done before it (a resumed epoch counts on from its step)."""
    if not enabled or not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=leave, dynamic_ncols=True,
                unit=unit, initial=initial)
