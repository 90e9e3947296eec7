"""Every constant of the released Super-AND run, in one place (docs/ALGORITHM.md sections 1-7).

`ALGORITHM` holds the numbers the released code's flags set, and gives main.py its defaults;
the rest are fixed inside the algorithm. Nothing else in the code hard-codes them. A "§N" in a
comment is section N of docs/ALGORITHM.md. (The data constants, crop, jitter and mean/std of
§2, live with the transforms in datasets/transforms.py.)
"""

ALGORITHM = dict(
    dataset='cifar10',          # training/evaluation data (§2)
    network='resnet18',         # two-branch ResNet18 with Sobel branch (§1)
    low_dim=128,                # D: embedding size, also the memory bank's row size
    npc_t=0.1,                  # T: temperature of the bank logits f @ memory^T / T (§3)
    npc_m=0.5,                  # m: bank momentum, memory[y] <- norm(m*memory[y] + (1-m)*f)
    ANs_select_rate=0.25,       # share of the data added as anchors per round (§4)
    ANs_size=1,                 # neighbours per anchor, the anchor itself excluded (§4)
    lr=0.03,                    # SGD learning rate at the start of every round (§6)
    momentum=0.9,               # SGD (Nesterov) momentum (§6)
    weight_decay=5e-4,          # SGD weight decay (§6)
    epochs=200,                 # epochs per round (§4)
    rounds=5,                   # rounds, round 0 without anchors (§4)
    batch_t=0.1,                # temperature of the augmentation-invariance loss (§5.2)
    batch_m=1.0,                # weight of its negative terms; 1 as released (§5.2)
    batch_size=128,             # B images per step, two views each; last one dropped (§2)
    seed=1567010775,            # the released seed (§6)
    knn_k=200,                  # kNN: neighbours voting (§7)
    knn_sigma=0.1,              # kNN: vote weight exp(similarity / sigma) (§7)
)

# Schedules inside a round (§5.3, §6), epoch counted from 0 within the round. The released,
# absolute form (--schedule released):
LR_DECAY_START = 80             # lr * 0.1 ** ((epoch - 80) // 40) from epoch 80 on
LR_DECAY_EVERY = 40             # ... so 0.03 to epoch 119, 0.003 to 159, 0.0003 after
LR_DECAY_FACTOR = 0.1
UE_WEIGHT_STEP = 0.2            # UE weight = 0.2 * (epoch // 80): 0, 0.2, 0.4
UE_WEIGHT_EVERY = 80
# The same milestones as fractions of --epochs (--schedule scaled, the default): 80, 120 and
# 160 of the released 200-epoch round.
LR_STEP_FRACTIONS = (0.6, 0.8)  # lr x0.1 from each
UE_STEP_FRACTIONS = (0.4, 0.8)  # UE weight +0.2 from each

UE_SELF_LOGIT = -10.0           # own-index logit before the UE entropy (§5.3)

# Work sizes that bound memory, not results.
CHUNK_FLOATS = 2 ** 27          # elements of one rows x N chunk of similarities or logits (512 MB
                                # float32): N x N work (kNN, entropy, neighbours) never exceeds it
