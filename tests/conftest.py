"""Shared fixtures: real image files, the demo dataset, and real backends (OpenCV, DALI CPU)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from augserve.backends.dali import DaliBackend
from augserve.backends.opencv import OpenCVBackend
from augserve.data.demo import DemoConfig, ensure_demo_dataset
from fake_cuda import build_fake_driver

PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket")


@pytest.fixture(scope="session")
def demo_root() -> Path:
    return ensure_demo_dataset(DemoConfig())


@pytest.fixture(scope="session")
def demo_files(demo_root: Path) -> list[Path]:
    return sorted(demo_root.glob("*/*.jpg"))


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real photographs shipped with scikit-image, RGB uint8."""
    import skimage.data

    return {name: getattr(skimage.data, name)() for name in PHOTO_NAMES}


@pytest.fixture(scope="session")
def synthetic_images() -> dict[str, np.ndarray]:
    """Generated test pictures with edges, gradients and texture at a few sizes, RGB uint8."""
    rng = np.random.default_rng(7)
    images = {}
    for height, width in ((64, 64), (97, 131), (240, 180)):
        y, x = np.mgrid[0:height, 0:width]
        image = np.stack(
            [255 * x / (width - 1), 255 * y / (height - 1), 128 + 100 * np.sin(x / 5.0) * np.cos(y / 7.0)],
            axis=-1,
        )
        image[(x // 16 + y // 16) % 2 == 0] *= 0.6
        noise = cv2.GaussianBlur(rng.normal(0, 30, (height, width, 3)), (0, 0), 1.5)
        images[f"pattern_{height}x{width}"] = np.clip(image + noise, 0, 255).astype(np.uint8)
    return images


@pytest.fixture(scope="session")
def opencv_backend():
    backend = OpenCVBackend(threads=2)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def dali_backend():
    backend = DaliBackend(device_id=None, threads=2)
    yield backend
    backend.close()


@pytest.fixture(params=["opencv", "dali-cpu"])
def backend(request, opencv_backend, dali_backend):
    return opencv_backend if request.param == "opencv" else dali_backend


@pytest.fixture(scope="session")
def fake_driver(tmp_path_factory) -> str:
    """The stand-in CUDA driver (tests/fake_cuda.py), built once."""
    library = build_fake_driver(tmp_path_factory.mktemp("fake-cuda"))
    if library is None:
        pytest.skip("no C compiler for the stand-in CUDA driver")
    return library
