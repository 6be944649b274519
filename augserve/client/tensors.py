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


def tv_tensors_module() -> Any | None:
    """torchvision.tv_tensors where torchvision imports (None otherwise: plain tensors)."""
    try:
        from torchvision import tv_tensors
    except Exception:  # not installed, or built against another torch (its operators fail to load)
        return None
    return tv_tensors


def targets_to_torch(batch: Any, device: Any, tv_tensors: Any | None) -> list[dict[str, Any]]:
    """Per image of a ReceivedBatch, its targets as torchvision's detection and segmentation
    models take them: {"boxes" [M, 4] float32 XYXY, "labels" [M] int64, "keypoints" [M, K, 3]
    float32} where the batch has boxes, {"mask" [H, W] int64} where it has masks. With
    `tv_tensors` (the torchvision module) boxes are BoundingBoxes (XYXY, canvas the output
    size), keypoints KeyPoints (x, y; visibility stays in "keypoints_visibility") and the mask a
    Mask, so that torchvision v2 transforms of the trainer's own treat them right."""
    import torch

    device = torch.device(device)
    height, width = batch.images.shape[1:3]
    targets: list[dict[str, Any]] = [{} for _ in range(len(batch.images))]
    for index, target in enumerate(targets):
        if batch.boxes is not None:
            boxes = torch.from_numpy(np.array(batch.boxes[index], np.float32)).to(device)
            keypoints = torch.from_numpy(np.array(batch.keypoints[index], np.float32)).to(device)
            target["labels"] = torch.from_numpy(np.array(batch.box_labels[index], np.int64)).to(device)
            if tv_tensors is None:
                target["boxes"], target["keypoints"] = boxes, keypoints
            else:
                target["boxes"] = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width))
                target["keypoints"] = tv_tensors.KeyPoints(keypoints[..., :2], canvas_size=(height, width))
                target["keypoints_visibility"] = keypoints[..., 2]
        if batch.masks is not None:
            mask = torch.from_numpy(batch.masks[index].astype(np.int64)).to(device)
            target["mask"] = mask if tv_tensors is None else tv_tensors.Mask(mask)
    return targets
