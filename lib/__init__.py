"""The shell around the research core: the run's options (config), its checkpoints, records
(run_log), folder and lock (run_folder), console lines, processes (distributed, stopping), data
pipelines, the loop of a run (engine) and the fast path (compile, its guards). The method itself, which knows
nothing of these, is lib/core/. Nothing here imports `main.py` or the commands in tools/."""
import importlib.util
import os
import sys

# A Python without the requirements (the system's python3 beside a virtual environment, say)
# gets one line naming what it lacks, not an import traceback: exit code 2 for the project's
# programs (main.py, tools/, bench/, experiments/), an ImportError saying the same for anyone
# importing it (torch.hub: what importing lib needs, without tqdm, which only programs use).
_PROJECT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
_program = os.path.relpath(os.path.realpath(
    getattr(sys.modules.get('__main__'), '__file__', None) or os.sep), _PROJECT)
_program = _program == 'main.py' or _program.split(os.sep)[0] in ('tools', 'bench', 'experiments')
_MISSING = [name for name, module in (('numpy', 'numpy'), ('pillow', 'PIL'), ('torch', 'torch'),
                                      ('torchvision', 'torchvision'), ('tqdm', 'tqdm'))
            if (_program or module != 'tqdm') and importlib.util.find_spec(module) is None]
if _MISSING:
    _message = (f'this Python ({sys.executable}) has no {", ".join(_MISSING)}: install the '
                f'requirements into it (pip install -r requirements.txt), or run the Python that '
                f'has them')
    if _program:
        print(f'error: {_message}', file=sys.stderr)
        raise SystemExit(2)
    raise ModuleNotFoundError(_message)
