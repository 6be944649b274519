"""Datasets with annotations, as `load_manifest` finds them, and each sample's targets.

Two layouts besides ImageFolder trees and CSV lists:

- a COCO file (`PATH.json`): its images (`file_name` relative to the file's folder) in image-id
  order, each with its instances' boxes, keypoints and a label map of their segmentations
  (`augserve.data.annotations`); the classes are the categories in id order;
- a label-map folder (`images/` with `masks/`, Pascal VOC / ADE20K style): each image with the
  PNG label map of the same name; the classes are the lines of `classes.txt` beside the two
  folders when there is one (line k names mask value k + 1; 0 is background), else none.

Either way a mask value v > 0 (other than MASK_FILL) is class `classes[v - 1]`, and the image
label of every sample is -1: a scene has no single class.

Annotation problems (an unknown image id, a box outside its image, a label map whose size is
not its image's, an image without a label map) leave that annotation, or that image, out; they
are logged and listed (`DatasetTargets.problems`), never raised at serving time.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from augserve.core.targets import SampleTargets
from augserve.data.annotations import CocoDataset, Problem, load_coco, read_label_map, scan_label_maps
from augserve.data.decoded import DecodedCache
from augserve.data.reading import open_regular_file

log = logging.getLogger(__name__)

IMAGES_FOLDER, MASKS_FOLDER, CLASSES_FILE = "images", "masks", "classes.txt"
NO_LABEL = -1  # the image label of a sample of an annotated dataset
# COCO label maps are drawn from the file's polygons and RLE once (a pure function of the parsed
# file, which a dataset keeps for its life) and kept up to this many bytes, least recently used
# first out: rasterizing costs more than the warp (docs/benchmarks.md, bench_targets).
COCO_MASK_CACHE_BYTES = 128 << 20


@dataclass(eq=False)
class DatasetTargets:
    """The annotations of a served dataset, by sample id (the manifest's order).

    kind: "coco" (boxes, keypoints where the categories name them, masks) or "label_maps"
    (masks only). `sources[i]` is what sample i's annotations come from: its COCO image id, or
    the path of its label map relative to the dataset root.
    """

    kind: str
    root: str
    classes: tuple[str, ...]
    sources: tuple[int | str, ...]
    problems: tuple[Problem, ...] = ()
    max_file_bytes: int = 256 << 20
    coco: CocoDataset | None = field(default=None, repr=False)
    mask_cache: DecodedCache = field(default_factory=lambda: DecodedCache(COCO_MASK_CACHE_BYTES), repr=False)

    @property
    def has_boxes(self) -> bool:
        return self.kind == "coco"

    @property
    def has_keypoints(self) -> bool:
        return self.coco is not None and bool(self.coco.keypoint_names)

    @property
    def has_masks(self) -> bool:
        return True

    @property
    def flip_pairs(self) -> tuple[tuple[int, int], ...]:
        return () if self.coco is None else self.coco.flip_pairs

    @property
    def keypoint_count(self) -> int:
        return 0 if self.coco is None else len(self.coco.keypoint_names)

    def targets(self, sample_id: int) -> SampleTargets:
        """The sample's instances in stored-image pixel-edge coordinates (none for label maps)."""
        if self.coco is None:
            return SampleTargets(np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
        return self.coco.targets(int(self.sources[sample_id]))

    def mask(self, sample_id: int) -> np.ndarray:
        """The sample's [H, W] uint8 label map at its stored image's size; ValueError (naming the
        problem) where its label map cannot be read or no longer fits."""
        source = self.sources[sample_id]
        if self.coco is not None:
            key = (int(source), b"coco")
            mask = self.mask_cache.get(key)
            if mask is None:
                mask = self.coco.mask(int(source))
                self.mask_cache.put(key, mask)  # read-only from here on: every reader shares it
            return mask
        path = os.path.join(self.root, str(source))
        try:
            with open_regular_file(path, self.max_file_bytes) as handle:
                return read_label_map(handle)
        except (OSError, ValueError, Image.UnidentifiedImageError) as error:
            raise ValueError(f"label map {source}: {error}") from None


def is_label_map_folder(path: Path) -> bool:
    return path.is_dir() and (path / IMAGES_FOLDER).is_dir() and (path / MASKS_FOLDER).is_dir()


def _image_size(path: Path) -> tuple[int, int] | None:
    """(height, width) as stored (no EXIF orientation: label maps are drawn on stored pixels)."""
    try:
        with Image.open(path) as image:
            return image.size[1], image.size[0]
    except (OSError, ValueError, Image.UnidentifiedImageError):
        return None


def scan_coco(path: Path) -> tuple[list[str], DatasetTargets]:
    """The image paths (relative to the file's folder) of a COCO file, in image-id order, and
    their annotations (`sources` the image ids). Files the manifest refuses are left out later
    through `DatasetTargets.keep`."""
    coco = load_coco(path)
    images = sorted(coco.images, key=lambda image: image.image_id)
    targets = DatasetTargets("coco", str(path.parent), coco.categories, tuple(image.image_id for image in images), tuple(coco.problems), coco=coco)
    return [image.file_name for image in images], targets


def scan_label_map_folder(root: Path) -> tuple[list[str], DatasetTargets]:
    """The images of a label-map folder that have a label map of their own size, and the label
    maps (`sources`); the others are problems."""
    pairs, problems = scan_label_maps(root)
    kept_images, masks = [], []
    for pair in pairs:
        image_size, mask_size = _image_size(root / pair.image), _image_size(root / pair.mask)
        if image_size is not None and mask_size is not None and image_size != mask_size:
            problems.append(Problem(pair.mask, "size", f"label map is {mask_size[1]}x{mask_size[0]}, its image {image_size[1]}x{image_size[0]}"))
            continue
        kept_images.append(pair.image)
        masks.append(pair.mask)
    for problem in problems:
        log.warning("annotations left out: %s", problem)
    classes_file = root / CLASSES_FILE
    classes: tuple[str, ...] = ()
    if classes_file.is_file():
        classes = tuple(line.strip() for line in classes_file.read_text(encoding="utf-8").splitlines() if line.strip())
    return kept_images, DatasetTargets("label_maps", str(root), classes, tuple(masks), tuple(problems))


def keep(targets: DatasetTargets, listed: list[str], kept: list[str]) -> DatasetTargets:
    """`targets` for the images `kept` (the manifest's paths) out of those `listed` by the scan."""
    source_of = dict(zip(listed, targets.sources))
    return replace(targets, sources=tuple(source_of[path] for path in kept))
