"""Annotations beside the images: COCO-format files and folders of PNG label maps.

COCO (one JSON file, `images`, `annotations`, `categories`): per image its instances' boxes
(`bbox` as [x, y, width, height] in pixel-edge coordinates, turned into x_min, y_min, x_max,
y_max), their category as a contiguous label (categories in id order), their keypoints
(`keypoints` as [x, y, v] * K, K from the category) and a label map made of their segmentations
(polygons or RLE, decoded by pycocotools): 0 background, label + 1 under an instance, later
instances over earlier ones, and `MASK_FILL` (ignore) under crowd regions. Crowd annotations
(`iscrowd: 1`) give no box: they only mark their region as ignore, as COCO's evaluation does.
Keypoint flip pairs come from the category's keypoint names (`left_*` with `right_*`).

Label-map folders (Pascal VOC, ADE20K style): `images/NAME.jpg|png` with `masks/NAME.png`, a
single-channel PNG of labels the same size as its image (palette PNGs give their indices).

Bad annotations never stop a dataset: each is a `Problem` naming the file, the field (as
`annotations[12].bbox`) and why, logged and listed, and the annotation or mask is left out.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from augserve.core.targets import MASK_FILL, SampleTargets

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Labels a uint8 label map can hold besides background (0) and ignore (MASK_FILL).
MAX_MASK_LABELS = MASK_FILL - 1


@dataclass(frozen=True)
class Problem:
    """An annotation left out: the file, the field within it and why."""

    file: str
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: {self.reason}"


@dataclass(frozen=True)
class ImageEntry:
    """One image of a COCO file: its id, file name and size (height, width) as the file says."""

    image_id: int
    file_name: str
    size: tuple[int, int]


@dataclass
class ImageAnnotations:
    """What a COCO file says about one image: its instances and the segmentations that make its
    label map ((label, segmentation) of instances, segmentations of crowd regions)."""

    boxes: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    keypoints: list[list[list[float]]] = field(default_factory=list)
    segments: list[tuple[int, Any]] = field(default_factory=list)
    crowd: list[Any] = field(default_factory=list)


@dataclass
class CocoDataset:
    """A parsed COCO annotation file (`load_coco`)."""

    source: str
    categories: tuple[str, ...]
    keypoint_names: tuple[str, ...]
    images: list[ImageEntry]
    annotations: dict[int, ImageAnnotations]
    problems: list[Problem]

    def image(self, image_id: int) -> ImageEntry:
        return self._by_id[image_id]

    def __post_init__(self) -> None:
        self._by_id = {image.image_id: image for image in self.images}

    @property
    def flip_pairs(self) -> tuple[tuple[int, int], ...]:
        return flip_pairs_of(self.keypoint_names)

    def targets(self, image_id: int) -> SampleTargets:
        """The image's instances as arrays (none for an image without annotations)."""
        found = self.annotations.get(image_id, ImageAnnotations())
        count = len(self.keypoint_names)
        keypoints = np.array(found.keypoints, np.float32).reshape(len(found.boxes), count, 3)
        return SampleTargets(np.array(found.boxes, np.float32), np.array(found.labels, np.int64), keypoints)

    def mask(self, image_id: int) -> np.ndarray:
        """The image's [H, W] uint8 label map: 0 background, label + 1 under an instance (later
        ones over earlier ones), MASK_FILL under crowd regions."""
        height, width = self.image(image_id).size
        out = np.zeros((height, width), np.uint8)
        found = self.annotations.get(image_id)
        if found is None:
            return out
        for label, segmentation in found.segments:
            np.copyto(out, np.uint8(label + 1), where=decode_segmentation(segmentation, height, width))
        for segmentation in found.crowd:
            np.copyto(out, np.uint8(MASK_FILL), where=decode_segmentation(segmentation, height, width))
        return out


