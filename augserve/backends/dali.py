"""The NVIDIA DALI backend: the same plans as the OpenCV backend, run by a DALI pipeline.

Encoded bytes and per-sample numbers enter through `external_source`; `decoders.image_slice`
decodes only the plan's source window (device `mixed` on a GPU, `cpu` with `device_id=None`
for CPU-only runs); one `warp_affine`, one `coord_transform` for the colour matrix, and one
`erase` per erasing op. DALI is imported here only, so the rest of augserve runs without it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from augserve.backends.base import AugmentResult, output_array, output_size_of
from augserve.core.plan import SamplePlan

log = logging.getLogger(__name__)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def gpu_count() -> int:
    """Number of CUDA devices DALI can see (0 without a driver)."""
    try:
        from nvidia.dali.backend import GetCUDADeviceCount

        return int(GetCUDADeviceCount())
    except Exception:
        return 0


@dataclass(frozen=True)
class PipelineShape:
    """What fixes a pipeline's graph; samples sharing one run in the same pipeline."""

    output_size: tuple[int, int]
    interpolation: str
    fill_mode: str
    fill_value: int
    has_color: bool
    erase_values: tuple[int, ...]

    @classmethod
    def of_batch(cls, plans: Sequence[SamplePlan]) -> PipelineShape:
        """The shape of a batch; only the colour matrix may be absent in some samples."""
        first = plans[0]
        shape = cls(
            output_size_of(plans),
            first.interpolation,
            first.fill_mode,
            first.fill_value,
            any(plan.color is not None for plan in plans),
            tuple(step.value for step in first.erase_steps),
        )
        for plan in plans:
            erase_values = tuple(step.value for step in plan.erase_steps)
            if (plan.interpolation, plan.fill_mode, plan.fill_value, erase_values) != (
                shape.interpolation,
                shape.fill_mode,
                shape.fill_value,
                shape.erase_values,
            ):
                raise ValueError("plans of one batch must come from one spec")
        return shape


def dali_warp_matrix(plan: SamplePlan) -> np.ndarray:
    """The plan's warp in DALI's convention, relative to the decoded window.

    DALI puts pixel centres at +0.5 and the plan at integers: src' = A (dst' - 0.5) + b + 0.5.
    """
    linear, offset = plan.warp[:, :2], plan.warp[:, 2]
    window_x, window_y = plan.source_window[:2]
    offset = offset - np.array([window_x, window_y]) + 0.5 - linear @ np.array([0.5, 0.5])
    matrix = np.concatenate([linear, offset[:, None]], axis=1)
    # A pile of extreme zooms can leave float32's range; such an output is all fill anyway.
    limit = float(np.finfo(np.float32).max) / 4
    return np.clip(matrix, -limit, limit).astype(np.float32)


def _build_pipeline(shape: PipelineShape, batch_size: int, threads: int, device_id: int | None):
    from nvidia.dali import fn, pipeline_def, types

    decode_device = "cpu" if device_id is None else "mixed"
    interpolation = types.INTERP_LINEAR if shape.interpolation == "linear" else types.INTERP_NN
    # DALI clamps to the border pixel when no fill value is given: fill_mode "nearest".
    fill_value = float(shape.fill_value) if shape.fill_mode == "constant" else None

    @pipeline_def(
        batch_size=batch_size,
        num_threads=threads,
        device_id=device_id,
        exec_dynamic=True,
        prefetch_queue_depth=1,
    )
    def augment_pipeline():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8)
        window_anchor = fn.external_source(name="window_anchor", dtype=types.INT32)
        window_shape = fn.external_source(name="window_shape", dtype=types.INT32)
        warp = fn.external_source(name="warp", dtype=types.FLOAT)
        images = fn.decoders.image_slice(
            encoded,
            window_anchor,
            window_shape,
            device=decode_device,
            output_type=types.RGB,
            axis_names="WH",
            adjust_orientation=False,  # the plan's warp applies EXIF orientation
        )
        images = fn.warp_affine(
            images,
            matrix=warp,
            size=list(shape.output_size),
            fill_value=fill_value,
            interp_type=interpolation,
            inverse_map=True,
        )
        if shape.has_color:
            color = fn.external_source(name="color", dtype=types.FLOAT)
            images = fn.coord_transform(images, MT=color, dtype=types.UINT8)
        for index, value in enumerate(shape.erase_values):
            erase_anchor = fn.external_source(name=f"erase_anchor_{index}", dtype=types.FLOAT)
            erase_shape = fn.external_source(name=f"erase_shape_{index}", dtype=types.FLOAT)
            images = fn.erase(
                images, anchor=erase_anchor, shape=erase_shape, axis_names="HW", fill_value=float(value)
            )
        return images

    pipe = augment_pipeline()
    pipe.build()
    return pipe


