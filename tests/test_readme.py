"""The README's commands work in order from a fresh clone: every file or folder a command reads
(a checkpoint, a log, a gallery, a data root) is made by an earlier command of the README or
named in its text. No command is run here: the paths are checked, in order."""
import os
import re
import shlex

from conftest import ROOT

RUN_FILES = ('ckpt.t7', 'last.t7', 'log.jsonl', 'config.json')      # what main.py writes
READS = {'--ckpt', '--resume', '-r', '--init-from', '--log', '--gallery', '--images', '--query',
         '--data-root', '--data_root', '--eval-root'}
DEFAULT_MODEL_DIR = 'checkpoint'
DEFAULT_COMPARE_RUNS = [f'{m}:cifar10:resnet18:20' for m in ('lemniscate', 'isif', 'and',
                                                               'super-and')]
FENCE = re.compile(r'^( *)```(\w*)\n(.*?)^\1```', re.S | re.M)


def norm(path):
    return os.path.normpath(path.rstrip('/')) if path not in ('', '.') else '.'


def commands_and_prose(text):
    """(document position, kind, text) of every command in order, and the prose's inline code:
    kind 'shell' for a line of a bash block or a `$ ` line of an output block, 'python' for a
    quoted path in a python block; inline `python ...` code of the prose is a shell command."""
    found, prose = [], FENCE.sub(lambda m: ' ' * len(m.group()), text)
    for block in FENCE.finditer(text):
        language, body = block.group(2), block.group(3)
        lines = re.sub(r'\\\n\s*', ' ', body).splitlines()     # continuation lines joined
        if language == 'bash':
            found += [(block.start(), 'shell', line) for line in lines]
        elif language == 'python':
            found += [(block.start(), 'python', path) for path in
                      re.findall(r"'([^']+\.(?:t7|npz|jsonl|jpg|png))'", body)]
        else:
            found += [(block.start(), 'shell', line.strip()[2:]) for line in lines
                      if line.strip().startswith('$ ')]
    code = [(m.start(), ' '.join(m.group(1).split())) for m in re.finditer(r'`([^`]+)`', prose)]
    found += [(at, 'shell', text) for at, text in code if text.startswith(('python ', 'python3 '))]
    paths = {norm(text) for _, text in code            # (`data/`, `checkpoint/x.t7`; not `and`)
             if ' ' not in text and ('/' in text or re.search(r'\.\w+$', text))}
    return sorted(found, key=lambda item: item[0]), paths


def segments(line):
    """The simple commands of a shell line (split at && ; | and loop words), as words."""
    words = shlex.split(re.sub(r'\[[^\]]*\]', ' ', line), comments=True)     # [optional flags]
    command = []
    for word in words + [';']:
        if word in ('&&', ';', '|', 'do', 'done', 'then') or word.endswith(';'):
            if word.endswith(';') and len(word) > 1:
                command.append(word[:-1])
            if command:
                yield command
            command = []
        else:
            command.append(word)


def placeholder(value):
    return '...' in value or bool(re.fullmatch(r'[A-Z_]+(\.\w+)?', value)) or '|' in value


def flag_values(words):
    """{flag: [values]} of a command's words (a flag's values run to the next flag)."""
    values, flag = {}, None
    for word in words:
        if word.startswith('-') and not re.fullmatch(r'-?\d+(\.\d+)?', word):
            flag = word.split('=', 1)[0]
            values.setdefault(flag, [])
            if '=' in word:
                values[flag].append(word.split('=', 1)[1])
        elif flag is not None:
            values[flag].append(word)
    return values


class Checker:
    """Follows the README's commands in order: what each makes, and what each reads that
    nothing made and the text does not name."""

    def __init__(self, prose):
        self.prose, self.runs, self.folders, self.files = prose, set(), set(), set()
        self.problems, self.checked = [], []

    def known(self, path):
        path = norm(path)
        parent, name = os.path.split(path)
        return (path in self.prose or path in self.files or path in self.folders
                or path in self.runs or (parent in self.runs and name in RUN_FILES)
                or any(path.startswith(folder + '/') for folder in self.folders))

    def reads(self, path, where):
        if placeholder(path):
            return
        self.checked.append(norm(path))
        if not self.known(path):
            self.problems.append(f'{path} ({where}): made by no earlier command and not named '
                                 f'in the text')

    def shell(self, line):
        for words in segments(line):
            if words[0] == 'mkdir':
                self.folders.update(norm(w) for w in words[1:] if not w.startswith('-'))
            elif words[0] in ('python', 'python3'):
                self.python(words[1:], line)

    def python(self, words, line):
        program = ' '.join(words[:2]) if words[0] == '-m' else words[0]
        flags = flag_values(words[2:] if words[0] == '-m' else words[1:])
        model_dir = norm((flags.get('--model_dir') or flags.get('--model-dir')
                          or [DEFAULT_MODEL_DIR])[0])
        for flag, values in flags.items():
            for value in values if flag in READS else []:
                if program == 'main.py' and flag in ('--resume', '-r', '--init-from'):
                    if '/' not in value and not placeholder(value):   # as main.py looks
                        value = os.path.join(model_dir, value)
                self.reads(value, line)
        if program == 'main.py' and not {'--test_only', '-h', '--help'} & set(flags):
            self.runs.add(model_dir)
        elif program == 'experiments/compare.py':
            work_dir = norm((flags.get('--work-dir') or ['checkpoint/compare'])[0])
            self.runs.update(os.path.join(work_dir, spec.replace(':', '_'))
                             for spec in flags.get('--runs') or DEFAULT_COMPARE_RUNS)
        for flag in ('--out', '--figure'):
            self.files.update(norm(value) for value in flags.get(flag, []))


def check(text):
    found, prose = commands_and_prose(text)
    checker = Checker(prose)
    for _, kind, item in found:
        if kind == 'python':
            checker.reads(item, 'the torch.hub snippet')
        else:
            checker.shell(item)
    return checker


def test_every_path_a_readme_command_reads_is_made_earlier_or_explained():
    with open(os.path.join(ROOT, 'README.md')) as f:
        checker = check(f.read())
    assert checker.problems == []
    # What it followed: the quick run's checkpoint, the figures' compare runs, the torch.hub
    # checkpoint and the authors' file were among the paths checked.
    for path in ('checkpoint/quick/ckpt.t7', 'checkpoint/compare/and_cifar10_resnet18_20/ckpt.t7',
                 'checkpoint/compare/super-and_cifar10_resnet18_20', 'checkpoint/photos/ckpt.t7',
                 'checkpoint/ckpt_SAND.t7', 'photos', 'data'):
        assert path in checker.checked, path


def test_the_check_finds_a_path_nothing_makes():
    text = ('Run `python3 main.py --data-root data --model_dir checkpoint/quick` on `data/`.\n\n'
            '```bash\npython -m tools.visualize curve --log and super-and --published\n'
            'python -m tools.embed --ckpt checkpoint/quick/ckpt.t7 --images photos --out p.npz\n'
            'python3 main.py --resume last.t7 --test_only\n```\n')
    assert check(text).problems == [
        f'{path} (python -m tools.visualize curve --log and super-and --published): made by no '
        f'earlier command and not named in the text' for path in ('and', 'super-and')] + [
        'photos (python -m tools.embed --ckpt checkpoint/quick/ckpt.t7 --images photos --out '
        'p.npz): made by no earlier command and not named in the text',
        'checkpoint/last.t7 (python3 main.py --resume last.t7 --test_only): made by no earlier '
        'command and not named in the text']
