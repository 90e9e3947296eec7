"""Every constant of the released Super-AND run, in one place (docs/ALGORITHM.md sections 1-7).

`main.py` takes its flag defaults from here; nothing else in the code hard-codes these numbers.
A "§N" in a comment is section N of docs/ALGORITHM.md.
"""

DEFAULTS = dict(
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
)

# How a run is done rather than what it computes: `main.py`'s other flag defaults, and what
# the scripts (bench/, experiments/, lib.visualize, ...) start from.
RUN_DEFAULTS = dict(
    method='super-and',         # recipe of components (lib/recipes.py)
    image_size=32,              # crop / test side (other than 32 only for folder data)
    stem='auto',                # network stem: cifar up to 64 px, imagenet above
    mean=None, std=None,        # normalisation: the dataset's (computed for folder data)
    data_root='./data',         # torchvision files or an image-folder tree
    model_dir='checkpoint/',    # checkpoints and the JSON-lines log
    log_dir='runs',             # TensorBoard event files, runs/<name>/
    name=None,                  # run name for TensorBoard (default: method-dataset-network-time)
    tensorboard=True,           # write TensorBoard events (when tensorboardX is installed)
    quiet=False,                # no progress bars and no per-epoch lines
    device='auto',              # CUDA when present
    pipeline='auto',            # gpu (device tensors) on CUDA, cpu (torchvision loader) otherwise
    precision='auto',           # bf16 autocast on CUDA, fp32 on the CPU
    compile='auto',             # reduce-overhead (CUDA graphs) on CUDA, none on the CPU
    workers=2,                  # loader processes of the cpu pipeline (released: 2)
    subset=None,                # train/test on seeded random subsets of this many images
    knn_k=200,                  # kNN neighbours voting (§7)
    knn_sigma=0.1,              # kNN vote weight exp(similarity / sigma) (§7)
    knn_features='bank',        # kNN training side: the bank (as released) or 'network'
                                # (the training images embedded by the network)
    eval_precision='fp32',      # kNN embeddings in float32 on every device (bf16: faster)
    eval_root=None,             # a labelled tree to evaluate runs on unlabeled images with
    schedule='scaled',          # lr and UE milestones at 0.4/0.6/0.8 of --epochs, or 'released'
    init_from=None,             # start a run from the weights, bank and anchors of a checkpoint
    sync_bn=False,              # BatchNorm statistics over the global batch of all processes
    resume='', test_only=False, stop_after=None,
)

# Schedules inside a round (docs/ALGORITHM.md sections 5.3 and 6), epoch counted from 0
# within the round. The released, absolute form (--schedule released):
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

# Weighted kNN evaluation (§7).
KNN_K = RUN_DEFAULTS['knn_k']
KNN_SIGMA = RUN_DEFAULTS['knn_sigma']
TRAIN_LOG_EVERY = 50            # training steps between sampled loss records (TensorBoard)
CHECK_EVERY = 20                # steps between the reads that catch a NaN loss or (across
                                # ranks) a stop request: one small device sync, not one per step

# Data constants (crop, jitter, mean/std: §2) live with the transforms, in
# datasets/transforms.py.
TEST_BATCH_SIZE = 100           # evaluation batch, as released (no effect on the result)
EVAL_BATCH_GPU = 1000           # evaluation batch of the GPU pipeline (fewer launches)

# Statistics of the bank reported by runs without labels (entropy, nearest-entry cosine), on
# this many entries drawn once with the seed: a few hundredths of a second per epoch.
BANK_STATS_ROWS = 1024

# The CPU time estimate main.py prints for long CPU runs: seconds of one training view (forward
# + losses + backward + SGD, batch 128 x 2 views) and of one evaluation image, for ResNet18 with
# the Sobel branch at 32 px, measured with bench/epoch_speed.py on 2 cores of this project's
# development machine (PyTorch 2.14.1); other networks and sizes scaled by their relative cost.
# An estimate, not a promise: other CPUs differ by a factor of several.
CPU_SECONDS_PER_VIEW = 0.10
CPU_SECONDS_PER_EVAL_IMAGE = 0.026
CPU_REFERENCE_CORES = 2
NETWORK_COST = {'resnet18': 1.0, 'resnet50': 2.3, 'resnet101': 4.4, 'alexnet': 0.15}


# Figures (lib.figures, and the defaults of lib.visualize's flags).
DEFAULT_OUT_DIR = 'fig'         # where the PNGs go
DEFAULT_QUERIES = 5             # test images drawn as queries
DEFAULT_TOPK = 10               # retrievals per query
CELL = 64                       # retrieval grid: image side after nearest-neighbour upscaling
FRAME = 4                       # retrieval grid: frame width around every image
LABEL_WIDTH = 120               # retrieval grid: the label strip on the left
TSNE_PERPLEXITY = 30.0          # scikit-learn's default; clipped below the number of points

# Work sizes that bound memory, not results.
CHUNK_FLOATS = 2 ** 27          # elements of one rows x N chunk of similarities or logits (512 MB
                                # float32): N x N work (kNN, entropy, neighbours) never exceeds it

# The released run's kNN top-1 % (§8, CIFAR-10, ResNet18), by round (rows) at these epochs
# of each 200-epoch round: the reference curve of bench/compare_curve.py and lib.visualize.
PUBLISHED_EPOCHS = (0, 4, 9, 19, 39, 79, 119, 159, 199)
PUBLISHED_EPOCHS_PER_ROUND = 200
PUBLISHED_TOP1 = (
    (25.80, 42.07, 48.73, 62.79, 69.64, 77.12, 79.68, 83.55, 84.54),
    (81.44, 81.40, 81.78, 80.39, 80.38, 82.85, 82.82, 86.78, 87.15),
    (84.10, 83.40, 84.29, 84.50, 84.08, 82.92, 84.72, 87.55, 88.26),
    (83.62, 85.59, 85.36, 85.64, 84.70, 85.54, 84.20, 87.97, 88.83),
    (84.94, 85.98, 85.29, 85.19, 86.14, 86.57, 86.27, 88.64, 89.03),
)
