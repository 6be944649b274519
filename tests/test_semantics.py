"""What ops do in the cases tests/unit/test_ops.py does not reach: padding, EXIF orientation
and degenerate inputs, on both backends."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import run_images, run_one, spec_of


def test_centre_crop_larger_than_image_pads_with_fill(backend, synthetic_images):
    image = synthetic_images["pattern_64x64"]
    out = run_one(backend, spec_of({"crop": {"size": [64, 80], "mode": "center"}}, fill_value=77), image)
    assert np.array_equal(out[:, 8:72], image)
    assert (out[:, :8] == 77).all() and (out[:, 72:] == 77).all()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_pil(backend, synthetic_images, orientation):
    from io import BytesIO

    from PIL import Image, ImageOps

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
