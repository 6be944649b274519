"""The OpenCV backend: the CPU fallback, and the reference the DALI backend is tested against.

Per sample: `imdecode` to RGB as stored, one `warpAffine` (which also applies the EXIF
orientation) straight into the batch's output slot, one `cv2.transform` for the colour matrix,
the plan's pixel steps (`augserve.backends.pixels`: lookup tables and small filters), numpy
slices for erasing. A batch runs on a thread pool as one task per worker thread, each
taking the batch's next sample until none is left; OpenCV releases the GIL, so threads scale
with cores.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait

import cv2
import numpy as np

from augserve.backends.base import AugmentResult, SampleFailure, compact, output_array
from augserve.backends.pixels import apply_steps
from augserve.core.plan import SamplePlan

log = logging.getLogger(__name__)

# RGB as stored: plans carry the EXIF orientation in their warp.
DECODE_FLAGS = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
INTERPOLATION_FLAGS = {"linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}
# Plans map output pixels to source pixels, so every warp is an inverse map.
WARP_FLAGS = {name: flag | cv2.WARP_INVERSE_MAP for name, flag in INTERPOLATION_FLAGS.items()}
BORDER_MODES = {"constant": cv2.BORDER_CONSTANT, "nearest": cv2.BORDER_REPLICATE}


class DecodeError(Exception):
    """A sample's bytes did not decode to the size its header promised."""


