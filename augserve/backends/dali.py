"""The NVIDIA DALI backend: the same plans as the OpenCV backend, run by DALI pipelines.

Encoded bytes and per-sample numbers enter through `external_source`; `decoders.image_slice`
decodes only the plan's source window (device `mixed` on a GPU, `cpu` with `device_id=None`
for CPU-only runs); one `warp_affine` (its output size a per-sample input), one
`coord_transform` for the colour matrix, the per-pixel stage (one place per pixel step, where
DALI's conditionals send each sample down the branch of its step's kind: `&` for posterize,
arithmetic for solarize, `reductions.min/max` and integer arithmetic for autocontrast,
`equalize`, a per-sample 3x3 `filter` for sharpness, `gaussian_blur`; every parameter a
per-sample input), and one `erase` per erasing op (its fill a per-sample input). DALI is
imported here only, so the rest of augserve runs without it.

How a batch runs: each cached pipeline has one thread of its own, the only one that calls it
(DALI's Python `Pipeline` is not meant for calls from several threads). Callers hand it a job
(the feeds and where the images go) and wait; the thread feeds up to `prefetch_depth` jobs
ahead and schedules them, so DALI's own prefetching runs batch n+1 while batch n finishes,
then copies each output once, straight into the caller's array (a ring slot), and wakes its
caller. Several callers (producers, or one producer's read-ahead) share the pipelines without
a lock around the backend; `PipelinePool` decides which pipeline takes a batch, when to build
another and which idle one to evict (by count, and by device memory where it is measured).

Failures are kept apart: an image DALI cannot decode is a failure of that sample (the batch is
rerun sample by sample to name it); DALI missing, a pipeline that will not build, a CUDA error
or running out of memory is a `BackendError`, and `health` records it. A pipeline proves
itself on known-good pictures (a PNG and a JPEG) before its first batch, and again when every
sample of a batch failed, so a broken backend is never reported as bad images.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import NoReturn

import numpy as np

from augserve.backends.base import (
    AugmentResult,
    BackendHealth,
    output_array,
    output_size_of,
)
from augserve.core.errors import BackendError, SpecError
from augserve.core.ops.canvas import IDENTITY_STEP, PIXEL_KINDS, EraseStep, PixelStep
from augserve.core.ops.pixel import blur_radius, sharpness_kernel
from augserve.core.plan import SamplePlan

log = logging.getLogger(__name__)

# Causes of a BackendError, as its message names them.
DALI_UNAVAILABLE = "DALI not importable"
PIPELINE_BUILD = "pipeline build"
CUDA_ERROR = "CUDA error"
OUT_OF_MEMORY = "out of memory"
KNOWN_GOOD_FAILED = "pipeline fails on a known-good image"

DEFAULT_PREFETCH_DEPTH = 2  # batches fed to one pipeline ahead of the one it finishes
DEFAULT_READ_AHEAD_BATCHES = 2  # batches each producer reads and plans while DALI runs one
# One pipeline per shape: its prefetch keeps it busy; on the CPU a second one beside it only
# competes for the same cores (docs/benchmarks.md, "The DALI backend as a pipeline").
DEFAULT_PIPELINES_PER_SHAPE = 1
DEFAULT_MAX_PIPELINES = 8
MAX_ERASE_OPS = 8  # erasing ops one pipeline runs (the graph has one `erase` each)
MAX_PIXEL_STEPS = 16  # pixel steps one pipeline runs (the graph has one place each)
# A pixel step's kind as the per-sample number its place in the graph branches on.
PIXEL_KIND_CODES = {kind: code for code, kind in enumerate(PIXEL_KINDS)}
DISPLACED_RETRIES = 8  # times a batch moves on when other batches broke its pipeline

# DALI reports allocation failures and CUDA errors as RuntimeError text.
OUT_OF_MEMORY_TEXT = re.compile(
    r"out of memory|bad_alloc|cudaErrorMemoryAllocation|CUDA_ERROR_OUT_OF_MEMORY|can't allocate|allocation fail",
    re.IGNORECASE,
)
CUDA_ERROR_TEXT = re.compile(
    r"CUDA error|cudaError|CUDA_ERROR|CUDA driver|no CUDA-capable device|CUDA runtime|nvrtc|NVML",
    re.IGNORECASE,
)


def import_dali():
    """DALI's `fn`, `pipeline_def` and `types`; a BackendError naming the import error."""
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError as error:
        raise BackendError(DALI_UNAVAILABLE, f"{error} (pip install 'augserve[dali]')") from error
    return fn, pipeline_def, types


def dali_available() -> bool:
    try:
        import_dali()
    except BackendError:
        return False
    return True


def gpu_count() -> int:
    """Number of CUDA devices DALI can see (0 without a driver)."""
    try:
        from nvidia.dali.backend import GetCUDADeviceCount

        return int(GetCUDADeviceCount())
    except Exception:
        return 0


def backend_cause(error: BaseException) -> str | None:
    """OUT_OF_MEMORY or CUDA_ERROR when a DALI error is the backend's own, else None (the
    batch's data)."""
    if isinstance(error, BackendError):
        return error.cause
    if isinstance(error, MemoryError):
        return OUT_OF_MEMORY
    text = str(error)
    if OUT_OF_MEMORY_TEXT.search(text):
        return OUT_OF_MEMORY
    if CUDA_ERROR_TEXT.search(text):
        return CUDA_ERROR
    return None


