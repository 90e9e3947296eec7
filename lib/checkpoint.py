"""Checkpoints: the released layout, plus what resuming needs (SPEC 1 and 7).

`ckpt.t7` (best kNN) keeps the released keys `net npc ANs_discovery acc round epoch`, so the
released code and ours read each other's files. `last.t7`, written after every epoch, adds
`optimizer`, `rng`, `next` (where to continue), `best` and `config`. Every write goes to a
temporary file that is then renamed over the old one: a run killed mid-write leaves the
previous checkpoint intact.
"""
import os
import re
import shutil

import torch

from .errors import UserError

PREFIXES = ('module.', '_orig_mod.')   # added by DataParallel/DDP and by torch.compile


def save_atomic(state, path):
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def resolve_path(model_dir, name):
    """`model_dir/name` as released; a path that exists as given is taken as it is."""
    joined = os.path.join(model_dir, name)
    if not os.path.exists(joined) and os.path.isfile(name):
        return name
    return joined


def load(path):
    """The checkpoint dict at `path`, or a UserError saying what is wrong with it."""
    if not os.path.isfile(path):
        raise UserError(f'no checkpoint at {path}')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f'cannot read checkpoint {path}: damaged or not a PyTorch file '
                        f'({reason})') from None
    if not isinstance(state, dict) or not {'net', 'npc'} <= set(state):
        keys = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise UserError(f'{path} is not a Super-AND checkpoint (needs keys net and npc; '
                        f'has {keys})')
    return state


def clean_state_dict(state_dict):
    """Drop `module.` / `_orig_mod.` prefixes, so wrapped and plain networks load alike."""
    cleaned = {}
    for key, value in state_dict.items():
        for prefix in PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    return cleaned


def restore_model(state, path, net, bank, anchors):
    """Load network, bank and anchors from a checkpoint, with clear errors on mismatch."""
    memory = state['npc'].get('memory')
    if bank is not None:
        if memory is None:
            raise UserError(f'checkpoint {path} holds no memory bank (npc.memory)')
        if tuple(memory.shape) != tuple(bank.memory.shape):
            raise UserError(
                f'checkpoint {path} has a bank of {memory.shape[0]} x {memory.shape[1]}, but '
                f'this run needs {bank.memory.shape[0]} x {bank.memory.shape[1]} (training '
                f'images x --low_dim): another dataset, --subset or --low_dim?')
        bank.load_state_dict(state['npc'])
    try:
        net.load_state_dict(clean_state_dict(state['net']))
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise UserError(f'checkpoint {path} does not fit this network '
                        f'({" ".join(first[:2])[:300]})') from None
    if anchors is not None and state.get('ANs_discovery'):
        positions = state['ANs_discovery'].get('position')
        if positions is not None and positions.shape[0] != anchors.num_entries:
            raise UserError(f'checkpoint {path} has anchors for {positions.shape[0]} images, '
                            f'this run has {anchors.num_entries}')
        anchors.load_state_dict(state['ANs_discovery'])


def model_state(net, bank, anchors, acc, round_index, epoch):
    """The released checkpoint layout."""
    return {
        'net': clean_state_dict(net.state_dict()),
        'npc': bank.state_dict() if bank is not None else {},
        'ANs_discovery': anchors.state_dict() if anchors is not None else {},
        'acc': acc,
        'round': round_index,
        'epoch': epoch,
    }


def rng_state():
    state = {'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    if state and 'torch' in state:
        torch.set_rng_state(state['torch'])
    if state and 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def estimated_size(net, bank, anchors):
    """Bytes of a last.t7: the network, one SGD momentum buffer per weight, bank, anchors."""
    weights = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    trainable = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
    extra = sum(t.numel() * t.element_size() for module in (bank, anchors) if module is not None
                for t in module.state_dict().values())
    return weights + trainable + extra


def prepare_model_dir(model_dir, needed_bytes):
    """Create `model_dir`, check that it can be written and holds `needed_bytes` more, and
    remove temporaries a killed run left behind: at start-up, not after hours of training."""
    try:
        os.makedirs(model_dir, exist_ok=True)
        probe = os.path.join(model_dir, f'.write-test-{os.getpid()}')
        with open(probe, 'wb') as f:
            f.write(b'0')
        os.remove(probe)
    except OSError as err:
        raise UserError(f'--model_dir {model_dir} cannot be written: '
                        f'{err.strerror or err}') from None
    free = shutil.disk_usage(model_dir).free
    if free < needed_bytes:
        raise UserError(f'--model_dir {model_dir} has {free / 2**20:.0f} MiB free, but the '
                        f'checkpoints need about {needed_bytes / 2**20:.0f} MiB (last.t7, '
                        f'ckpt.t7 and a temporary copy while writing)')
    for name in os.listdir(model_dir):
        if re.fullmatch(r'.+\.t7\.tmp\d+', name):
            os.remove(os.path.join(model_dir, name))
