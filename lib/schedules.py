"""Per-epoch schedules inside a round (SPEC 5.3 and 6). `epoch` counts from 0 in each round."""
from .config import (LR_DECAY_EVERY, LR_DECAY_FACTOR, LR_DECAY_START, UE_WEIGHT_EVERY,
                     UE_WEIGHT_STEP)


def learning_rate(base_lr, epoch):
    """base_lr to epoch 119, then x0.1 every 40 epochs: 0.03, 0.003 (120-159), 0.0003 (160-)."""
    if epoch < LR_DECAY_START:
        return base_lr
    return base_lr * LR_DECAY_FACTOR ** ((epoch - LR_DECAY_START) // LR_DECAY_EVERY)


def ue_weight(epoch):
    """0.2 * (epoch // 80): 0 for epochs 0-79, 0.2 for 80-159, 0.4 for 160-239."""
    return UE_WEIGHT_STEP * (epoch // UE_WEIGHT_EVERY)


def set_learning_rate(optimizer, lr):
    for group in optimizer.param_groups:
        group['lr'] = lr
