"""Batches as torch tensors: normalization on the trainer's device (torch imported lazily)."""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SIDE_STREAMS: dict[int, Any] = {}  # per GPU: the stream CUDA IPC slots are copied on


def to_torch(images: Any, labels: np.ndarray, device: Any, normalize: bool, mean: Sequence[float], std: Sequence[float]):
    """uint8 NHWC numpy (or a CUDA IPC `CudaSlot`) -> torch on `device`; normalization runs on
    the device. A CUDA device gets a pinned-memory copy and a non-blocking transfer."""
    import torch

    device = torch.device(device)
    if hasattr(images, "__cuda_array_interface__"):
        pixels = slot_to_torch(images)
        if pixels.device != device:
            pixels = pixels.to(device)
        targets = torch.from_numpy(labels).to(device)
        return (pixels, targets) if not normalize else (normalized(pixels, mean, std), targets)
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
    return normalized(pixels, mean, std), targets


def normalized(pixels: Any, mean: Sequence[float], std: Sequence[float]) -> Any:
    """uint8 NHWC -> float32 NCHW, (pixel / 255 - mean) / std, on the pixels' device."""
    import torch

    mean_tensor = torch.tensor(mean, device=pixels.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    std_tensor = torch.tensor(std, device=pixels.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    return (pixels.permute(0, 3, 1, 2).float() - mean_tensor) / std_tensor


def slot_to_torch(slot: Any) -> Any:
    """A CUDA IPC slot copied into a uint8 tensor of the trainer's own on the slot's GPU. The copy
    runs on a side stream and is waited for here: the slot (the server's, read by its whole
    group) may go back to the server as soon as this returns, whatever the trainer has queued,
    and the tensor outlives it (autograd may keep it)."""
    import torch

    device = torch.device("cuda", slot.device)
    side = _SIDE_STREAMS.get(slot.device)
    if side is None:
        side = _SIDE_STREAMS[slot.device] = torch.cuda.Stream(device)
    with torch.cuda.stream(side):
        pixels = torch.as_tensor(slot, device=device).clone()
    side.synchronize()
    pixels.record_stream(torch.cuda.current_stream(device))
    return pixels


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
