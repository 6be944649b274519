"""The built-in demo scenes: one to three shapes per picture, with their label maps and a
COCO file, for segmentation and detection.

Layout (what `augserve.data.annotations` reads):

    images/scene_00000.jpg     the picture
    masks/scene_00000.png      its label map: 0 background, 1 circle, 2 square, 3 triangle
    instances.json             COCO: a box, a polygon and the category per shape
    classes.txt                circle, square, triangle: the label-map folder's classes

Shapes are drawn as polygons (a circle as a 48-gon), the same polygon into the picture, the
label map and the COCO file, so all three agree; a later shape covers an earlier one. Each class
has a colour of its own (jittered) besides its shape, so that a small model learns the scenes in
a test's few epochs on a CPU. Deterministic
and cached like the classification demo (`augserve.data.demo`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from augserve.data.annotated import CLASSES_FILE, IMAGES_FOLDER, MASKS_FOLDER
from augserve.data.demo import ensure_generated

SCENE_CLASSES = ("circle", "square", "triangle")
CORNERS = {"circle": 48, "square": 4, "triangle": 3}
CLASS_COLORS = np.array([(220, 60, 50), (60, 190, 70), (70, 90, 230)])  # circle, square, triangle
COCO_FILE = "instances.json"


@dataclass(frozen=True)
class SceneConfig:
    """Parameters of the demo scenes; they also name the cache folder."""

    images: int = 240
    image_size: int = 64
    seed: int = 0
    jpeg_quality: int = 92

    def __post_init__(self) -> None:
        if not 1 <= self.images <= 100_000:
            raise ValueError(f"images: {self.images} is outside [1, 100000]")
        if not 32 <= self.image_size <= 1024:
            raise ValueError(f"image_size: {self.image_size} is outside [32, 1024]")

    @property
    def folder_name(self) -> str:
        return f"demo-scenes-v4-n{self.images}-s{self.image_size}-seed{self.seed}-q{self.jpeg_quality}"


def _shape(rng: np.random.Generator, size: int) -> tuple[int, list[tuple[float, float]]]:
    """A class index and its polygon."""
    label = int(rng.integers(0, len(SCENE_CLASSES)))
    radius = size * rng.uniform(0.16, 0.3)
    cx, cy = size * rng.uniform(0.2, 0.8), size * rng.uniform(0.2, 0.8)
    angle = rng.uniform(0.0, 2 * math.pi)
    corners = CORNERS[SCENE_CLASSES[label]]
    points = [
        (cx + radius * math.cos(angle + 2 * math.pi * k / corners), cy + radius * math.sin(angle + 2 * math.pi * k / corners))
        for k in range(corners)
    ]
    return label, points


def draw_scene(rng: np.random.Generator, size: int) -> tuple[Image.Image, np.ndarray, list[tuple[int, list[tuple[float, float]]]]]:
    """A picture, its label map and its shapes (class index, polygon), later shapes on top."""
    low = rng.integers(0, 256, 3)
    shapes = [_shape(rng, size) for _ in range(int(rng.integers(1, 4)))]
    # Each class has a colour of its own (jittered); the background keeps away from them all.
    if any(np.abs(low - CLASS_COLORS[label]).sum() < 200 for label, _ in shapes):
        low = np.where(low > 127, low // 3, 255 - (255 - low) // 3)
    image = Image.new("RGB", (size, size), tuple(int(c) for c in low))
    labels = Image.new("L", (size, size), 0)
    draw, draw_labels = ImageDraw.Draw(image), ImageDraw.Draw(labels)
    for label, points in shapes:
        color = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in CLASS_COLORS[label])
        draw.polygon(points, fill=color)
        draw_labels.polygon(points, fill=label + 1)
    noisy = np.asarray(image, np.float64) + rng.normal(0.0, 8.0, (size, size, 3))
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius=0.5))
    return image, np.asarray(labels).copy(), shapes


def generate_scenes(root: Path, config: SceneConfig) -> None:
    """Write the scenes into `root` (which must not exist yet)."""
    (root / IMAGES_FOLDER).mkdir(parents=True)
    (root / MASKS_FOLDER).mkdir()
    images, annotations = [], []
    for index in range(config.images):
        rng = np.random.default_rng([config.seed, index])
        image, labels, shapes = draw_scene(rng, config.image_size)
        name = f"scene_{index:05d}"
        image.save(root / IMAGES_FOLDER / f"{name}.jpg", quality=config.jpeg_quality)
        Image.fromarray(labels).save(root / MASKS_FOLDER / f"{name}.png")
        images.append({"id": index + 1, "file_name": f"{IMAGES_FOLDER}/{name}.jpg", "height": config.image_size, "width": config.image_size})
        for label, points in shapes:
            xs, ys = [x for x, _ in points], [y for _, y in points]
            x0, y0 = max(0.0, min(xs)), max(0.0, min(ys))
            x1, y1 = min(float(config.image_size), max(xs)), min(float(config.image_size), max(ys))
            annotations.append({
                "id": len(annotations) + 1, "image_id": index + 1, "category_id": label + 1, "iscrowd": 0,
                "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                "segmentation": [[round(value, 2) for point in points for value in point]],
                "area": round((x1 - x0) * (y1 - y0), 2),
            })
    categories = [{"id": index + 1, "name": name} for index, name in enumerate(SCENE_CLASSES)]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (root / COCO_FILE).write_text(json.dumps(coco), encoding="utf-8")
    (root / CLASSES_FILE).write_text("".join(f"{name}\n" for name in SCENE_CLASSES), encoding="utf-8")


def ensure_demo_scenes(config: SceneConfig = SceneConfig(), root: Path | None = None) -> Path:
    """The demo scenes' folder, generating it first if it is not in the cache yet."""
    return ensure_generated(config.folder_name, lambda folder: generate_scenes(folder, config), root)
