"""Label masks through a sample's plan: the plan's warp with nearest interpolation.

A mask is a [H, W] uint8 label map of the stored image. It takes the plan's geometry only:
no colour, pixel or filter step touches labels. Outside the image it takes the rules'
`mask_fill` (the ignore label); erased rectangles become it too where the rules say so.

Nearest sampling of a warp that scales by whole factors lands exactly between two source pixels;
the plan's tie-break shift decides those ties the same way for every sample, so masks are
sampled with `nearest_warp` (a nearest plan's own warp, others' with that shift).
"""

from __future__ import annotations

import cv2
import numpy as np

from augserve.core.plan import SamplePlan, nearest_warp
from augserve.core.targets import TargetRules


def warp_mask(mask: np.ndarray, plan: SamplePlan, rules: TargetRules) -> np.ndarray:
    """The [out_h, out_w] uint8 label map of `mask` ([H, W] uint8, the stored image's size)."""
    if mask.shape != tuple(plan.source_size):
        raise ValueError(f"mask of shape {list(mask.shape)} for an image of {list(plan.source_size)}")
    height, width = plan.output_size
    out = cv2.warpAffine(
        np.ascontiguousarray(mask, dtype=np.uint8),
        nearest_warp(plan),
        (width, height),
        flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=int(rules.mask_fill),
    )
    if rules.erase_marks_ignore:
        for step in plan.erase_steps:
            for top, left, rect_h, rect_w in step.rectangles:
                out[top : top + rect_h, left : left + rect_w] = rules.mask_fill
    return out
