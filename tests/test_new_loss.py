"""A loss is one entry: this file alone adds a 4th loss to lib.core.losses.LOSSES (its function,
its switch and its weight schedule), and a run trains with it. The step weighs it by its own
schedule, the schedule line, the epoch lines and log.jsonl show it and its weight, a stopped run
resumes with it, and the curve figure counts it."""
import torch

from conftest import MECHANICS, assert_same_training_state, fast_args
from lib.core.losses import LOSSES, Loss
from lib.run_log import epoch_records
from tools.figures import curve_values


def spread(tensors):
    """The squared length of the mean embedding of the step's rows (0-d): small when the
    embeddings spread over the sphere."""
    return (tensors.features.mean(0) ** 2).sum()


def spread_weight(schedule, epoch):
    return 0.5 * epoch          # 0 in a round's first epoch, 0.5 in its second


FLAGS = ['--rounds', '1', '--epochs', '2', '--pipeline', 'cpu', '--no-tensorboard', *MECHANICS]


def test_a_loss_added_as_one_entry_trains_with_its_own_weight(tiny_folder, tmp_path,
                                                              monkeypatch, run_main):
    without, added = tmp_path / 'without', tmp_path / 'added'
    for model_dir in (without, added):
        if model_dir == added:
            monkeypatch.setitem(LOSSES, 'spread', Loss(spread, 'bank', 'spread loss',
                                                       weight=spread_weight))
        code, out, err = run_main(*fast_args(tiny_folder, model_dir, *FLAGS, '--stop-after', '1'))
        assert code == 0, err
        after_first = torch.load(model_dir / 'last.t7', weights_only=True)
        code, out, err = run_main('--model_dir', model_dir, '--resume', 'last.t7')
        assert code == 0, err
        if model_dir == without:
            first_without, last_without = after_first, torch.load(model_dir / 'last.t7',
                                                                  weights_only=True)
    # Weighed 0 in the first epoch, it changes nothing there; weighed 0.5 in the second, it
    # trains (so the step sums it with its weight, and the resumed run still takes it).
    assert_same_training_state(after_first, first_without)
    last = torch.load(added / 'last.t7', weights_only=True)
    assert not torch.equal(last['npc']['memory'], last_without['npc']['memory'])
    # log.jsonl records it and each weight; the console says both; the figure counts it.
    records = epoch_records(added)
    assert [r['weights'] for r in records] == [
        {'and': 1.0, 'aug': 1.0, 'ue': 0.0, 'spread': 0.0},
        {'and': 1.0, 'aug': 1.0, 'ue': 0.2, 'spread': 0.5}]
    assert all(list(r['loss']) == ['and', 'aug', 'ue', 'spread'] for r in records)
    assert 'spread loss ' in out and '| UE weight 0.2 | spread weight 0.5 |' in out
    assert 'spread weight 0, 0.5 from epoch 1' in out
    assert curve_values(records, 'loss') == [
        sum(value * r['weights'][name] for name, value in r['loss'].items()) for r in records]
    assert curve_values(records, 'loss')[1] != sum(records[1]['loss'][n] * w for n, w in
                                                   (('and', 1), ('aug', 1), ('ue', 0.2)))
