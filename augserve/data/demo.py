"""The built-in demo dataset: coloured shapes on noisy backgrounds, as JPEG files in an
ImageFolder tree (one folder per class, like Keras `flow_from_directory`).

Deterministic: the same parameters give the same pictures. Generated on first use into a cache
folder (`$AUGSERVE_CACHE`, default `~/.cache/augserve`) and reused after. A small CNN learns it
well above chance in a minute or two on a CPU.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("circle", "square", "triangle", "cross", "ring")
READY_MARKER = ".complete"


@dataclass(frozen=True)
class DemoConfig:
    """Parameters of the demo dataset; they also name its cache folder."""

    images_per_class: int = 300
    image_size: int = 64
    seed: int = 0
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if not 1 <= self.images_per_class <= 100_000:
            raise ValueError(f"images_per_class: {self.images_per_class} is outside [1, 100000]")
        if not 32 <= self.image_size <= 1024:
            raise ValueError(f"image_size: {self.image_size} is outside [32, 1024]")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality: {self.jpeg_quality} is outside [1, 100]")

    @property
    def folder_name(self) -> str:
        return f"demo-shapes-v2-n{self.images_per_class}-s{self.image_size}-seed{self.seed}-q{self.jpeg_quality}"


def cache_root() -> Path:
    return Path(os.environ.get("AUGSERVE_CACHE", Path.home() / ".cache" / "augserve"))


def _polygon(center: tuple[float, float], radius: float, angle: float, corners: int) -> list[tuple[float, float]]:
    cx, cy = center
    return [
        (cx + radius * math.cos(angle + 2 * math.pi * k / corners), cy + radius * math.sin(angle + 2 * math.pi * k / corners))
        for k in range(corners)
    ]


def draw_sample(class_name: str, rng: np.random.Generator, size: int) -> Image.Image:
    """One picture of `class_name`: a random background, the shape, some noise and blur."""
    low, high = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    high = low + (high - low) // 2  # a gentle gradient
    ramp = np.linspace(0.0, 1.0, size)[:, None, None]
    background = low + (high - low) * ramp
    background = np.transpose(background, (1, 0, 2)) if rng.random() < 0.5 else background
    background = np.broadcast_to(background, (size, size, 3))
    image = Image.fromarray(background.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    # A light shape on a dark background or the reverse, so the shape always stands out.
    if background.mean() > 127:
        color = tuple(int(c) for c in rng.integers(0, 70, 3))
    else:
        color = tuple(int(c) for c in rng.integers(185, 256, 3))
    radius = size * rng.uniform(0.22, 0.36)
    center = (size * rng.uniform(0.35, 0.65), size * rng.uniform(0.35, 0.65))
    angle = rng.uniform(0, 2 * math.pi)
    width = max(2, int(radius * 0.35))
    cx, cy = center
    if class_name == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=color)
    elif class_name == "ring":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), outline=color, width=width)
    elif class_name == "square":
        draw.polygon(_polygon(center, radius * 1.2, angle, 4), fill=color)
    elif class_name == "triangle":
        draw.polygon(_polygon(center, radius * 1.3, angle, 3), fill=color)
    elif class_name == "cross":
        for arm in (angle, angle + math.pi / 2):
            dx, dy = radius * math.cos(arm), radius * math.sin(arm)
            draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=color, width=width)
    else:
        raise ValueError(f"unknown class {class_name!r}")
    noisy = np.asarray(image, np.float64) + rng.normal(0.0, 12.0, (size, size, 3))
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    return image.filter(ImageFilter.GaussianBlur(radius=0.6))


def generate(root: Path, config: DemoConfig) -> None:
    """Write the dataset into `root` (which must not exist yet)."""
    for class_index, class_name in enumerate(CLASSES):
        folder = root / class_name
        folder.mkdir(parents=True)
        for index in range(config.images_per_class):
            rng = np.random.default_rng([config.seed, class_index, index])
            image = draw_sample(class_name, rng, config.image_size)
            image.save(folder / f"{class_name}_{index:05d}.jpg", quality=config.jpeg_quality)


def ensure_demo_dataset(config: DemoConfig = DemoConfig(), root: Path | None = None) -> Path:
    """The demo dataset's folder, generating it first if it is not in the cache yet."""
    return ensure_generated(config.folder_name, lambda folder: generate(folder, config), root)


def ensure_generated(folder_name: str, write: Callable[[Path], None], root: Path | None = None) -> Path:
    """`root / folder_name` (root: the cache), made by `write(folder)` first if it is not there.

    Generation writes to a temporary folder and renames it, so concurrent callers and
    interrupted runs never see a half-written tree.
    """
    base = cache_root() if root is None else root
    target = base / folder_name
    if (target / READY_MARKER).exists():
        return target
    base.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=base))
    try:
        write(staging / "data")
        (staging / "data" / READY_MARKER).write_text("ok\n")
        try:
            os.rename(staging / "data", target)
        except OSError:
            if not (target / READY_MARKER).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