def _telling_line(error: BaseException, keywords: tuple[str, ...]) -> str:
    """The line of a DALI error that says what failed (its messages carry a pipeline traceback
    and end with a note that the pipeline is no longer valid): the last naming a keyword."""
    lines = [
        line.strip()
        for line in str(error).splitlines()
        if line.strip() and "no longer valid" not in line
    ]
    telling = [line for line in lines if any(word in line.lower() for word in keywords)] or lines
    return telling[-1] if telling else type(error).__name__


def first_line(error: BaseException) -> str:
    return _telling_line(error, ("decod", "error", "memory"))


def decode_reason(error: BaseException) -> str:
    """A skipped sample's reason, from DALI's error."""
    return "could not be decoded by DALI: " + _telling_line(error, ("decod",))


@dataclass(frozen=True)
class PipelineShape:
    """What fixes a pipeline's graph; samples sharing one run in the same pipeline.

    Output sizes and erase fill values are per-sample inputs, so they make no new pipelines;
    `fill_value` counts only for fill_mode "constant"."""

    interpolation: str
    fill_mode: str
    fill_value: int
    has_color: bool
    erase_ops: int
    pixel_steps: int = 0

    @classmethod
    def of_batch(cls, plans: Sequence[SamplePlan]) -> PipelineShape:
        """The shape of a batch; only the colour matrix may be absent in some samples."""
        first = plans[0]
        shape = cls(
            first.interpolation,
            first.fill_mode,
            first.fill_value if first.fill_mode == "constant" else 0,
            any(plan.color is not None for plan in plans),
            len(first.erase_steps),
            len(first.pixel_steps),
        )
        for plan in plans:
            if (
                plan.interpolation,
                plan.fill_mode,
                plan.fill_value,
                len(plan.erase_steps),
                len(plan.pixel_steps),
            ) != (
                first.interpolation,
                first.fill_mode,
                first.fill_value,
                shape.erase_ops,
                shape.pixel_steps,
            ):
                raise ValueError("plans of one batch must come from one spec")
        if shape.erase_ops > MAX_ERASE_OPS:
            raise SpecError(
                "spec.ops",
                f"{shape.erase_ops} erasing ops; the DALI backend runs at most {MAX_ERASE_OPS}",
            )
        if shape.pixel_steps > MAX_PIXEL_STEPS:
            raise SpecError(
                "spec.ops",
                f"{shape.pixel_steps} pixel steps (per-pixel ops, policy sub-ops); the DALI "
                f"backend runs at most {MAX_PIXEL_STEPS}",
            )
        return shape

    def __str__(self) -> str:
        fill = f"constant {self.fill_value}" if self.fill_mode == "constant" else self.fill_mode
        colour = "colour" if self.has_color else "no colour"
        pixel = f", {self.pixel_steps} pixel step(s)" if self.pixel_steps else ""
        return f"{self.interpolation}, fill {fill}, {colour}{pixel}, {self.erase_ops} erase op(s)"


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


def build_pipeline(
    shape: PipelineShape, batch_size: int, threads: int, device_id: int | None, prefetch_depth: int
):
    """A built DALI pipeline for `shape`: inputs by name (see `pipeline_feeds`), one output
    [N, H, W, 3] uint8."""
    fn, pipeline_def, types = import_dali()
    decode_device = "cpu" if device_id is None else "mixed"
    interpolation = types.INTERP_LINEAR if shape.interpolation == "linear" else types.INTERP_NN
    # DALI clamps to the border pixel when no fill value is given: fill_mode "nearest".
    fill_value = float(shape.fill_value) if shape.fill_mode == "constant" else None

    on_gpu = device_id is not None
    kinds = PIXEL_KIND_CODES

    def to_images_device(node):
        # Per-sample numbers come in on the CPU; positional and arithmetic inputs must be on
        # the device of the images they meet (argument inputs stay on the CPU).
        return node.gpu() if on_gpu else node

    # DALI's conditionals (per-sample `if`) only where there is a pixel stage, so every other
    # pipeline stays the graph it always was.
    @pipeline_def(
        batch_size=batch_size,
        num_threads=threads,
        device_id=device_id,
        exec_dynamic=True,
        prefetch_queue_depth=prefetch_depth,
        enable_conditionals=shape.pixel_steps > 0,
    )
    def augment_pipeline():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8)
        window_anchor = fn.external_source(name="window_anchor", dtype=types.INT32)
        window_shape = fn.external_source(name="window_shape", dtype=types.INT32)
        warp = fn.external_source(name="warp", dtype=types.FLOAT)
        output_size = fn.external_source(name="output_size", dtype=types.FLOAT)
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
            size=output_size,
            fill_value=fill_value,
            interp_type=interpolation,
            inverse_map=True,
        )
        if shape.has_color:
            color = fn.external_source(name="color", dtype=types.FLOAT)
            images = fn.coord_transform(images, MT=color, dtype=types.UINT8)
        for index in range(shape.pixel_steps):
            # One place of the pixel stage: each sample takes the branch of its step's kind
            # (identity: none). Inputs come from outside the branches (DALI splits them).
            kind = fn.external_source(name=f"pixel_kind_{index}", dtype=types.INT32)
            mask = to_images_device(
                fn.external_source(name=f"pixel_mask_{index}", dtype=types.UINT8)
            )
            threshold = to_images_device(
                fn.external_source(name=f"pixel_threshold_{index}", dtype=types.INT16)
            )
            kernel = to_images_device(
                fn.external_source(name=f"pixel_kernel_{index}", dtype=types.FLOAT)
            )
            sigma = fn.external_source(name=f"pixel_sigma_{index}", dtype=types.FLOAT)
            window = fn.external_source(name=f"pixel_window_{index}", dtype=types.INT32)
            if kind == kinds["posterize"]:
                images = images & mask
            elif kind == kinds["solarize"]:
                values = fn.cast(images, dtype=types.INT16)
                inverted = fn.cast(values >= threshold, dtype=types.INT16)
                images = fn.cast(values + inverted * (255 - 2 * values), dtype=types.UINT8)
            elif kind == kinds["autocontrast"]:
                values = fn.cast(images, dtype=types.INT32)
                low = fn.cast(fn.reductions.min(images, axes=[0, 1]), dtype=types.INT32)
                high = fn.cast(fn.reductions.max(images, axes=[0, 1]), dtype=types.INT32)
                # Per channel: floor(255 (v - low) / (high - low)); a flat channel keeps its
                # values (low 0, 1 / 1).
                stretch = fn.cast(high > low, dtype=types.INT32)
                numerator = 1 + 254 * stretch
                denominator = (high - low) * stretch + (1 - stretch)
                stretched = ((values - low * stretch) * numerator) // denominator
                images = fn.cast(stretched, dtype=types.UINT8)
            elif kind == kinds["equalize"]:
                images = fn.equalize(images)
            elif kind == kinds["sharpness"]:
                images = fn.filter(images, kernel, border="reflect_101")
            elif kind == kinds["blur"]:
                images = fn.gaussian_blur(images, sigma=sigma, window_size=window)
        for index in range(shape.erase_ops):
            erase_anchor = fn.external_source(name=f"erase_anchor_{index}", dtype=types.FLOAT)
            erase_shape = fn.external_source(name=f"erase_shape_{index}", dtype=types.FLOAT)
            erase_fill = fn.external_source(name=f"erase_fill_{index}", dtype=types.FLOAT)
            images = fn.erase(
                images,
                anchor=erase_anchor,
                shape=erase_shape,
                axis_names="HW",
                fill_value=erase_fill,
            )
        return images

    pipe = augment_pipeline()
    pipe.build()
    return pipe


