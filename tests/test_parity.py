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
  scaled by contrast and saturation gains of up to about 2);
- pixel steps alone: identical for the lookup tables (posterize, solarize, invert,
  autocontrast, equalize), at most 1 for the filters (sharpness, blur);
- policies alone: mean <= 0.02 with at most 2 % of pixels differing, by any amount (a pixel
  step can magnify a one-level warp difference: solarize flips a value across its threshold,
  posterize across a step, equalize stretches dense levels; measured worst: mean 0.003, max 16,
  0.9 % of pixels);
- a pipeline with a scaling crop before the policies: mean <= 0.25 as for warps, and at most
  1 % of pixels more than 2 levels apart (measured worst over six seeds: mean 0.045, 0.6 %).
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
POLICY_PARITY = (0.02, 255, 0.02)
# (mean limit, limit on the fraction of pixels more than 2 levels apart)
MAGNIFIED = (0.25, 0.01)

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
POLICY_PIPELINE = [
    {"random_resized_crop": {"size": [64, 80], "scale": [0.3, 1.0]}},
    {"flip": {"horizontal": 0.5}},
    {"rand_augment": {"num_ops": 2, "magnitude": 9}},
    {"trivial_augment_wide": {}},
    {"sharpness": {"factor": [0.5, 2.0], "p": 0.5}},
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


@pytest.mark.parametrize("seed", [0, 2024])
def test_random_policy_pipeline_agrees(opencv_backend, dali_backend, encoded_images, seed):
    """A crop, RandAugment(2, 9), TrivialAugment, sharpness and erasing: warp, colour matrix and
    pixel steps in one pipeline."""
    spec = spec_of(*POLICY_PIPELINE)
    data = list(encoded_images.values())
    expected = run_images(opencv_backend, spec, data, seed=seed)
    actual = run_images(dali_backend, spec, data, seed=seed)
    diff = difference(expected.images, actual.images)
    far = float((diff.max(axis=-1) > 2).mean())
    mean_limit, far_limit = MAGNIFIED
    assert diff.mean() <= mean_limit and far <= far_limit, (
        f"seed {seed}: mean {diff.mean():.4f} (limit {mean_limit}), pixels more than 2 levels "
        f"apart {far:.4f} (limit {far_limit})"
    )
