"""Every constant of the released Super-AND run, in one place (SPEC sections 1-7).

`main.py` takes its flag defaults from here; nothing else in the code hard-codes these numbers.
"""

DEFAULTS = dict(
    dataset='cifar10',          # training/evaluation data (SPEC 2)
    network='resnet18',         # two-branch ResNet18 with Sobel branch (SPEC 1)
    low_dim=128,                # D: embedding size, also the memory bank's row size
    npc_t=0.1,                  # T: temperature of the bank logits f @ memory^T / T (SPEC 3)
    npc_m=0.5,                  # m: bank momentum, memory[y] <- norm(m*memory[y] + (1-m)*f)
    ANs_select_rate=0.25,       # share of the data added as anchors per round (SPEC 4)
    ANs_size=1,                 # neighbours per anchor, the anchor itself excluded (SPEC 4)
    lr=0.03,                    # SGD learning rate at the start of every round (SPEC 6)
    momentum=0.9,               # SGD (Nesterov) momentum (SPEC 6)
    weight_decay=5e-4,          # SGD weight decay (SPEC 6)
    epochs=200,                 # epochs per round (SPEC 4)
    rounds=5,                   # rounds, round 0 without anchors (SPEC 4)
    batch_t=0.1,                # temperature of the augmentation-invariance loss (SPEC 5.2)
    batch_m=1.0,                # weight of its negative terms; 1 as released (SPEC 5.2)
    batch_size=128,             # B images per step, two views each; last one dropped (SPEC 2)
    seed=1567010775,            # the released seed (SPEC 6)
)

# Schedules inside a round (SPEC 5.3 and 6), epoch counted from 0 within the round.
LR_DECAY_START = 80             # lr * 0.1 ** ((epoch - 80) // 40) from epoch 80 on
LR_DECAY_EVERY = 40             # ... so 0.03 to epoch 119, 0.003 to 159, 0.0003 after
LR_DECAY_FACTOR = 0.1
UE_WEIGHT_STEP = 0.2            # UE weight = 0.2 * (epoch // 80): 0, 0.2, 0.4
UE_WEIGHT_EVERY = 80
UE_SELF_LOGIT = -10.0           # own-index logit before the UE entropy (SPEC 5.3)

# Weighted kNN evaluation (SPEC 7).
KNN_K = 200                     # neighbours voting
KNN_SIGMA = 0.1                 # vote weight exp(similarity / sigma)

# Data constants (crop, jitter, mean/std: SPEC 2) live with the transforms, in
# datasets/transforms.py.
TEST_BATCH_SIZE = 100           # evaluation batch, as released (no effect on the result)
EVAL_BATCH_GPU = 1000           # evaluation batch of the GPU pipeline (fewer launches)

# Work sizes that bound memory, not results.
CHUNK_FLOATS = 2 ** 27          # elements of one rows x N chunk of similarities or logits (512 MB
                                # float32): N x N work (kNN, entropy, neighbours) never exceeds it
