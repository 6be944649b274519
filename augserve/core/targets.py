"""Targets that follow a sample's augmentation: boxes, keypoints and label masks.

Every geometric op of a plan is one affine map, so a sample's targets are mapped on the host by
that same map, with the same numbers for every backend:

- boxes, axis-aligned (x_min, y_min, x_max, y_max) in pixel-edge coordinates of the stored image
  (the COCO / Pascal VOC convention: the image spans [0, width] x [0, height]), become the
  envelope of their four mapped corners, clipped to the output; a box whose clipped area is under
  `TargetRules.min_area` pixels, or under `min_visibility` of its unclipped envelope, is dropped
  with its label and keypoints (torchvision's SanitizeBoundingBoxes, albumentations' BboxParams);
- keypoints, (x, y, visibility) per instance in the same coordinates, are mapped point by point;
  one that leaves the output becomes invisible (visibility 0, its mapped coordinates kept); when
  the map mirrors the image (a negative determinant: one flip, horizontal or vertical) the
  declared left/right pairs swap places, as a mirrored person's left hand is on the right;
- masks are label maps warped by the backend with nearest interpolation (`MASK_FILL` where the
  output sees outside the image) and no colour or pixel op; erasing may mark its rectangles as
  ignore (`TargetRules.erase_marks_ignore`).

Coordinates: the plan's maps take pixel centres at integers (pixel (0, 0) spans [-0.5, 0.5]),
so a point in edge coordinates moves by half a pixel into the plan's and back out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from augserve.core.errors import SpecError
from augserve.core.plan import SamplePlan, geometric_warp

# Label of mask pixels outside the image (and, with erase_marks_ignore, under erased rectangles):
# the usual ignore index of segmentation losses (Pascal VOC, ADE20K, torch's ignore_index).
MASK_FILL = 255


@dataclass(frozen=True)
class TargetRules:
    """What becomes of targets at the output's edges.

    min_area: least clipped box area, in output pixels, that keeps a box (0 keeps any box with
    some area). min_visibility: least share of a box's mapped envelope inside the output.
    flip_pairs: keypoint indices (left, right) that swap when the map mirrors the image.
    mask_fill: the label of mask pixels outside the image. erase_marks_ignore: erased
    rectangles become `mask_fill` in the mask too.
    """

    min_area: float = 1.0
    min_visibility: float = 0.0
    flip_pairs: tuple[tuple[int, int], ...] = ()
    mask_fill: int = MASK_FILL
    erase_marks_ignore: bool = False

    def __post_init__(self) -> None:
        if not self.min_area >= 0.0:
            raise SpecError("targets.min_area", f"expected a number >= 0, got {self.min_area!r}")
        if not 0.0 <= self.min_visibility <= 1.0:
            raise SpecError("targets.min_visibility", f"expected a number in [0, 1], got {self.min_visibility!r}")
        if not 0 <= self.mask_fill <= 255:
            raise SpecError("targets.mask_fill", f"expected an integer in [0, 255], got {self.mask_fill!r}")
        seen: set[int] = set()
        for pair in self.flip_pairs:
            if len(pair) != 2 or pair[0] == pair[1] or any(index < 0 for index in pair):
                raise SpecError("targets.flip_pairs", f"expected pairs of two different indices >= 0, got {pair!r}")
            if seen & set(pair):
                raise SpecError("targets.flip_pairs", f"index in more than one pair: {pair!r}")
            seen.update(pair)


@dataclass(frozen=True)
class SampleTargets:
    """One sample's instances: boxes [N, 4] float32 (x_min, y_min, x_max, y_max), labels [N]
    int64 and keypoints [N, K, 3] float32 (x, y, visibility; K may be 0)."""

    boxes: np.ndarray
    labels: np.ndarray
    keypoints: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 3), np.float32))

    def __post_init__(self) -> None:
        boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        keypoints = np.asarray(self.keypoints, dtype=np.float32)
        if keypoints.size == 0:
            keypoints = np.zeros((len(boxes), 0 if keypoints.ndim < 3 else keypoints.shape[1], 3), np.float32)
        if len(labels) != len(boxes):
            raise SpecError("targets.labels", f"{len(labels)} labels for {len(boxes)} boxes")
        if keypoints.ndim != 3 or keypoints.shape[0] != len(boxes) or keypoints.shape[2] != 3:
            raise SpecError("targets.keypoints", f"expected shape [{len(boxes)}, K, 3], got {list(keypoints.shape)}")
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "keypoints", keypoints)

    def __len__(self) -> int:
        return len(self.boxes)


def forward_map(plan: SamplePlan) -> np.ndarray:
    """The [2, 3] map from stored-image pixel centres to output pixel centres: the inverse of the
    plan's geometric warp (without the tie-break shift of a nearest-neighbour warp, a sampling
    detail of the pixels, not a move of the picture)."""
    warp = geometric_warp(plan)
    inverse = np.linalg.inv(warp[:, :2])
    return np.concatenate([inverse, -inverse @ warp[:, 2:]], axis=1)


def map_points(points: np.ndarray, forward: np.ndarray) -> np.ndarray:
    """[..., 2] edge-coordinate points mapped by `forward` (which works on pixel centres)."""
    centred = points.astype(np.float64) - 0.5
    mapped = centred @ forward[:, :2].T + forward[:, 2]
    return mapped + 0.5


def transform_boxes(
    boxes: np.ndarray, forward: np.ndarray, output_size: tuple[int, int], rules: TargetRules
) -> tuple[np.ndarray, np.ndarray]:
    """The boxes after the map: (kept boxes [M, 4] float32, indices [M] of the kept input boxes)."""
    if len(boxes) == 0:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    x0, y0, x1, y1 = (boxes[:, index].astype(np.float64) for index in range(4))
    corners = np.stack(
        [np.stack([x0, y0], -1), np.stack([x1, y0], -1), np.stack([x0, y1], -1), np.stack([x1, y1], -1)], axis=1
    )
    mapped = map_points(corners, forward)  # [N, 4, 2]
    low, high = mapped.min(axis=1), mapped.max(axis=1)
    envelope_area = np.prod(high - low, axis=1)
    height, width = output_size
    clipped_low = np.clip(low, 0.0, (width, height))
    clipped_high = np.clip(high, 0.0, (width, height))
    sides = clipped_high - clipped_low
    clipped_area = np.prod(sides, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        visibility = np.where(envelope_area > 0, clipped_area / envelope_area, 0.0)
    keep = (sides > 0).all(axis=1) & (clipped_area >= rules.min_area) & (visibility >= rules.min_visibility)
    kept = np.flatnonzero(keep)
    out = np.concatenate([clipped_low[kept], clipped_high[kept]], axis=1).astype(np.float32)
    return out, kept.astype(np.int64)


def mirrors(forward: np.ndarray) -> bool:
    """Whether the map turns the picture over (an odd number of flips)."""
    return float(np.linalg.det(forward[:, :2])) < 0.0


def transform_keypoints(
    keypoints: np.ndarray, forward: np.ndarray, output_size: tuple[int, int], rules: TargetRules
) -> np.ndarray:
    """[N, K, 3] keypoints after the map: mapped coordinates, visibility 0 for those outside the
    output (or invisible before), the flip pairs swapped when the map mirrors."""
    out = keypoints.astype(np.float32, copy=True)
    if out.size == 0:
        return out
    out[..., :2] = map_points(keypoints[..., :2], forward)
    height, width = output_size
    x, y = out[..., 0], out[..., 1]
    inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    out[..., 2] = np.where(inside & (keypoints[..., 2] > 0), keypoints[..., 2], 0.0)
    if rules.flip_pairs and mirrors(forward):
        order = np.arange(out.shape[1])
        for left, right in rules.flip_pairs:
            if max(left, right) < len(order):
                order[left], order[right] = right, left
        out = out[:, order]
    return out


def transform_targets(targets: SampleTargets, plan: SamplePlan, rules: TargetRules) -> SampleTargets:
    """One sample's instances after its plan: boxes mapped, clipped and sanitised; labels and
    keypoints of the dropped boxes dropped with them."""
    forward = forward_map(plan)
    boxes, kept = transform_boxes(targets.boxes, forward, plan.output_size, rules)
    keypoints = transform_keypoints(targets.keypoints[kept], forward, plan.output_size, rules)
    return SampleTargets(boxes, targets.labels[kept], keypoints)


@dataclass(frozen=True)
class TargetRequest:
    """What a session asks for besides images: boxes (with labels), keypoints (of those boxes'
    instances: they imply the boxes) and label masks, and the rules at the output's edges
    (the dataset supplies the flip pairs)."""

    boxes: bool = False
    keypoints: bool = False
    masks: bool = False
    min_area: float = 1.0
    min_visibility: float = 0.0
    erase_marks_ignore: bool = False

    def __post_init__(self) -> None:
        if self.keypoints and not self.boxes:
            object.__setattr__(self, "boxes", True)
        TargetRules(self.min_area, self.min_visibility)  # the same bounds, named the same way

    @property
    def any(self) -> bool:
        return self.boxes or self.masks

    @property
    def pixel_bytes(self) -> int:
        """Bytes a batch holds per output pixel: RGB, and a label where masks are asked for."""
        return 3 + int(self.masks)

    def rules(self, flip_pairs: tuple[tuple[int, int], ...] = ()) -> TargetRules:
        return TargetRules(self.min_area, self.min_visibility, flip_pairs, MASK_FILL, self.erase_marks_ignore)

    def key(self) -> str:
        """Its identity in a stream key: "" when nothing is asked for (a plain stream's key)."""
        if not self.any:
            return ""
        return (
            f"boxes={int(self.boxes)},keypoints={int(self.keypoints)},masks={int(self.masks)},"
            f"min_area={self.min_area!r},min_visibility={self.min_visibility!r},erase={int(self.erase_marks_ignore)}"
        )