IDENTITY_COLOR = np.eye(3, 4, dtype=np.float32)


def _feeds(
    shape: PipelineShape, plans: Sequence[SamplePlan], encoded: Sequence[bytes]
) -> dict[str, list[np.ndarray]]:
    feeds: dict[str, list[np.ndarray]] = {
        "encoded": [np.frombuffer(data, np.uint8) for data in encoded],
        "window_anchor": [np.array(plan.source_window[:2], np.int32) for plan in plans],
        "window_shape": [np.array(plan.source_window[2:], np.int32) for plan in plans],
        "warp": [dali_warp_matrix(plan) for plan in plans],
    }
    if shape.has_color:
        feeds["color"] = [IDENTITY_COLOR if plan.color is None else plan.color for plan in plans]
    for index in range(len(shape.erase_values)):
        rectangles = [plan.erase_steps[index].rectangles for plan in plans]
        feeds[f"erase_anchor_{index}"] = [
            np.array([value for r in rects for value in r[:2]], np.float32) for rects in rectangles
        ]
        feeds[f"erase_shape_{index}"] = [
            np.array([value for r in rects for value in r[2:]], np.float32) for rects in rectangles
        ]
    return feeds


class DaliBackend:
    """Plans executed by DALI pipelines, one per `PipelineShape`, built on first use.

    `device_id=None` runs everything on the CPU; an integer decodes with `mixed` and warps on
    that GPU. A pipeline that fails (DALI invalidates it) is rebuilt, and the failing batch is
    rerun one sample at a time to name the bad ones.
    """

    def __init__(self, device_id: int | None = None, threads: int = 2, max_batch_size: int = 256) -> None:
        self.device_id = device_id
        self.threads = threads
        self.max_batch_size = max_batch_size
        self.name = "dali-cpu" if device_id is None else "dali-gpu"
        self._pipelines: dict[PipelineShape, object] = {}
        self._lock = threading.Lock()

    def _pipeline(self, shape: PipelineShape):
        pipe = self._pipelines.get(shape)
        if pipe is None:
            pipe = _build_pipeline(shape, self.max_batch_size, self.threads, self.device_id)
            self._pipelines[shape] = pipe
        return pipe

    def _run(self, shape: PipelineShape, encoded: Sequence[bytes], plans: Sequence[SamplePlan]) -> np.ndarray:
        pipe = self._pipeline(shape)
        for name, values in _feeds(shape, plans, encoded).items():
            pipe.feed_input(name, values)
        try:
            (images,) = pipe.run()
        except Exception:
            # DALI marks a pipeline invalid after an error; drop it so the next run rebuilds.
            del self._pipelines[shape]
            raise
        if self.device_id is not None:
            images = images.as_cpu()
        return images.as_array()

    def augment(
        self, encoded: Sequence[bytes], plans: Sequence[SamplePlan], out: np.ndarray | None = None
    ) -> AugmentResult:
        shape = PipelineShape.of_batch(plans)
        images = output_array(plans, out)
        if len(plans) > self.max_batch_size:
            raise ValueError(f"batch of {len(plans)} is over this backend's maximum {self.max_batch_size}")
        with self._lock:
            try:
                images[...] = self._run(shape, encoded, plans)
                return AugmentResult(images, list(range(len(plans))))
            except Exception as error:
                log.info("DALI batch failed (%s); retrying sample by sample", str(error).splitlines()[0])
            kept: list[int] = []
            failures: dict[int, str] = {}
            for index in range(len(plans)):
                try:
                    self._run(shape, encoded[index : index + 1], plans[index : index + 1])
                    kept.append(index)
                except Exception as error:
                    failures[index] = _short_reason(error)
            if kept:
                images[: len(kept)] = self._run(shape, [encoded[i] for i in kept], [plans[i] for i in kept])
            return AugmentResult(images[: len(kept)], kept, failures)

    def close(self) -> None:
        with self._lock:
            self._pipelines.clear()


def _short_reason(error: Exception) -> str:
    """The line of a DALI error that says what failed (its messages carry a pipeline traceback
    and end with a note that the pipeline is no longer valid)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and "no longer valid" not in line]
    telling = [line for line in lines if "decod" in line.lower()] or lines
    return "could not be decoded by DALI: " + (telling[-1] if telling else type(error).__name__)
