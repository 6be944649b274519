"""Boxes, keypoints and masks through plans, against albumentations and a numpy warp.

albumentations takes boxes in the same pixel-edge coordinates (pascal_voc) and keypoints in
pixel-centre coordinates ("xy": pixel (0, 0) is at 0), so its keypoints are given ours less half
a pixel and its answers get the half pixel back. Every case builds our plan from fixed records
(`plan_from_draws`) and gives albumentations the same parameters.
"""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest

from augserve.backends.masks import warp_mask
from augserve.core.errors import SpecError
from augserve.core.plan import make_plan, nearest_warp, plan_from_draws
from augserve.core.spec import AugmentSpec
from augserve.core.targets import MASK_FILL, SampleTargets, TargetRules, forward_map, transform_targets

HEIGHT, WIDTH = 60, 80
BOXES = np.array([[10, 12, 30, 40], [50, 5, 78, 20], [2, 44, 20, 58], [60, 40, 79, 59]], np.float32)
LABELS = np.array([1, 2, 3, 4])
KEYPOINTS = np.array([[12.0, 15.0], [60.0, 10.0], [0.5, 0.5], [79.5, 59.5], [40.0, 30.0]], np.float32)
# Same-coordinate tolerance: albumentations computes in float32.
ATOL = 1e-3


def plan_of(ops: list[dict], records: list[dict], size=(HEIGHT, WIDTH)):
    spec = AugmentSpec.from_dict({"ops": ops})
    return plan_from_draws(spec, 0, size, [(next(iter(op)), record) for op, record in zip(ops, records)])


def targets() -> SampleTargets:
    """Every box carries all the keypoints (visible), so keypoints are compared for each box."""
    keypoints = np.concatenate([KEYPOINTS, np.ones((len(KEYPOINTS), 1), np.float32)], axis=1)
    return SampleTargets(BOXES, LABELS, np.repeat(keypoints[None], len(BOXES), axis=0))


def albumentations_result(transforms: list, rules: TargetRules):
    compose = A.Compose(
        transforms,
        bbox_params=A.BboxParams(
            format="pascal_voc", label_fields=["labels"], min_area=rules.min_area, min_visibility=rules.min_visibility
        ),
        keypoint_params=A.KeypointParams(format="xy", remove_invisible=False),
    )
    result = compose(
        image=np.zeros((HEIGHT, WIDTH, 3), np.uint8), bboxes=BOXES, labels=LABELS, keypoints=KEYPOINTS - 0.5
    )
    return np.array(result["bboxes"], np.float32).reshape(-1, 4), np.array(result["labels"]), np.array(result["keypoints"]) + 0.5


CASES = {
    "horizontal flip": ([{"flip": {"horizontal": 1.0}}], [{"horizontal": True, "vertical": False}], [A.HorizontalFlip(p=1)]),
    "vertical flip": ([{"flip": {"vertical": 1.0}}], [{"horizontal": False, "vertical": True}], [A.VerticalFlip(p=1)]),
    "rotate 20": ([{"rotate": {"degrees": [-30, 30]}}], [{"angle": 20.0}], [A.Affine(rotate=(20, 20), p=1)]),
    "rotate -35": ([{"rotate": {"degrees": [-40, 40]}}], [{"angle": -35.0}], [A.Affine(rotate=(-35, -35), p=1)]),
    "shift": (
        [{"shift": {"x": [-0.5, 0.5], "y": [-0.5, 0.5]}}],
        [{"dx": 7.0, "dy": -4.0}],
        [A.Affine(translate_px={"x": (7, 7), "y": (-4, -4)}, p=1)],
    ),
    "zoom in": ([{"zoom": {"range": [0.5, 2.0]}}], [{"scale_x": 1.5, "scale_y": 1.5}], [A.Affine(scale=(1.5, 1.5), p=1)]),
    "zoom out": ([{"zoom": {"range": [0.5, 2.0]}}], [{"scale_x": 0.6, "scale_y": 0.6}], [A.Affine(scale=(0.6, 0.6), p=1)]),
    "crop": (
        [{"crop": {"size": [30, 40]}}],
        [{"top": 10, "left": 20, "height": 30, "width": 40}],
        [A.Crop(x_min=20, y_min=10, x_max=60, y_max=40)],
    ),
    "resized crop": (
        [{"random_resized_crop": {"size": [48, 48]}}],
        [{"top": 8, "left": 16, "height": 40, "width": 50, "size": [48, 48], "interpolation": "linear"}],
        [A.Crop(x_min=16, y_min=8, x_max=66, y_max=48), A.Resize(48, 48)],
    ),
    "rotate then flip then crop": (
        [{"rotate": {"degrees": [-30, 30]}}, {"flip": {"horizontal": 1.0}}, {"crop": {"size": [40, 50]}}],
        [{"angle": 12.0}, {"horizontal": True, "vertical": False}, {"top": 5, "left": 10, "height": 40, "width": 50}],
        [A.Affine(rotate=(12, 12), p=1), A.HorizontalFlip(p=1), A.Crop(x_min=10, y_min=5, x_max=60, y_max=45)],
    ),
}
RULES = {
    "keep all with area": TargetRules(min_area=0.0),
    "min area 40": TargetRules(min_area=40.0),
    "min visibility 0.55": TargetRules(min_area=0.0, min_visibility=0.55),
}


