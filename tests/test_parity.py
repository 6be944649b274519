"""OpenCV and DALI (CPU) backends agree on the same plans: here the full random pipeline on every
test picture; each op alone in its class of tests/unit/test_ops.py, with these tolerances.

Tolerances, per op, in gray levels over every pixel and channel (measured on these images:
worst mean 0.13, worst max 1):
- pixel copies and nearest-neighbour sampling (flip, crop, nearest crops, erasing): identical
  (plans break nearest-neighbour ties the same way for both; see plan.NEAREST_TIE_BREAK);
- colour matrices: at most 1 (rounding of the one float transform);
- interpolating warps (rotate, shift, zoom, shear, resizes): mean <= 0.25 and max <= 2
  (bilinear weights are fixed-point in OpenCV, float in DALI);
- the full random pipeline: mean <= 0.25, max <= 4 (a one-level warp difference is then
  scaled by contrast and saturation gains of up to about 2).
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers import difference, encode, run_images, spec_of

# (mean limit, max limit, limit on the fraction of differing pixels)
EXACT = (0.0, 0, 0.0)
ROUNDING = (0.25, 1, 1.0)
INTERPOLATION = (0.25, 2, 1.0)
COMPOSED = (0.25, 4, 1.0)

FULL_PIPELINE = [
    {"rotate": {"degrees": 25}},
    {"shift": {"x": 0.1, "y": 0.1}},
    {"shear": {"degrees": 8}},
    {"zoom": {"range": [0.8, 1.25]}},
    {"flip": {"horizontal": 0.5}},
    {"random_resized_crop": {"size": [64, 80], "scale": [0.3, 1.0]}},
    {"brightness": {"factor": 0.3}},
    {"contrast": {"factor": 0.3}},
    {"saturation": {"factor": 0.4}},
    {"hue": {"degrees": 30}},
    {"grayscale": {"p": 0.2}},
    {"random_erasing": {"p": 0.5, "value": 9}},
]


def assert_close(a: np.ndarray, b: np.ndarray, tolerance: tuple[float, int, float], what: str) -> None:
    mean_limit, max_limit, fraction_limit = tolerance
    diff = difference(a, b)
    differing = float(diff.max(axis=-1).astype(bool).mean())
    assert diff.mean() <= mean_limit and diff.max() <= max_limit and differing <= fraction_limit, (
        f"{what}: mean {diff.mean():.4f} (limit {mean_limit}), max {diff.max()} (limit {max_limit}), "
        f"differing pixels {differing:.4f} (limit {fraction_limit})"
    )


@pytest.fixture(scope="module")
def encoded_images(photos, synthetic_images) -> dict[str, bytes]:
    """Every test picture as lossless PNG and as JPEG (decoders must agree on both)."""
    encoded = {}
    for name, image in {**photos, **synthetic_images}.items():
        encoded[f"{name}.png"] = encode(image, ".png")
        encoded[f"{name}.jpg"] = encode(image, ".jpg", quality=90)
    return encoded


@pytest.mark.parametrize("seed", [0, 11, 2024, 2**40 + 3])
def test_random_full_pipeline_agrees(opencv_backend, dali_backend, encoded_images, seed):
    spec = spec_of(*FULL_PIPELINE)
    data = list(encoded_images.values())
    for epoch in (0, 5):
        expected = run_images(opencv_backend, spec, data, seed=seed, epoch=epoch)
        actual = run_images(dali_backend, spec, data, seed=seed, epoch=epoch)
        assert_close(expected.images, actual.images, COMPOSED, f"seed {seed} epoch {epoch}")
