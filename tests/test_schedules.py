"""The lr and UE-weight schedules: the released absolute form, and the default scaled to the
round's length (milestones at 0.4, 0.6 and 0.8 of --epochs)."""
import pytest

from lib.console import schedule_line
from lib.core.schedules import Schedule


def released_lr(epoch, base=0.03):
    """The released code's rule, written out: lr * 0.1 ** ((epoch - 80) // 40) from 80 on."""
    return base if epoch < 80 else base * 0.1 ** ((epoch - 80) // 40)


def released_ue(epoch):
    return 0.2 * (epoch // 80)


@pytest.mark.parametrize('kind', ['scaled', 'released'])
def test_both_kinds_are_the_released_schedule_at_200_epochs(kind):
    schedule = Schedule(200, kind)
    for epoch in range(200):
        assert schedule.learning_rate(0.03, epoch) == pytest.approx(released_lr(epoch)), epoch
        assert schedule.ue_weight(epoch) == pytest.approx(released_ue(epoch)), epoch


@pytest.mark.parametrize('epoch, lr, weight', [
    (0, 0.03, 0.0), (79, 0.03, 0.0), (80, 0.03, 0.2), (119, 0.03, 0.2), (120, 0.003, 0.2),
    (159, 0.003, 0.2), (160, 0.0003, 0.4), (199, 0.0003, 0.4)])
def test_boundaries_at_200_epochs(epoch, lr, weight):
    schedule = Schedule(200)
    assert schedule.learning_rate(0.03, epoch) == pytest.approx(lr)
    assert schedule.ue_weight(epoch) == pytest.approx(weight)


@pytest.mark.parametrize('epochs, lr_steps, ue_steps', [
    (10, [6, 8], [4, 8]), (20, [12, 16], [8, 16]), (40, [24, 32], [16, 32]),
    (5, [3, 4], [2, 4]), (1000, [600, 800], [400, 800])])
def test_scaled_milestones_follow_the_round(epochs, lr_steps, ue_steps):
    schedule = Schedule(epochs, 'scaled')
    assert schedule.lr_steps == lr_steps and schedule.ue_steps == ue_steps
    weights = [schedule.ue_weight(e) for e in range(epochs)]
    want = [0.2 * sum(e >= s for s in ue_steps) for e in range(epochs)]
    assert weights == pytest.approx(want)
    assert any(weights)


def test_released_schedule_in_a_short_round_never_weights_the_ue_loss():
    schedule = Schedule(10, 'released')
    assert all(schedule.ue_weight(e) == 0 for e in range(10))
    assert all(schedule.learning_rate(0.03, e) == 0.03 for e in range(10))
    assert 'UE weight 0 throughout' in schedule_line(schedule, 0.03, ['and', 'aug', 'ue'])


def test_describe_names_the_epochs():
    text = schedule_line(Schedule(10), 0.03, ['and', 'aug', 'ue'])
    assert 'lr 0.03, 0.003 from epoch 6, 0.0003 from epoch 8' in text
    assert 'UE weight 0, 0.2 from epoch 4, 0.4 from epoch 8' in text
