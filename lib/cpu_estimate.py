"""How long a run would take on this CPU: the estimate main.py prints before a CPU run of
more than an hour (the rates are measured ones, below)."""
import os

# Seconds of one training view (forward + losses + backward + SGD, batch 128 x 2 views) and of
# one evaluation image, for ResNet18 with the Sobel branch at 32 px, measured with
# bench/epoch_speed.py on 2 cores of this project's development machine (PyTorch 2.14.1); other
# networks and sizes scaled by their relative cost. An estimate, not a promise: other CPUs differ
# by a factor of several.
CPU_SECONDS_PER_VIEW = 0.10
CPU_SECONDS_PER_EVAL_IMAGE = 0.026
CPU_REFERENCE_CORES = 2
NETWORK_COST = {'resnet18': 1.0, 'resnet50': 2.3, 'resnet101': 4.4, 'alexnet': 0.15}


def cpu_hours_estimate(network, sobel, views, image_size, images_trained, test_images, epochs):
    """Rough hours of a run on this CPU (see CPU_SECONDS_PER_VIEW)."""
    scale = NETWORK_COST.get(network, 1.0) * (1.0 if sobel else 0.5) * (image_size / 32) ** 2
    scale *= CPU_REFERENCE_CORES / max(1, min(os.cpu_count() or 1, 16))
    seconds = images_trained * views * CPU_SECONDS_PER_VIEW * scale \
        + epochs * test_images * CPU_SECONDS_PER_EVAL_IMAGE * scale
    return seconds / 3600
