"""The released run's kNN learning curve (docs/ALGORITHM.md section 8): the reference that
bench/compare_curve.py and the curve figure draw a run against.

CIFAR-10, ResNet18: kNN top-1 % by round (rows) at these epochs of each 200-epoch round.
"""
PUBLISHED_EPOCHS = (0, 4, 9, 19, 39, 79, 119, 159, 199)
PUBLISHED_EPOCHS_PER_ROUND = 200
PUBLISHED_TOP1 = (
    (25.80, 42.07, 48.73, 62.79, 69.64, 77.12, 79.68, 83.55, 84.54),
    (81.44, 81.40, 81.78, 80.39, 80.38, 82.85, 82.82, 86.78, 87.15),
    (84.10, 83.40, 84.29, 84.50, 84.08, 82.92, 84.72, 87.55, 88.26),
    (83.62, 85.59, 85.36, 85.64, 84.70, 85.54, 84.20, 87.97, 88.83),
    (84.94, 85.98, 85.29, 85.19, 86.14, 86.57, 86.27, 88.64, 89.03),
)
