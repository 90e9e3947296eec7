"""The import graph keeps its layers, read from the source with `ast` (nothing is imported):

1. main.py, tools/, bench/, experiments/, hubconf.py: the commands, on top;
2. lib/: the shell (configuration, checkpoints, records, processes, the fast path);
3. lib/core/: the research core, which imports nothing of the project but itself;
4. models/ and datasets/, which know nothing of training.

No file imports a layer above its own."""
import ast
import os

from conftest import ROOT

LAYERS = {'commands': 1, 'shell': 2, 'core': 3, 'base': 4}


def module_of(path):
    """'lib.core.knn' of 'lib/core/knn.py' (a package's __init__ is the package)."""
    parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def layer_of(module):
    top = module.split('.')[0]
    if module.startswith('lib.core'):
        return 'core'
    if top == 'lib':
        return 'shell'
    if top in ('models', 'datasets'):
        return 'base'
    return 'commands'


def source_files():
    for folder in ('lib', 'models', 'datasets', 'tools', 'bench', 'experiments'):
        for parent, _, files in os.walk(os.path.join(ROOT, folder)):
            yield from (os.path.join(parent, f) for f in sorted(files) if f.endswith('.py'))
    for name in ('main.py', 'hubconf.py'):
        yield os.path.join(ROOT, name)


PROJECT = ('lib', 'models', 'datasets', 'tools', 'main', 'hubconf', 'bench', 'experiments')


def imports_of(path):
    """The project modules `path` imports (relative imports resolved), sorted."""
    module = module_of(path)
    package = module if path.endswith('__init__.py') else module.rsplit('.', 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.')
                base = base[:len(base) - node.level + 1]
                target = '.'.join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names = [target] + [f'{target}.{alias.name}' for alias in node.names]
        else:
            continue
        for name in names:
            if name.split('.')[0] in PROJECT:
                found.add(name)
    # Keep the modules (not the names inside them) that exist as files or packages.
    modules = set()
    for name in found:
        parts = name.split('.')
        while parts:
            candidate = os.path.join(ROOT, *parts)
            if os.path.isfile(candidate + '.py') or os.path.isdir(candidate):
                modules.add('.'.join(parts))
                break
            parts = parts[:-1]
    return sorted(modules - {module})


def import_graph():
    """{module: [project modules it imports]} of every source file."""
    return {module_of(path): imports_of(path) for path in source_files()}


def test_no_import_runs_up_a_layer():
    upward = [f'{module} -> {target}' for module, targets in import_graph().items()
              for target in targets
              if LAYERS[layer_of(target)] < LAYERS[layer_of(module)]]
    assert upward == []


def test_the_core_imports_nothing_of_the_rest():
    outside = [f'{module} -> {target}' for module, targets in import_graph().items()
               if layer_of(module) == 'core' for target in targets
               if layer_of(target) != 'core']
    assert outside == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The graph reader finds a relative import of the shell from the core."""
    core = tmp_path / 'lib' / 'core'
    core.mkdir(parents=True)
    (tmp_path / 'lib' / '__init__.py').write_text('')
    (core / '__init__.py').write_text('')
    (core / 'bad.py').write_text('from ..checkpoint import load\nimport torch\n')
    (tmp_path / 'lib' / 'checkpoint.py').write_text('')
    monkeypatch.setitem(globals(), 'ROOT', str(tmp_path))
    assert imports_of(str(core / 'bad.py')) == ['lib.checkpoint']
    assert layer_of('lib.checkpoint') == 'shell' and layer_of('lib.core.bad') == 'core'

