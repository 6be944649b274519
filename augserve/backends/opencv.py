"""The OpenCV backend: the CPU fallback, and the reference the DALI backend is tested against.

Per sample: `imdecode` to RGB as stored, one `warpAffine` (which also applies the EXIF
orientation) straight into the batch's output slot,
one `cv2.transform` for the colour matrix, numpy slices for erasing. Samples run on a thread
pool; OpenCV releases the GIL, so threads scale with cores.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import cv2
import numpy as np

from augserve.backends.base import AugmentResult, compact, output_array
from augserve.core.plan import SamplePlan

INTERPOLATION_FLAGS = {"linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}
BORDER_MODES = {"constant": cv2.BORDER_CONSTANT, "nearest": cv2.BORDER_REPLICATE}


class DecodeError(Exception):
    """A sample's bytes did not decode to the size its header promised."""


def decode_stored(data: bytes) -> np.ndarray:
    """Decode to [H, W, 3] uint8 RGB as stored (no EXIF rotation); DecodeError if corrupt."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise DecodeError("could not be decoded")
    return image


def apply_plan(image: np.ndarray, plan: SamplePlan, out: np.ndarray) -> None:
    """Write the augmented `image` (decoded, [H, W, 3] uint8 RGB as stored) into `out`."""
    if image.shape[:2] != plan.source_size:
        raise DecodeError(f"decoded size {image.shape[:2]} differs from the header's {plan.source_size}")
    out_h, out_w = plan.output_size
    cv2.warpAffine(
        image,
        plan.warp,
        (out_w, out_h),
        dst=out,
        flags=INTERPOLATION_FLAGS[plan.interpolation] | cv2.WARP_INVERSE_MAP,
        borderMode=BORDER_MODES[plan.fill_mode],
        borderValue=(plan.fill_value,) * 3,
    )
    if plan.color is not None:
        cv2.transform(out, plan.color, dst=out)
    for step in plan.erase_steps:
        for top, left, height, width in step.rectangles:
            out[top : top + height, left : left + width] = step.value


def augment_into(data: bytes, plan: SamplePlan, out: np.ndarray) -> None:
    """Decode `data` and write the augmented sample into `out` ([H, W, 3] uint8, RGB)."""
    apply_plan(decode_stored(data), plan, out)


class OpenCVBackend:
    """Plans executed with OpenCV on a pool of `threads` worker threads."""

    name = "opencv"

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or os.cpu_count() or 1
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="augserve-opencv")

    def augment(
        self, encoded: Sequence[bytes], plans: Sequence[SamplePlan], out: np.ndarray | None = None
    ) -> AugmentResult:
        images = output_array(plans, out)

        def run(index: int) -> str | None:
            try:
                augment_into(encoded[index], plans[index], images[index])
            except (DecodeError, cv2.error) as error:
                return str(error)
            return None

        reasons = list(self._pool.map(run, range(len(plans))))
        failures = {index: reason for index, reason in enumerate(reasons) if reason is not None}
        if not failures:
            return AugmentResult(images, list(range(len(plans))))
        kept = [index for index in range(len(plans)) if index not in failures]
        return AugmentResult(compact(images, kept), kept, failures)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