IDENTITY_COLOR = np.eye(3, 4, dtype=np.float32)
Feeds = dict[str, list[np.ndarray]]


def pipeline_feeds(
    shape: PipelineShape, plans: Sequence[SamplePlan], encoded: Sequence[bytes]
) -> Feeds:
    """Every input of a `shape` pipeline for one batch, by external_source name."""
    feeds: Feeds = {
        "encoded": [np.frombuffer(data, np.uint8) for data in encoded],
        "window_anchor": [np.array(plan.source_window[:2], np.int32) for plan in plans],
        "window_shape": [np.array(plan.source_window[2:], np.int32) for plan in plans],
        "warp": [dali_warp_matrix(plan) for plan in plans],
        "output_size": [np.array(plan.output_size, np.float32) for plan in plans],
    }
    if shape.has_color:
        feeds["color"] = [IDENTITY_COLOR if plan.color is None else plan.color for plan in plans]
    for index in range(shape.pixel_steps):
        feeds.update(pixel_feeds(index, [plan.pixel_steps[index] for plan in plans]))
    for index in range(shape.erase_ops):
        steps = [plan.erase_steps[index] for plan in plans]
        feeds[f"erase_anchor_{index}"] = [
            np.array([value for r in step.rectangles for value in r[:2]], np.float32)
            for step in steps
        ]
        feeds[f"erase_shape_{index}"] = [
            np.array([value for r in step.rectangles for value in r[2:]], np.float32)
            for step in steps
        ]
        feeds[f"erase_fill_{index}"] = [np.array([step.value], np.float32) for step in steps]
    return feeds


IDENTITY_KERNEL = sharpness_kernel(1.0)
# Neutral numbers for the inputs a step's kind does not read (its branch never sees them).
NEUTRAL_MASK = np.array(0xFF, np.uint8)
NEUTRAL_THRESHOLD = np.array(256, np.int16)
NEUTRAL_SIGMA = np.array(1.0, np.float32)
NEUTRAL_WINDOW = np.array(3, np.int32)


def pixel_feeds(index: int, steps: Sequence[PixelStep]) -> Feeds:
    """The inputs of pixel-stage place `index` for one step per sample: its kind's code and
    each kind's numbers (posterize's bit mask, solarize's threshold, sharpness's 3x3 weights,
    blur's sigma and window), neutral where the step is of another kind."""
    kinds, masks, thresholds, kernels, sigmas, windows = [], [], [], [], [], []
    for step in steps:
        kinds.append(np.array(PIXEL_KIND_CODES[step.kind], np.int32))
        mask, threshold, kernel = NEUTRAL_MASK, NEUTRAL_THRESHOLD, IDENTITY_KERNEL
        sigma, window = NEUTRAL_SIGMA, NEUTRAL_WINDOW
        if step.kind == "posterize":
            mask = np.array((0xFF << (8 - int(step.amount))) & 0xFF, np.uint8)
        elif step.kind == "solarize":
            threshold = np.array(int(step.amount), np.int16)
        elif step.kind == "sharpness":
            kernel = sharpness_kernel(step.amount)
        elif step.kind == "blur":
            sigma = np.array(step.amount, np.float32)
            window = np.array(2 * blur_radius(step.amount) + 1, np.int32)
        masks.append(mask)
        thresholds.append(threshold)
        kernels.append(kernel)
        sigmas.append(sigma)
        windows.append(window)
    return {
        f"pixel_kind_{index}": kinds,
        f"pixel_mask_{index}": masks,
        f"pixel_threshold_{index}": thresholds,
        f"pixel_kernel_{index}": kernels,
        f"pixel_sigma_{index}": sigmas,
        f"pixel_window_{index}": windows,
    }