def decode_stored(data: bytes) -> np.ndarray:
    """Decode to [H, W, 3] uint8 RGB as stored (no EXIF rotation); DecodeError if corrupt."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), DECODE_FLAGS)
    if image is None:
        raise DecodeError("could not be decoded")
    return image


def apply_plan(image: np.ndarray, plan: SamplePlan, out: np.ndarray) -> None:
    """Write the augmented `image` (decoded, [H, W, 3] uint8 RGB as stored, or [H, W, 4] RGBA
    as `OpenCVBackend.decode` gives it) into `out`."""
    if image.shape[:2] != plan.source_size:
        raise DecodeError(
            f"decoded size {image.shape[:2]} differs from the header's {plan.source_size}"
        )
    warp_into(image, plan, out)
    if plan.color is not None:
        cv2.transform(out, plan.color, dst=out)
    if plan.pixel_steps:
        apply_steps(out, plan.pixel_steps)
    for step in plan.erase_steps:
        for top, left, height, width in step.rectangles:
            out[top : top + height, left : left + width] = step.value


_scratch = threading.local()  # per worker thread: an RGBA image of the output size


def warp_into(image: np.ndarray, plan: SamplePlan, out: np.ndarray) -> None:
    """The plan's one warp of `image` into `out` ([H, W, 3] uint8). A 4-channel (RGBA) image
    is warped into a scratch RGBA image, then its RGB copied into `out`: OpenCV's bilinear
    warp of 4 channels takes less than half the time of 3, and gives the same RGB values
    (each channel is interpolated alike; tests/unit/test_decoding.py checks it)."""
    out_h, out_w = plan.output_size
    four = image.shape[2] == 4
    target = out
    if four:
        target = getattr(_scratch, "rgba", None)
        if target is None or target.shape[:2] != out.shape[:2]:
            target = _scratch.rgba = np.empty((*out.shape[:2], 4), np.uint8)
    # Arguments by position (src, M, dsize, dst, flags, borderMode, borderValue): OpenCV's
    # keyword parsing took 1 us more per call, under the GIL, four times per image when four
    # specs share a decode.
    cv2.warpAffine(
        image,
        plan.warp,
        (out_w, out_h),
        target,
        WARP_FLAGS[plan.interpolation],
        BORDER_MODES[plan.fill_mode],
        (plan.fill_value,) * (4 if four else 3),
    )
    if four:
        cv2.cvtColor(target, cv2.COLOR_RGBA2RGB, out)


def augment_into(data: bytes, plan: SamplePlan, out: np.ndarray) -> None:
    """Decode `data` and write the augmented sample into `out` ([H, W, 3] uint8, RGB)."""
    apply_plan(decode_stored(data), plan, out)


def run_samples(
    pool: ThreadPoolExecutor, tasks: int, count: int, work: Callable[[int], None]
) -> dict[int, str]:
    """Call `work(index)` for every index in range(count) as `tasks` tasks on `pool`, each taking
    the next index until none is left; return the reasons of the samples whose work raised
    DecodeError or cv2.error, by ascending index. Returns when every task has ended (none still
    writes into an output then), and raises what else a task raised.

    A task per sample cost a future, a queue hand-off and a thread wake-up per image, in Python
    under the GIL; fixed shares per task would leave a thread idle when its share decoded
    faster. next() on itertools.count is atomic under the GIL.
    """
    take = itertools.count().__next__

    def run() -> dict[int, str]:
        failures: dict[int, str] = {}
        index = take()
        while index < count:
            try:
                work(index)
            except (DecodeError, cv2.error) as error:
                failures[index] = str(error)
            index = take()
        return failures

    started = [pool.submit(run) for _ in range(min(tasks, count))]
    wait(started)
    failures: dict[int, str] = {}
    for task in started:
        failures.update(task.result())
    return dict(sorted(failures.items()))


class OpenCVBackend:
    """Plans executed with OpenCV on a pool of `threads` worker threads.

    OpenCV's own thread pool is set to one thread (`cv2.setNumThreads(1)`, process-wide): the
    worker threads are the parallelism. Inside each of them OpenCV would otherwise split every
    warp over threads of its own, so more threads than cores contend for them, and threads
    holding the GIL (the producers drawing plans) lose their core to them. Outputs do not
    depend on it (OpenCV splits rows; each pixel is computed alike).
    """

    name = "opencv"

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or os.cpu_count() or 1
        if cv2.getNumThreads() != 1:
            log.info(
                "OpenCV's own threads: %d -> 1 (the backend's %d worker threads run samples)",
                cv2.getNumThreads(),
                self.threads,
            )
            cv2.setNumThreads(1)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="augserve-opencv")

    def augment(
        self, encoded: Sequence[bytes], plans: Sequence[SamplePlan], out: np.ndarray | None = None
    ) -> AugmentResult:
        images = output_array(plans, out)
        count = len(plans)
        failures = run_samples(
            self._pool,
            self.threads,
            count,
            lambda index: augment_into(encoded[index], plans[index], images[index]),
        )
        if not failures:
            return AugmentResult(images, list(range(count)))
        kept = [index for index in range(count) if index not in failures]
        return AugmentResult(compact(images, kept), kept, failures)

    # --- decoding apart (backends.base.DecodesApart): one decode for several specs or epochs ---

    def decode(self, data: bytes) -> np.ndarray:
        """`data` decoded to [H, W, 4] uint8 RGBA (alpha 255) as stored: kept for other specs
        and epochs, and warped faster than RGB (`warp_into`); SampleFailure with the reason
        `augment` would give where it cannot be decoded."""
        try:
            return cv2.cvtColor(decode_stored(data), cv2.COLOR_RGB2RGBA)
        except (DecodeError, cv2.error) as error:
            raise SampleFailure(str(error)) from None

    def apply_decoded(self, image: np.ndarray, plan: SamplePlan, out: np.ndarray) -> None:
        """`apply_plan` from a decoded image (not written to) into `out`; SampleFailure with the
        reason `augment` would give where the image does not fit the plan."""
        try:
            apply_plan(image, plan, out)
        except (DecodeError, cv2.error) as error:
            raise SampleFailure(str(error)) from None

    def run_each(self, count: int, work: Callable[[int], None]) -> dict[int, str]:
        """`work(index)` for each index on the worker threads (as `augment` runs a batch); the
        reason of each SampleFailure, by ascending index."""

        def guarded(index: int) -> None:
            try:
                work(index)
            except SampleFailure as failure:
                raise DecodeError(str(failure)) from None

        return run_samples(self._pool, self.threads, count, guarded)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
