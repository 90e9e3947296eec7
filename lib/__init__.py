"""The Super-AND engine: memory bank, neighbourhoods, losses, kNN, schedules, checkpoints,
augmentation and the training loop. Nothing here imports `main.py`."""