# --- known-good pictures every pipeline must reproduce --------------------------------------

KNOWN_GOOD_SIDE = 16
# Gray levels a JPEG decoder may differ from the pictures' pixels (quality 100, 4:4:4: within
# one level for libjpeg-turbo; decoders round differently).
KNOWN_GOOD_JPEG_TOLERANCE = 6


@dataclass(frozen=True)
class KnownGood:
    """A PNG and a JPEG of one picture ([16, 16, 3] uint8 RGB, a gradient), and how far each
    decoded copy may be from it (PNG: exact)."""

    encoded: tuple[bytes, ...]
    pixels: np.ndarray
    tolerances: tuple[int, ...]


@functools.lru_cache(maxsize=1)
def known_good() -> KnownGood:
    import cv2

    y, x = np.mgrid[0:KNOWN_GOOD_SIDE, 0:KNOWN_GOOD_SIDE]
    pixels = np.stack([16 + 12 * x, 16 + 12 * y, 220 - 6 * (x + y)], axis=-1).astype(np.uint8)
    bgr = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    jpeg_options = [
        cv2.IMWRITE_JPEG_QUALITY,
        100,
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
    ]
    encoded = []
    for extension, options in ((".png", []), (".jpg", jpeg_options)):
        ok, buffer = cv2.imencode(extension, bgr, options)
        if not ok:
            raise RuntimeError(f"could not encode the known-good {extension}")
        encoded.append(buffer.tobytes())
    return KnownGood(tuple(encoded), pixels, (0, KNOWN_GOOD_JPEG_TOLERANCE))


def known_good_plan(shape: PipelineShape) -> SamplePlan:
    """A plan of `shape` that copies a known-good picture unchanged (identity warp and colour,
    identity pixel steps, empty erasing)."""
    side = KNOWN_GOOD_SIDE
    return SamplePlan(
        sample_id=0,
        source_size=(side, side),
        output_size=(side, side),
        warp=np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
        source_window=(0, 0, side, side),
        color=None,
        erase_steps=tuple(EraseStep(0, ()) for _ in range(shape.erase_ops)),
        interpolation=shape.interpolation,
        fill_mode=shape.fill_mode,
        fill_value=shape.fill_value,
        pixel_steps=(IDENTITY_STEP,) * shape.pixel_steps,
    )


def known_good_feeds(shape: PipelineShape) -> Feeds:
    pictures = known_good()
    return pipeline_feeds(shape, [known_good_plan(shape)] * len(pictures.encoded), pictures.encoded)


def check_known_good(out: np.ndarray, shape: PipelineShape) -> None:
    """BackendError unless `out` ([2, 16, 16, 3]) holds the known-good pictures, each within its
    tolerance."""
    pictures = known_good()
    for image, encoded, tolerance in zip(out, pictures.encoded, pictures.tolerances):
        off = int(np.abs(image.astype(np.int16) - pictures.pixels).max())
        if off > tolerance:
            kind = "PNG" if encoded.startswith(b"\x89PNG") else "JPEG"
            raise BackendError(
                KNOWN_GOOD_FAILED,
                f"a {shape} pipeline made a known-good {kind} {off} gray levels off",
            )


def known_good_out() -> np.ndarray:
    pictures = known_good()
    return np.empty((len(pictures.encoded), *pictures.pixels.shape), np.uint8)


# --- where a run's images go ---------------------------------------------------------------


class HostRows:
    """Rows of a [N, H, W, 3] uint8 host array (a ring slot): DALI's output is copied there once."""

    # Whether a GPU output may be copied straight into host memory (DALI's copy_to_external with
    # a host pointer, resolved by unified addressing); turned off for good if it ever fails.
    direct_from_device = True

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def row(self, index: int) -> HostRows:
        return HostRows(self.array[index : index + 1])

    def write(self, images) -> None:
        check_output(images, self.array.shape)
        if hasattr(images, "as_cpu"):  # a TensorListGPU
            if self.array.flags.c_contiguous and HostRows.direct_from_device:
                try:
                    # Device to host, straight into the slot (no staging copy in DALI's memory).
                    images.copy_to_external(ctypes.c_void_p(self.array.ctypes.data))
                    return
                except Exception as error:
                    HostRows.direct_from_device = False
                    log.warning(
                        "DALI cannot copy GPU outputs into host memory directly (%s); staging them",
                        first_line(error),
                    )
            images = images.as_cpu()
        if images.is_dense_tensor():
            np.copyto(self.array, np.asarray(images.as_tensor()))
        else:
            for index in range(len(images)):
                np.copyto(self.array[index], np.asarray(images[index]))


class DeviceRows:
    """Rows of [N, H, W, 3] uint8 at a CUDA device pointer (e.g. a CUDA IPC slot)."""

    def __init__(self, pointer: int, shape: tuple[int, int, int, int]) -> None:
        self.pointer = pointer
        self.shape = shape
        self.array = None

    def row(self, index: int) -> DeviceRows:
        row_bytes = int(np.prod(self.shape[1:]))
        return DeviceRows(self.pointer + index * row_bytes, (1, *self.shape[1:]))

    def write(self, images) -> None:
        check_output(images, self.shape)
        if not hasattr(images, "as_cpu"):
            raise ValueError("device rows need a GPU pipeline (device_id set)")
        images.copy_to_external(ctypes.c_void_p(self.pointer))


Rows = HostRows | DeviceRows


def check_output(images, expected: tuple[int, ...]) -> None:
    shapes = {tuple(shape) for shape in images.shape()}
    if len(images) != expected[0] or shapes != {tuple(expected[1:])}:
        raise RuntimeError(
            f"DALI returned {len(images)} images of {sorted(shapes)}, expected {expected}"
        )


