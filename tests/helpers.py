"""Small helpers the tests share: encoding pictures and running specs through a backend."""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from augserve.backends.base import Backend
from augserve.backends.batch import Batch, SourceImage, augment_batch
from augserve.core.policy import BadImagePolicy
from augserve.core.spec import AugmentSpec


def encode(image_rgb: np.ndarray, extension: str = ".png", quality: int = 95) -> bytes:
    """Encode an RGB uint8 image; PNG is lossless, so decoded pixels equal `image_rgb`."""
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if extension == ".jpg" else []
    ok, buffer = cv2.imencode(extension, cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), params)
    assert ok
    return buffer.tobytes()


def spec_of(*ops: dict, **top: object) -> AugmentSpec:
    return AugmentSpec.from_dict({"ops": list(ops), **top})


def run_images(
    backend: Backend,
    spec: AugmentSpec,
    encoded: Sequence[bytes],
    seed: int = 0,
    epoch: int = 0,
    first_id: int = 0,
    policy: BadImagePolicy = BadImagePolicy(),
) -> Batch:
    sources = [SourceImage(first_id + i, 0, f"image-{first_id + i}", data) for i, data in enumerate(encoded)]
    return augment_batch(backend, spec, seed, epoch, sources, policy)


def run_one(backend: Backend, spec: AugmentSpec, image_rgb: np.ndarray, seed: int = 0, sample_id: int = 0) -> np.ndarray:
    """Augment one losslessly encoded image and return the [H, W, 3] result."""
    batch = run_images(backend, spec, [encode(image_rgb)], seed=seed, first_id=sample_id)
    assert batch.images.shape[0] == 1, batch.skipped
    return batch.images[0]


def difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    return np.abs(a.astype(np.int16) - b.astype(np.int16))