def flip_pairs_of(names: Sequence[str]) -> tuple[tuple[int, int], ...]:
    """(left, right) index pairs of keypoint names `left_X` and `right_X`."""
    index = {name: position for position, name in enumerate(names)}
    return tuple(
        (position, index["right_" + name[len("left_") :]])
        for position, name in enumerate(names)
        if name.startswith("left_") and "right_" + name[len("left_") :] in index
    )


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A boolean [H, W] mask of a COCO segmentation: polygons, RLE or compressed RLE."""
    from pycocotools import mask as coco_mask  # a server dependency, needed for COCO only

    if isinstance(segmentation, list):
        rles = coco_mask.frPyObjects(segmentation, height, width)
        rle = coco_mask.merge(rles)
    elif isinstance(segmentation.get("counts"), list):
        rle = coco_mask.frPyObjects(segmentation, height, width)
    else:
        rle = dict(segmentation, counts=segmentation["counts"].encode() if isinstance(segmentation["counts"], str) else segmentation["counts"])
    with warnings.catch_warnings():
        # pycocotools' decoder still builds arrays the pre-numpy-2 way (a DeprecationWarning
        # each call); the result is right.
        warnings.simplefilter("ignore", DeprecationWarning)
        return coco_mask.decode(rle).astype(bool)


def _number_list(value: Any, length: int | None = None) -> list[float] | None:
    if not isinstance(value, list) or (length is not None and len(value) != length):
        return None
    if not all(isinstance(item, (int, float)) and not isinstance(item, bool) and math.isfinite(item) for item in value):
        return None
    return [float(item) for item in value]


def _segmentation_problem(segmentation: Any, size: tuple[int, int]) -> str | None:
    """Why a segmentation cannot be used for an image of `size`, or None."""
    if isinstance(segmentation, list):
        if not segmentation or not all(
            _number_list(polygon) is not None and len(polygon) >= 6 and len(polygon) % 2 == 0 for polygon in segmentation
        ):
            return "expected polygons of at least 3 (x, y) points"
        return None
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        return "expected polygons or an RLE with counts and size"
    rle_size = segmentation["size"]
    if not (isinstance(rle_size, list) and len(rle_size) == 2 and tuple(rle_size) == size):
        return f"RLE size {rle_size!r} is not the image's [height, width] {list(size)}"
    counts = segmentation["counts"]
    if isinstance(counts, list):
        if not all(isinstance(count, int) and count >= 0 for count in counts) or sum(counts) != size[0] * size[1]:
            return "RLE counts must be non-negative integers adding up to height * width"
    elif not isinstance(counts, str):
        return "RLE counts must be a list of integers or a compressed string"
    return None


class _CocoReader:
    """Reads one COCO file, collecting problems instead of raising."""

    def __init__(self, path: Path) -> None:
        self.file = path.name
        self.problems: list[Problem] = []

    def problem(self, where: str, reason: str) -> None:
        self.problems.append(Problem(self.file, where, reason))

    def read(self, data: dict) -> CocoDataset:
        categories = self._categories(data.get("categories"))
        category_ids = sorted(categories)
        label_of = {category_id: label for label, category_id in enumerate(category_ids)}
        keypoint_names: tuple[str, ...] = ()
        for category_id in category_ids:
            names = categories[category_id][1]
            if names and not keypoint_names:
                keypoint_names = names
        images = self._images(data.get("images"))
        by_id = {image.image_id: image for image in images}
        annotations: dict[int, ImageAnnotations] = {}
        entries = data.get("annotations", [])
        if not isinstance(entries, list):
            self.problem("annotations", "expected a list")
            entries = []
        for position, entry in enumerate(entries):
            self._annotation(f"annotations[{position}]", entry, by_id, label_of, len(keypoint_names), annotations)
        return CocoDataset(
            source=self.file,
            categories=tuple(categories[category_id][0] for category_id in category_ids),
            keypoint_names=keypoint_names,
            images=images,
            annotations=annotations,
            problems=self.problems,
        )

    def _categories(self, entries: Any) -> dict[int, tuple[str, tuple[str, ...]]]:
        if not isinstance(entries, list) or not entries:
            self.problem("categories", "expected a non-empty list")
            return {}
        found: dict[int, tuple[str, tuple[str, ...]]] = {}
        for position, entry in enumerate(entries):
            where = f"categories[{position}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), int) or not isinstance(entry.get("name"), str):
                self.problem(where, "expected an object with an integer id and a name")
                continue
            if entry["id"] in found:
                self.problem(f"{where}.id", f"category id {entry['id']} given twice")
                continue
            names = entry.get("keypoints", [])
            if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
                self.problem(f"{where}.keypoints", "expected a list of names")
                names = []
            found[entry["id"]] = (entry["name"], tuple(names))
        if len(found) > MAX_MASK_LABELS:
            self.problem("categories", f"{len(found)} categories: a uint8 label map holds at most {MAX_MASK_LABELS}")
        return found

    def _images(self, entries: Any) -> list[ImageEntry]:
        if not isinstance(entries, list):
            self.problem("images", "expected a list")
            return []
        images: list[ImageEntry] = []
        seen: set[int] = set()
        for position, entry in enumerate(entries):
            where = f"images[{position}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), int) or not isinstance(entry.get("file_name"), str):
                self.problem(where, "expected an object with an integer id and a file_name")
                continue
            height, width = entry.get("height"), entry.get("width")
            if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
                self.problem(where, "expected positive integer height and width")
                continue
            if entry["id"] in seen:
                self.problem(f"{where}.id", f"image id {entry['id']} given twice")
                continue
            seen.add(entry["id"])
            images.append(ImageEntry(entry["id"], entry["file_name"], (height, width)))
        return images

    def _annotation(
        self,
        where: str,
        entry: Any,
        images: dict[int, ImageEntry],
        label_of: dict[int, int],
        keypoint_count: int,
        annotations: dict[int, ImageAnnotations],
    ) -> None:
        if not isinstance(entry, dict):
            self.problem(where, "expected an object")
            return
        image = images.get(entry.get("image_id"))
        if image is None:
            self.problem(f"{where}.image_id", f"unknown image id {entry.get('image_id')!r}")
            return
        label = label_of.get(entry.get("category_id"))
        if label is None:
            self.problem(f"{where}.category_id", f"unknown category id {entry.get('category_id')!r}")
            return
        target = annotations.setdefault(image.image_id, ImageAnnotations())
        height, width = image.size
        segmentation = entry.get("segmentation")
        if segmentation is not None and segmentation != []:
            reason = _segmentation_problem(segmentation, image.size)
            if reason is not None:
                self.problem(f"{where}.segmentation", reason)
                segmentation = None
        if entry.get("iscrowd", 0) == 1:
            if segmentation:
                target.crowd.append(segmentation)
            return
        box = _number_list(entry.get("bbox"), 4)
        if box is None:
            self.problem(f"{where}.bbox", "expected [x, y, width, height] of finite numbers")
            return
        x, y, box_w, box_h = box
        if box_w <= 0 or box_h <= 0:
            self.problem(f"{where}.bbox", f"width and height must be positive, got {box_w:g} x {box_h:g}")
            return
        # Half a pixel of slack: exporters round box edges.
        if x < -0.5 or y < -0.5 or x + box_w > width + 0.5 or y + box_h > height + 0.5:
            self.problem(f"{where}.bbox", f"[{x:g}, {y:g}, {box_w:g}, {box_h:g}] is outside the {width}x{height} image")
            return
        points = [[0.0, 0.0, 0.0] for _ in range(keypoint_count)]
        if keypoint_count:
            values = entry.get("keypoints")
            flat = _number_list(values, 3 * keypoint_count) if values is not None else [0.0] * (3 * keypoint_count)
            if flat is None:
                self.problem(f"{where}.keypoints", f"expected {3 * keypoint_count} numbers (x, y, v for {keypoint_count} keypoints)")
            else:
                points = [flat[index : index + 3] for index in range(0, len(flat), 3)]
        target.boxes.append([max(0.0, x), max(0.0, y), min(float(width), x + box_w), min(float(height), y + box_h)])
        target.labels.append(label)
        target.keypoints.append(points)
        if segmentation:
            target.segments.append((label, segmentation))


def load_coco(path: str | Path) -> CocoDataset:
    """Parse a COCO annotation file; what cannot be used is in `problems` (and logged)."""
    path = Path(path)
    reader = _CocoReader(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path.name}: cannot read a COCO file ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path.name}: expected a JSON object with images, annotations and categories")
    dataset = reader.read(data)
    for problem in dataset.problems:
        log.warning("annotations left out: %s", problem)
    return dataset


@dataclass(frozen=True)
class LabelMapPair:
    """An image and its label map, by paths relative to the dataset root."""

    image: str
    mask: str


def scan_label_maps(root: str | Path) -> tuple[list[LabelMapPair], list[Problem]]:
    """Pairs of `images/NAME.ext` and `masks/NAME.png` under `root`: an image without a mask,
    or a mask without an image, is a problem."""
    root = Path(root)
    images = {path.stem: path for path in sorted((root / "images").iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES}
    masks = {path.stem: path for path in sorted((root / "masks").iterdir()) if path.suffix.lower() == ".png"}
    pairs = [LabelMapPair(f"images/{images[stem].name}", f"masks/{masks[stem].name}") for stem in sorted(images) if stem in masks]
    problems = [Problem(f"images/{images[stem].name}", "mask", f"no masks/{stem}.png beside it") for stem in sorted(images) if stem not in masks]
    problems += [Problem(f"masks/{masks[stem].name}", "image", "no image of this name in images/") for stem in sorted(masks) if stem not in images]
    return pairs, problems


def read_label_map(path: str | Path | BinaryIO, size: tuple[int, int] | None = None) -> np.ndarray:
    """The [H, W] uint8 labels of a PNG label map (a path or an open file) for an image of
    `size` (height, width; None: any); a ValueError naming the problem when it is not one."""
    with Image.open(path) as image:
        if image.mode not in ("L", "P"):
            raise ValueError(f"a label map must be a single-channel or palette PNG, not mode {image.mode}")
        labels = np.asarray(image).astype(np.uint8, copy=True)
    if size is not None and labels.shape != tuple(size):
        raise ValueError(f"mask is {labels.shape[1]}x{labels.shape[0]}, its image {size[1]}x{size[0]}")
    return labels