# --- deciding which pipeline runs a batch (a plain object: no threads) ---------------------


@dataclass
class PoolEntry:
    """What the pool knows of one cached pipeline."""

    entry_id: int
    shape: PipelineShape
    load: int = 0  # batches handed to it and not finished
    last_used: float = 0.0
    device_bytes: int | None = None  # device memory its build took, where measured


@dataclass(frozen=True)
class Use:
    entry_id: int


@dataclass(frozen=True)
class Build:
    evict: tuple[int, ...]  # idle entries to drop first, to stay within max_pipelines


@dataclass(frozen=True)
class Wait:
    pass


Decision = Use | Build | Wait


@dataclass(frozen=True)
class PipelinePool:
    """Which pipeline takes a batch, when to build one and which to evict.

    A batch goes to the busiest pipeline of its shape that still has room (`prefetch_depth`
    batches), so one pipeline's own prefetching fills before another is built; then, up to
    `per_shape` pipelines of a shape, a new one; then to the least busy of its shape (it
    queues there). A build needs room within `max_pipelines`: idle pipelines are evicted, least
    recently used first; when none is idle it waits. `max_device_bytes` evicts idle pipelines
    (least recently used first) while the measured total is over it."""

    prefetch_depth: int = DEFAULT_PREFETCH_DEPTH
    per_shape: int = DEFAULT_PIPELINES_PER_SHAPE
    max_pipelines: int = DEFAULT_MAX_PIPELINES
    max_device_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("prefetch_depth", "per_shape", "max_pipelines"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)} is below 1")
        if self.per_shape > self.max_pipelines:
            raise ValueError(
                f"per_shape: {self.per_shape} is over max_pipelines {self.max_pipelines}"
            )

    def choose(self, entries: Sequence[PoolEntry], shape: PipelineShape) -> Decision:
        mine = [entry for entry in entries if entry.shape == shape]
        with_room = [entry for entry in mine if entry.load < self.prefetch_depth]
        if with_room:
            return Use(max(with_room, key=lambda entry: (entry.load, -entry.entry_id)).entry_id)
        if len(mine) < self.per_shape:
            spare = self.max_pipelines - len(entries)
            if spare > 0:
                return Build(())
            idle = sorted(
                (entry for entry in entries if entry.load == 0), key=lambda entry: entry.last_used
            )
            if len(idle) >= -spare + 1:
                return Build(tuple(entry.entry_id for entry in idle[: -spare + 1]))
        if mine:
            return Use(min(mine, key=lambda entry: (entry.load, entry.entry_id)).entry_id)
        return Wait()

    def over_budget(self, entries: Sequence[PoolEntry], keep: int) -> tuple[int, ...]:
        """Idle entries (never `keep`) to evict, least recently used first, until the measured
        device memory is within `max_device_bytes`."""
        if self.max_device_bytes is None:
            return ()
        total = sum(entry.device_bytes or 0 for entry in entries)
        evict = []
        for entry in sorted(entries, key=lambda entry: entry.last_used):
            if total <= self.max_device_bytes:
                break
            if entry.load == 0 and entry.entry_id != keep and entry.device_bytes:
                evict.append(entry.entry_id)
                total -= entry.device_bytes
        return tuple(evict)


@dataclass
class CacheCounts:
    """What the pipeline cache counted since the backend was made."""

    builds: int = 0
    build_failures: int = 0
    evictions: int = 0
    hits: int = 0  # batches that found a built pipeline of their shape
    misses: int = 0  # batches that had to build one
    batches: int = 0  # batches run (whole, or one sample of an isolated batch)
    peak_concurrent_batches: int = 0  # most batches in DALI at once
    busy_seconds: float = 0.0  # time with at least one batch in DALI (over wall time: its use)
    backend_failures: int = 0  # BackendErrors raised


@dataclass
class PipelineCacheStats(CacheCounts):
    """The pipeline cache now (for a metrics endpoint): its counts, and what it holds (a copy:
    nothing changes it after `cache_stats` returns)."""

    pipelines: int = 0  # cached now
    busy: int = 0  # of those, with batches in flight
    max_pipelines: int = 0
    device_bytes: int | None = None  # device memory the cached pipelines took when built (GPU only)
    max_device_bytes: int | None = None


# --- one pipeline and its thread ------------------------------------------------------------


class Displaced(Exception):
    """The pipeline broke on another batch before this one ran: run it elsewhere."""


class Job:
    """One batch for a pipeline thread: its feeds and where its images go."""

    def __init__(self, feeds: Feeds, rows: Rows) -> None:
        self.feeds = feeds
        self.rows = rows
        self.error: BaseException | None = None
        self._done = threading.Event()

    def finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self._done.set()

    def result(self) -> None:
        self._done.wait()
        if self.error is not None:
            raise self.error


