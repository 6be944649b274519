"""What each op does to a known picture, on both backends."""

from __future__ import annotations

import math

import numpy as np
import pytest

from augserve.core.plan import make_plan
from helpers import run_one, spec_of


def disc_image(size: int = 101, offset: tuple[int, int] = (30, 0), radius: int = 4) -> np.ndarray:
    """Black square with a white disc `offset` (dx, dy) pixels from the centre."""
    y, x = np.mgrid[0:size, 0:size]
    center = (size - 1) / 2
    mask = (x - center - offset[0]) ** 2 + (y - center - offset[1]) ** 2 <= radius**2
    image = np.zeros((size, size, 3), np.uint8)
    image[mask] = 255
    return image


def centroid(image: np.ndarray) -> tuple[float, float]:
    weights = image[..., 0].astype(np.float64)
    y, x = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    return float((x * weights).sum() / weights.sum()), float((y * weights).sum() / weights.sum())


def test_rotate_positive_angle_turns_counter_clockwise(backend):
    image = disc_image()
    out = run_one(backend, spec_of({"rotate": {"degrees": [30, 30]}}), image)
    x, y = centroid(out)
    center = 50.0
    # On screen (y down) counter-clockwise moves a point right of centre up and to the right.
    assert x == pytest.approx(center + 30 * math.cos(math.radians(30)), abs=0.5)
    assert y == pytest.approx(center - 30 * math.sin(math.radians(30)), abs=0.5)


def test_horizontal_and_vertical_flip_mirror_exactly(backend, synthetic_images):
    image = synthetic_images["pattern_97x131"]
    assert np.array_equal(run_one(backend, spec_of({"flip": {"horizontal": 1.0}}), image), image[:, ::-1])
    both = spec_of({"flip": {"horizontal": 0.0, "vertical": 1.0}})
    assert np.array_equal(run_one(backend, both, image), image[::-1])


def test_shift_moves_content_right_and_down(backend):
    image = disc_image(offset=(0, 0))
    out = run_one(backend, spec_of({"shift": {"x": [0.1, 0.1], "y": [0.2, 0.2]}}), image)
    x, y = centroid(out)
    assert (x, y) == (pytest.approx(50 + 10.1, abs=0.3), pytest.approx(50 + 20.2, abs=0.3))


def test_zoom_above_one_enlarges(backend):
    image = disc_image(offset=(20, 0))
    out = run_one(backend, spec_of({"zoom": {"range": [2.0, 2.0]}}), image)
    x, _ = centroid(out)
    assert x == pytest.approx(50 + 40, abs=0.5)
    assert (out[..., 0] > 127).sum() == pytest.approx(4 * (image[..., 0] > 127).sum(), rel=0.15)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_crop_takes_the_window_the_plan_names(backend, synthetic_images, seed):
    image = synthetic_images["pattern_240x180"]
    spec = spec_of({"crop": {"size": [50, 70]}})
    plan = make_plan(spec, seed, 0, 0, image.shape[:2])
    left, top = int(plan.warp[0, 2]), int(plan.warp[1, 2])
    assert plan.is_pixel_copy
    out = run_one(backend, spec, image, seed=seed)
    assert np.array_equal(out, image[top : top + 50, left : left + 70])


def test_centre_crop_larger_than_image_pads_with_fill(backend, synthetic_images):
    image = synthetic_images["pattern_64x64"]
    out = run_one(backend, spec_of({"crop": {"size": [64, 80], "mode": "center"}}, fill_value=77), image)
    assert np.array_equal(out[:, 8:72], image)
    assert (out[:, :8] == 77).all() and (out[:, 72:] == 77).all()


@pytest.mark.parametrize(
    "op",
    [
        {"flip": {"horizontal": 0.0, "vertical": 0.0}},
        {"grayscale": {"p": 0.0}},
        {"random_erasing": {"p": 0.0}},
        {"cutout": {"p": 0.0, "size": 10}},
        {"rotate": {"degrees": 0}},
        {"shift": {"x": 0.0, "y": 0.0}},
        {"zoom": {"range": [1.0, 1.0]}},
        {"brightness": {"factor": 0.0}},
        {"saturation": {"factor": [1.0, 1.0]}},
    ],
    ids=lambda op: next(iter(op)),
)
def test_neutral_op_is_the_identity(backend, synthetic_images, op):
    image = synthetic_images["pattern_97x131"]
    for seed in range(3):
        assert np.array_equal(run_one(backend, spec_of(op), image, seed=seed), image)


def test_grayscale_makes_channels_equal_and_brightness_scales(backend, synthetic_images):
    image = synthetic_images["pattern_64x64"]
    gray = run_one(backend, spec_of({"grayscale": {"p": 1.0}}), image)
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    luma = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(gray[..., 0] - luma).max() <= 1.0
    half = run_one(backend, spec_of({"brightness": {"factor": [0.5, 0.5]}}), image)
    assert np.abs(half.astype(np.float64) - image * 0.5).max() <= 1.0


def test_cutout_fills_its_holes(backend, synthetic_images):
    image = synthetic_images["pattern_97x131"]
    spec = spec_of({"cutout": {"size": [9, 11], "holes": 2, "value": 3}})
    plan = make_plan(spec, 5, 0, 0, image.shape[:2])
    out = run_one(backend, spec, image, seed=5)
    expected = image.copy()
    for top, left, height, width in plan.erase_steps[0].rectangles:
        expected[top : top + height, left : left + width] = 3
    assert len(plan.erase_steps[0].rectangles) == 2
    assert np.array_equal(out, expected)


def test_resize_and_random_resized_crop_set_the_output_size(backend, synthetic_images):
    image = synthetic_images["pattern_240x180"]
    assert run_one(backend, spec_of({"resize": {"size": [30, 40]}}), image).shape == (30, 40, 3)
    out = run_one(backend, spec_of({"random_resized_crop": {"size": [32, 48]}}), image)
    assert out.shape == (32, 48, 3)
    whole = run_one(backend, spec_of({"resize": {"size": [240, 180]}}), image)
    assert np.array_equal(whole, image)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_pil(backend, synthetic_images, orientation):
    from io import BytesIO

    from PIL import Image, ImageOps

    from helpers import run_images

    buffer = BytesIO()
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(synthetic_images["pattern_97x131"]).save(buffer, format="JPEG", quality=95, exif=exif)
    data = buffer.getvalue()
    with Image.open(BytesIO(data)) as stored:
        expected = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))
    out = run_images(backend, spec_of({"flip": {"horizontal": 0.0}}), [data]).images[0]
    assert out.shape == expected.shape
    assert np.abs(out.astype(int) - expected).max() <= 1


@pytest.mark.parametrize("size", [(1, 1), (3, 7), (7, 3)])
def test_random_resized_crop_on_tiny_images_with_extreme_ratios(backend, size):
    image = np.full((*size, 3), 90, np.uint8)
    for ratio in ([5.0, 20.0], [0.05, 0.2]):
        spec = spec_of({"random_resized_crop": {"size": 8, "ratio": ratio}}, fill_mode="nearest")
        out = run_one(backend, spec, image)
        assert out.shape == (8, 8, 3) and (out == 90).all()
