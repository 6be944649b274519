"""Batches as torch tensors: normalization on the trainer's device (torch imported lazily)."""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_torch(images: np.ndarray, labels: np.ndarray, device: Any, normalize: bool, mean: Sequence[float], std: Sequence[float]):
    """uint8 NHWC numpy -> torch on `device`; normalization runs on the device. A CUDA device
    gets a pinned-memory copy and a non-blocking transfer."""
    import torch

    device = torch.device(device)
    if not images.flags.writeable and device.type == "cpu" and not normalize:
        images = images.copy()  # a uint8 tensor handed to the caller must be writable
    # Otherwise a read-only array (in-band: the message's bytes; shared memory: a read-only
    # mapping) is only read: the CUDA transfer and the normalization both make new tensors.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        pixels = torch.from_numpy(images)
    targets = torch.from_numpy(labels)
    if device.type == "cuda":
        pixels = pixels.pin_memory().to(device, non_blocking=True)
        targets = targets.pin_memory().to(device, non_blocking=True)
    if not normalize:
        return pixels, targets
    mean_tensor = torch.tensor(mean, device=device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    std_tensor = torch.tensor(std, device=device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    floats = pixels.permute(0, 3, 1, 2).float()
    return (floats - mean_tensor) / std_tensor, targets