class PipelineRunner:
    """A DALI pipeline of one shape and the thread that alone calls it.

    The thread builds the pipeline, proves it on the known-good pictures (which also fills
    DALI's first prefetch, see `_prove`), then runs jobs in order: it feeds and schedules up to
    `prefetch_depth` of them before it waits for the oldest one's output. After an error DALI
    calls the pipeline invalid: the failing job gets the error, the others `Displaced`, and the
    thread ends (`on_broken`)."""

    def __init__(
        self,
        entry: PoolEntry,
        build: Callable[[], object],
        prefetch_depth: int,
        measure: Callable[[], int | None],
        on_broken: Callable[[PipelineRunner], None],
    ) -> None:
        self.entry = entry
        self.usable = True  # cleared (under the backend's condition) once broken or evicted
        self._build = build
        self._depth = prefetch_depth
        self._measure = measure
        self._on_broken = on_broken
        self._condition = threading.Condition()
        self._queue: deque[Job] = deque()
        self._closing = False
        self._broken = False
        self._ready = threading.Event()
        self.build_error: BackendError | None = None
        self._thread = threading.Thread(
            target=self._drive, name=f"augserve-dali-{entry.entry_id}", daemon=True
        )
        self._thread.start()

    def wait_ready(self) -> None:
        """Return once built and proven; BackendError when the build failed."""
        self._ready.wait()
        if self.build_error is not None:
            raise self.build_error

    def run(self, job: Job) -> None:
        """Run `job` and wait for it: DALI's error, or Displaced."""
        with self._condition:
            if self._broken or self._closing:
                raise Displaced()
            self._queue.append(job)
            self._condition.notify_all()
        job.result()

    def close(self) -> None:
        """End the thread once the jobs it has are done."""
        with self._condition:
            self._closing = True
            self._condition.notify_all()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _drive(self) -> None:
        try:
            free_before = self._measure()
            pipe = self._build()
            self._prove(pipe)
            free_after = self._measure()
            if free_before is not None and free_after is not None:
                self.entry.device_bytes = max(0, free_before - free_after)
        except BaseException as error:
            cause = backend_cause(error) or PIPELINE_BUILD
            detail = error.detail if isinstance(error, BackendError) else first_line(error)
            self.build_error = BackendError(
                cause, f"{detail} (building the {self.entry.shape} pipeline)"
            )
            self._broken = True
            self._ready.set()
            self._end(self.build_error)
            return
        self._ready.set()
        fed: deque[Job] = deque()
        while True:
            with self._condition:
                while not self._queue and not fed and not self._closing:
                    self._condition.wait()
                if not self._queue and not fed:
                    break
                feeding = []
                while self._queue and len(fed) + len(feeding) < self._depth:
                    feeding.append(self._queue.popleft())
            current: Job | None = None
            try:
                while feeding:
                    current = feeding.pop(0)
                    for name, values in current.feeds.items():
                        pipe.feed_input(name, values)
                    pipe.schedule_run()
                    fed.append(current)
                    current = None
                current = fed.popleft()
                (images,) = pipe.outputs()
                current.rows.write(images)
                current.finish()
            except BaseException as error:
                if current is not None:
                    current.finish(error)
                for job in [*fed, *feeding]:
                    job.finish(Displaced())
                self._end(error)
                return

    def _end(self, error: BaseException) -> None:
        """After an error: displace queued jobs and tell the backend (the pipeline goes with
        the thread)."""
        with self._condition:
            self._broken = True
            queued, self._queue = list(self._queue), deque()
        for job in queued:
            job.finish(self.build_error or Displaced())
        self._on_broken(self)

    def _prove(self, pipe) -> None:
        """Run the known-good pictures `prefetch_depth` times and check every output; a
        BackendError (KNOWN_GOOD_FAILED, or the backend's own cause) if they fail.

        DALI's first `schedule_run` on a pipelined executor runs `prefetch_queue_depth`
        iterations, so it needs that many batches fed; doing it here lets every later
        `schedule_run` run exactly the batch just fed."""
        feeds = known_good_feeds(self.entry.shape)
        out = known_good_out()
        try:
            for _ in range(self._depth):
                for name, values in feeds.items():
                    pipe.feed_input(name, values)
            pipe.schedule_run()
            for _ in range(self._depth):
                (images,) = pipe.outputs()
                HostRows(out).write(images)
                check_known_good(out, self.entry.shape)
        except BackendError:
            raise
        except Exception as error:
            raise BackendError(
                backend_cause(error) or KNOWN_GOOD_FAILED, first_line(error)
            ) from error


# --- the backend ---------------------------------------------------------------------------