# albumentations resizes keypoints as x * scale in its pixel-centre coordinates; we (and its own
# boxes, and the pixels) use the half-pixel convention, x_edge * scale: the two differ by
# 0.5 * |scale - 1| on each axis (here 48/50 and 48/40).
KEYPOINT_ATOL = {"resized crop": 0.5 * abs(48 / 40 - 1) + ATOL}


# albumentations clips a box to every intermediate image and measures visibility against the
# last one; we map once by the whole plan and measure against the box's whole mapped envelope (a
# box rotated partly out of view counts that part as lost), so visibility is compared on single
# ops and on the resized crop (whose resize clips nothing).
PAIRS = [
    (case, rules_name)
    for case in CASES
    for rules_name in RULES
    if not (RULES[rules_name].min_visibility > 0 and case == "rotate then flip then crop")
]


@pytest.mark.parametrize(("case", "rules_name"), PAIRS)
def test_boxes_and_keypoints_equal_albumentations_on_the_same_parameters(case, rules_name):
    ops, records, transforms = CASES[case]
    rules = RULES[rules_name]
    ours = transform_targets(targets(), plan_of(ops, records), rules)
    boxes, labels, keypoints = albumentations_result(transforms, rules)
    np.testing.assert_allclose(ours.boxes, boxes, atol=ATOL, err_msg=case)
    np.testing.assert_array_equal(ours.labels, labels)
    for instance in ours.keypoints:
        np.testing.assert_allclose(instance[:, :2], keypoints, atol=KEYPOINT_ATOL.get(case, ATOL), err_msg=case)


def test_keypoints_that_leave_the_output_turn_invisible_and_pairs_swap_on_a_mirror():
    rules = TargetRules(min_area=0.0, flip_pairs=((0, 1),))
    plan = plan_of([{"flip": {"horizontal": 1.0}}, {"crop": {"size": [30, 40]}}],
                   [{"horizontal": True, "vertical": False}, {"top": 0, "left": 0, "height": 30, "width": 40}])
    keypoints = np.array([[[12.0, 15.0, 2.0], [60.0, 10.0, 1.0], [40.0, 50.0, 2.0], [70.0, 20.0, 0.0]]], np.float32)
    out = transform_targets(SampleTargets(BOXES[:1] * 0 + [50, 5, 78, 20], [1], keypoints), plan, rules)
    # Flipped: x -> 80 - x. (12, 15) -> (68, 15) is outside the 40-wide crop: invisible. (60, 10)
    # -> (20, 10) stays visible. Then 0 and 1 swap (a mirror). (40, 50) leaves through the bottom.
    np.testing.assert_allclose(out.keypoints[0, :, :2], [[20, 10], [68, 15], [40, 50], [10, 20]])
    assert out.keypoints[0, :, 2].tolist() == [1.0, 0.0, 0.0, 0.0]  # invisible stays invisible
    # A half turn is no mirror (both flips at once): nothing swaps, (12, 15) -> (68, 45).
    turned = plan_of([{"rotate": {"degrees": [-200, 200]}}], [{"angle": 180.0}])
    half_turn = transform_targets(SampleTargets(BOXES[:1], [1], keypoints), turned, rules)
    np.testing.assert_allclose(half_turn.keypoints[0, :2, :2], [[68, 45], [20, 50]], atol=1e-9)


def test_a_box_rotated_out_of_view_is_dropped_with_its_label_and_keypoints():
    plan = plan_of([{"shift": {"x": [-1, 1]}}], [{"dx": -70.0, "dy": 0.0}])
    out = transform_targets(targets(), plan, TargetRules(min_area=1.0))
    # Boxes 0 and 2 (x_max 30 and 20) leave through the left edge; 1 and 3 stay, shifted.
    assert out.labels.tolist() == [2, 4]
    np.testing.assert_allclose(out.boxes, [[0, 5, 8, 20], [0, 40, 9, 59]])
    assert out.keypoints.shape == (2, len(KEYPOINTS), 3)


