"""How long a run would take on this CPU: the estimate main.py prints before a CPU run of
more than an hour (the rates are measured ones, lib/config.py)."""
import os

from .config import (CPU_REFERENCE_CORES, CPU_SECONDS_PER_EVAL_IMAGE, CPU_SECONDS_PER_VIEW,
                     NETWORK_COST)


def cpu_hours_estimate(network, sobel, views, image_size, images_trained, test_images, epochs):
    """Rough hours of a run on this CPU (see CPU_SECONDS_PER_VIEW)."""
    scale = NETWORK_COST.get(network, 1.0) * (1.0 if sobel else 0.5) * (image_size / 32) ** 2
    scale *= CPU_REFERENCE_CORES / max(1, min(os.cpu_count() or 1, 16))
    seconds = images_trained * views * CPU_SECONDS_PER_VIEW * scale \
        + epochs * test_images * CPU_SECONDS_PER_EVAL_IMAGE * scale
    return seconds / 3600