class DaliBackend:
    """Plans executed by cached DALI pipelines, one or more per `PipelineShape`.

    `device_id=None` runs everything on the CPU; an integer decodes with `mixed` and warps on
    that GPU. `threads` is each pipeline's CPU thread count. The cache holds at most
    `max_pipelines` pipelines (and `max_device_bytes` of measured device memory, GPU only);
    `cache_stats()` counts builds, hits and evictions. `health` records backend failures.
    `read_ahead_batches` and `concurrent_batches` tell the server's producers and scheduler how
    many batches to keep coming: `DaliBackend(prefetch_depth=1, pipelines_per_shape=1,
    read_ahead_batches=0, concurrent_batches=1)` runs one batch at a time, as it once did.
    """

    def __init__(
        self,
        device_id: int | None = None,
        threads: int = 2,
        max_batch_size: int = 256,
        *,
        prefetch_depth: int = DEFAULT_PREFETCH_DEPTH,
        pipelines_per_shape: int = DEFAULT_PIPELINES_PER_SHAPE,
        max_pipelines: int = DEFAULT_MAX_PIPELINES,
        max_device_bytes: int | None = None,
        read_ahead_batches: int = DEFAULT_READ_AHEAD_BATCHES,
        concurrent_batches: int | None = None,
    ) -> None:
        self.device_id = device_id
        self.threads = threads
        self.max_batch_size = max_batch_size
        self.name = "dali-cpu" if device_id is None else "dali-gpu"
        self.pool = PipelinePool(
            prefetch_depth, pipelines_per_shape, max_pipelines, max_device_bytes
        )
        # How far each producer reads ahead, and how many batches the server runs at once
        # (default: every cached pipeline's prefetch, filled).
        self.read_ahead_batches = read_ahead_batches
        self.concurrent_batches = concurrent_batches or prefetch_depth * max_pipelines
        self.health = BackendHealth()
        self._condition = threading.Condition()
        self._runners: dict[int, PipelineRunner] = {}
        self._next_id = 0
        self._counts = CacheCounts()
        self._running = 0  # batches in DALI now
        self._busy_since = 0.0  # when _running last rose from 0
        self._build_lock = (
            threading.Lock()
        )  # one build at a time: device memory is measured per build
        self._closed = False

    # --- the cache ---

    def cache_stats(self) -> PipelineCacheStats:
        with self._condition:
            entries = [runner.entry for runner in self._runners.values()]
            measured = [entry.device_bytes for entry in entries if entry.device_bytes is not None]
            counts = asdict(self._counts)
            if self._running:
                counts["busy_seconds"] += time.monotonic() - self._busy_since
            return PipelineCacheStats(
                **counts,
                pipelines=len(entries),
                busy=sum(1 for entry in entries if entry.load > 0),
                max_pipelines=self.pool.max_pipelines,
                device_bytes=sum(measured) if measured else None,
                max_device_bytes=self.pool.max_device_bytes,
            )

    def _acquire(self, shape: PipelineShape) -> PipelineRunner:
        """A proven pipeline for `shape` with this batch counted on it (release it after)."""
        with self._condition:
            while True:
                if self._closed:
                    raise BackendError(PIPELINE_BUILD, "the backend is closed")
                entries = [runner.entry for runner in self._runners.values()]
                decision = self.pool.choose(entries, shape)
                if isinstance(decision, Use):
                    runner = self._runners[decision.entry_id]
                    self._counts.hits += 1
                    break
                if isinstance(decision, Build):
                    for entry_id in decision.evict:
                        self._evict(entry_id, "the cache is full")
                    runner = self._start_runner(shape)
                    self._counts.misses += 1
                    break
                self._condition.wait()
            runner.entry.load += 1
            runner.entry.last_used = time.monotonic()
        try:
            runner.wait_ready()
        except BackendError:
            self._release(runner)
            raise
        return runner

    def _start_runner(self, shape: PipelineShape) -> PipelineRunner:
        """A new runner for `shape` in the cache (condition held); it builds on its thread."""
        entry = PoolEntry(self._next_id, shape, last_used=time.monotonic())
        self._next_id += 1
        self._counts.builds += 1
        runner = PipelineRunner(
            entry,
            lambda: self._build(shape),
            self.pool.prefetch_depth,
            self._free_device_bytes,
            self._broken,
        )
        self._runners[entry.entry_id] = runner
        return runner

    def _build(self, shape: PipelineShape):
        with self._build_lock:
            return build_pipeline(
                shape, self.max_batch_size, self.threads, self.device_id, self.pool.prefetch_depth
            )

    def _release(self, runner: PipelineRunner) -> None:
        with self._condition:
            runner.entry.load -= 1
            runner.entry.last_used = time.monotonic()
            if runner.usable and runner.entry.device_bytes:
                entries = [other.entry for other in self._runners.values()]
                for entry_id in self.pool.over_budget(entries, keep=runner.entry.entry_id):
                    self._evict(entry_id, "over the device memory budget")
            self._condition.notify_all()

    def _broken(self, runner: PipelineRunner) -> None:
        """A runner's thread ended on an error: out of the cache (a new one builds on demand)."""
        with self._condition:
            if runner.build_error is not None:
                self._counts.build_failures += 1
            if self._runners.get(runner.entry.entry_id) is runner:
                del self._runners[runner.entry.entry_id]
            runner.usable = False
            self._condition.notify_all()

    def _evict(self, entry_id: int, reason: str) -> None:
        """Drop an idle pipeline (condition held)."""
        runner = self._runners.pop(entry_id)
        runner.usable = False
        runner.close()
        self._counts.evictions += 1
        idle = time.monotonic() - runner.entry.last_used
        log.info(
            "DALI pipeline cache: evicted the %s pipeline (idle %.1f s) because %s; %d of %d cached",
            runner.entry.shape,
            idle,
            reason,
            len(self._runners),
            self.pool.max_pipelines,
        )

    def _evict_idle(self, reason: str) -> None:
        with self._condition:
            for entry_id in [
                entry_id for entry_id, runner in self._runners.items() if runner.entry.load == 0
            ]:
                self._evict(entry_id, reason)
        if self.device_id is not None:
            try:
                from nvidia.dali.backend import ReleaseUnusedMemory

                ReleaseUnusedMemory()
            except Exception as error:  # memory stays in DALI's pool; the retry may still fit
                log.info("DALI could not release unused memory: %s", error)

    def _free_device_bytes(self) -> int | None:
        return None if self.device_id is None else device_free_bytes(self.device_id)

    # --- running ---

    def _run(self, shape: PipelineShape, feeds: Feeds, rows: Rows) -> None:
        """Run one batch on a pipeline of `shape`: DALI's error for it, or BackendError."""
        for _ in range(DISPLACED_RETRIES):
            runner = self._acquire(shape)
            with self._condition:
                if self._running == 0:
                    self._busy_since = time.monotonic()
                self._running += 1
                self._counts.batches += 1
                self._counts.peak_concurrent_batches = max(
                    self._counts.peak_concurrent_batches, self._running
                )
            try:
                runner.run(Job(feeds, rows))
                return
            except Displaced:
                continue
            finally:
                with self._condition:
                    self._running -= 1
                    if self._running == 0:
                        self._counts.busy_seconds += time.monotonic() - self._busy_since
                self._release(runner)
        raise BackendError(
            CUDA_ERROR,
            f"pipelines for {shape} broke {DISPLACED_RETRIES} times in a row under other batches",
        )

    def augment(
        self, encoded: Sequence[bytes], plans: Sequence[SamplePlan], out: np.ndarray | None = None
    ) -> AugmentResult:
        images = output_array(plans, out)
        result = self._augment(encoded, plans, HostRows(images))
        return AugmentResult(images[: len(result.kept)], result.kept, result.failures)

    def augment_to_device(
        self, encoded: Sequence[bytes], plans: Sequence[SamplePlan], pointer: int
    ) -> AugmentResult:
        """As `augment`, the images written at a CUDA device pointer of this backend's GPU
        ([N, H, W, 3] uint8, kept rows first); `images` of the result is None."""
        if self.device_id is None:
            raise ValueError("augment_to_device needs a GPU backend (device_id set)")
        height, width = output_size_of(plans)
        return self._augment(encoded, plans, DeviceRows(pointer, (len(plans), height, width, 3)))

    def self_test(self) -> None:
        """Run the known-good picture through a pipeline of the most common shape (built and
        proven first); BackendError if it fails."""
        try:
            self._check_known_good(PipelineShape("linear", "constant", 0, True, 0))
        except BackendError as error:
            self._failed(error)

    def _check_known_good(self, shape: PipelineShape) -> None:
        out = known_good_out()
        error = self._attempt(shape, known_good_feeds(shape), HostRows(out))
        if error is not None:
            raise BackendError(KNOWN_GOOD_FAILED, first_line(error)) from error
        check_known_good(out, shape)

    def _augment(
        self, encoded: Sequence[bytes], plans: Sequence[SamplePlan], rows: Rows
    ) -> AugmentResult:
        if len(plans) > self.max_batch_size:
            raise ValueError(
                f"batch of {len(plans)} is over this backend's maximum {self.max_batch_size}"
            )
        shape = PipelineShape.of_batch(plans)
        try:
            result = self._run_batch(shape, encoded, plans, rows)
        except BackendError as error:
            self._failed(error)
        self.health.recovered()
        return result

    def _attempt(self, shape: PipelineShape, feeds: Feeds, rows: Rows) -> Exception | None:
        """Run one batch: None when it ran; DALI's error when the batch's data failed; a
        BackendError when the backend did (by DALI's words, or before the batch ran)."""
        try:
            self._run(shape, feeds, rows)
        except BackendError:
            raise
        except Exception as error:
            cause = backend_cause(error)
            if cause is not None:
                raise BackendError(cause, first_line(error)) from error
            return error
        return None

    def _run_batch(
        self,
        shape: PipelineShape,
        encoded: Sequence[bytes],
        plans: Sequence[SamplePlan],
        rows: Rows,
    ) -> AugmentResult:
        feeds = pipeline_feeds(shape, plans, encoded)
        try:
            error = self._attempt(shape, feeds, rows)
        except BackendError as failure:
            if failure.cause not in (OUT_OF_MEMORY, CUDA_ERROR):
                raise
            # Memory may come back: idle pipelines hold some, and a transient CUDA error may pass.
            log.warning(
                "DALI batch failed (%s); dropping idle pipelines and retrying once", failure
            )
            self._evict_idle(f"DALI reported {failure.cause}")
            error = self._attempt(shape, feeds, rows)
        if error is None:
            return AugmentResult(rows.array, list(range(len(plans))))
        return self._isolate(shape, encoded, plans, rows, error)

    def _isolate(
        self,
        shape: PipelineShape,
        encoded: Sequence[bytes],
        plans: Sequence[SamplePlan],
        rows: Rows,
        error: Exception,
    ) -> AugmentResult:
        """After a batch failed on its data: each sample alone, the ones that run written to the
        first rows, the others' reasons kept."""
        log.info("DALI batch failed (%s); retrying sample by sample", first_line(error))
        kept: list[int] = []
        failures: dict[int, str] = {}
        for index in range(len(plans)):
            alone = pipeline_feeds(shape, plans[index : index + 1], encoded[index : index + 1])
            failed = self._attempt(shape, alone, rows.row(len(kept)))
            if failed is None:
                kept.append(index)
            else:
                failures[index] = decode_reason(failed)
        if not kept:
            # Every sample failed: the pipeline must still reproduce the known-good pictures, or
            # the backend, not the images, is at fault.
            self._check_known_good(shape)
        images = None if rows.array is None else rows.array[: len(kept)]
        return AugmentResult(images, kept, failures)

    def _failed(self, error: BackendError) -> NoReturn:
        with self._condition:
            self._counts.backend_failures += 1
        log.error("DALI backend failure: %s", error)
        self.health.failed(error)
        raise error

    def close(self) -> None:
        with self._condition:
            self._closed = True
            runners = list(self._runners.values())
            self._runners.clear()
            for runner in runners:
                runner.usable = False
                runner.close()
            self._condition.notify_all()
        for runner in runners:
            runner.join(timeout=30)


def device_free_bytes(device_id: int) -> int | None:
    """Free memory of CUDA device `device_id` in bytes (the driver's cuMemGetInfo, in the
    device's primary context), or None where it cannot be read."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    device = ctypes.c_int()
    context = ctypes.c_void_p()
    if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(device), device_id):
        return None
    if cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), device):
        return None
    try:
        if cuda.cuCtxPushCurrent_v2(context):
            return None
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        status = cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total))
        cuda.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
        return None if status else int(free.value)
    finally:
        cuda.cuDevicePrimaryCtxRelease_v2(device)
