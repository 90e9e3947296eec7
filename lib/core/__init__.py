"""The research core: Super-AND's algorithm and nothing else (docs/ALGORITHM.md).

- `constants`: every number of the released run;
- `memory_bank`: the non-parametric classifier, one embedding per image (section 3);
- `neighbourhoods`: the bank's entropies and the anchor neighbourhoods of each round (4);
- `losses`: the AND, augmentation-invariance and UE losses, by name (5);
- `step`: one training step, `train_step` (3, 5, 6);
- `schedules`: the learning rate and UE weight inside a round (6);
- `recipes`: Super-AND and its ancestors as components;
- `knn`: the weighted kNN evaluation and every nearest-neighbour search (7).

The networks are `models/`. The core imports nothing of the rest of the project (the run's
configuration, checkpoints, logs, processes and the fast path are the shell around it, in
lib/), only PyTorch and itself.
"""