def test_nearest_plans_map_targets_without_their_tie_break():
    linear = make_plan(AugmentSpec.from_dict({"ops": [{"zoom": {"range": [2.0, 2.0]}}]}), 1, 0, 3, (HEIGHT, WIDTH))
    nearest = make_plan(
        AugmentSpec.from_dict({"ops": [{"zoom": {"range": [2.0, 2.0]}}, {"resize": {"size": [HEIGHT, WIDTH], "interpolation": "nearest"}}]}),
        1, 0, 3, (HEIGHT, WIDTH),
    )
    assert not np.array_equal(linear.warp, nearest.warp)
    np.testing.assert_allclose(forward_map(nearest), forward_map(linear), atol=1e-12)


def test_rules_refuse_bad_values_naming_the_field():
    with pytest.raises(SpecError, match="targets.min_visibility"):
        TargetRules(min_visibility=1.5)
    with pytest.raises(SpecError, match="targets.flip_pairs"):
        TargetRules(flip_pairs=((1, 2), (2, 3)))
    with pytest.raises(SpecError, match="targets.keypoints"):
        SampleTargets(BOXES, LABELS, np.zeros((3, 2, 3)))


# --- masks -----------------------------------------------------------------------------------


def nearest_reference(mask: np.ndarray, warp: np.ndarray, size: tuple[int, int], fill: int) -> np.ndarray:
    """Nearest-neighbour sampling written out: each output pixel centre mapped by `warp` into the
    mask, rounded half up to a pixel, `fill` outside."""
    height, width = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    source_x = warp[0, 0] * xs + warp[0, 1] * ys + warp[0, 2]
    source_y = warp[1, 0] * xs + warp[1, 1] * ys + warp[1, 2]
    column, row = np.floor(source_x + 0.5).astype(int), np.floor(source_y + 0.5).astype(int)
    inside = (column >= 0) & (column < mask.shape[1]) & (row >= 0) & (row < mask.shape[0])
    out = np.full(size, fill, np.uint8)
    out[inside] = mask[row[inside], column[inside]]
    return out


MASK_SPECS = {
    "rotate + flip + crop": {"ops": [{"rotate": {"degrees": [-30, 30]}}, {"flip": {"horizontal": 0.5}}, {"random_resized_crop": {"size": [48, 40]}}]},
    "zoom by 2 (ties)": {"ops": [{"zoom": {"range": [2.0, 2.0]}}]},
    "shear + shift": {"ops": [{"shear": {"degrees": [-20, 20]}}, {"shift": {"x": [-0.2, 0.2], "y": [-0.2, 0.2]}}]},
    "nearest": {"ops": [{"rotate": {"degrees": [-45, 45]}}, {"random_resized_crop": {"size": [40, 40], "interpolation": "nearest"}}]},
}


@pytest.mark.parametrize("name", MASK_SPECS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masks_follow_the_warp_as_a_nearest_neighbour_warp_written_out(name, seed):
    rng = np.random.default_rng(seed)
    mask = rng.integers(0, 21, size=(HEIGHT, WIDTH), dtype=np.uint8)
    spec = AugmentSpec.from_dict(MASK_SPECS[name])
    rules = TargetRules()
    for sample_id in range(4):
        plan = make_plan(spec, seed, 0, sample_id, (HEIGHT, WIDTH))
        expected = nearest_reference(mask, nearest_warp(plan), plan.output_size, MASK_FILL)
        out = warp_mask(mask, plan, rules)
        assert out.shape == plan.output_size
        # OpenCV's fixed-point coordinates may round a coordinate within 1/32 px of a pixel edge
        # the other way; the tie-break keeps exact ties away from edges, so this stays tiny.
        assert np.mean(out != expected) <= 0.002, (name, sample_id, np.mean(out != expected))
        assert set(np.unique(out)) <= set(np.unique(mask)) | {MASK_FILL}  # labels, never blends


def test_erasing_marks_the_mask_as_ignore_only_when_asked():
    spec = AugmentSpec.from_dict({"ops": [{"random_erasing": {"p": 1.0}}]})
    plan = make_plan(spec, 0, 0, 0, (HEIGHT, WIDTH))
    assert plan.erase_steps and plan.erase_steps[0].rectangles
    mask = np.full((HEIGHT, WIDTH), 7, np.uint8)
    assert (warp_mask(mask, plan, TargetRules()) == 7).all()
    marked = warp_mask(mask, plan, TargetRules(erase_marks_ignore=True))
    top, left, height, width = plan.erase_steps[0].rectangles[0]
    assert (marked[top : top + height, left : left + width] == MASK_FILL).all()
    assert (marked == 7).any()
