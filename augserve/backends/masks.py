"""Label masks through a sample's plan: the plan's warp with nearest interpolation.

A mask is a [H, W] uint8 label map of the stored image. It takes the plan's geometry only:
no colour, pixel or filter step touches labels. Outside the image it takes the rules'
`mask_fill` (the ignore label); erased rectangles become it too where the rules say so.

Nearest sampling of a warp that scales by whole factors lands exactly between two source pixels;
the plan's tie-break shift (already in the warp of a nearest plan) decides those ties the same
way for every sample, so it is added here to the warps of other plans as well.
"""

from __future__ import annotations

import cv2
import numpy as np

from augserve.core.plan import NEAREST_TIE_BREAK, SamplePlan
from augserve.core.targets import TargetRules


def mask_warp(plan: SamplePlan) -> np.ndarray:
    """The [2, 3] output-to-source map a mask is sampled with."""
    warp = plan.warp.astype(np.float64, copy=True)
    identity_linear = np.allclose(warp[:, :2], np.eye(2), rtol=1e-5, atol=1e-8)
    if plan.interpolation != "nearest" and not identity_linear:
        warp[:, 2] += NEAREST_TIE_BREAK
    return warp


def warp_mask(mask: np.ndarray, plan: SamplePlan, rules: TargetRules) -> np.ndarray:
    """The [out_h, out_w] uint8 label map of `mask` ([H, W] uint8, the stored image's size)."""
    if mask.shape != tuple(plan.source_size):
        raise ValueError(f"mask of shape {list(mask.shape)} for an image of {list(plan.source_size)}")
    height, width = plan.output_size
    out = cv2.warpAffine(
        np.ascontiguousarray(mask, dtype=np.uint8),
        mask_warp(plan),
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
