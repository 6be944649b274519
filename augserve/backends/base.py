"""The small interface every backend implements: execute plans on encoded images."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from augserve.core.errors import BackendError
from augserve.core.plan import SamplePlan


@dataclass
class AugmentResult:
    """Output of one `Backend.augment` call.

    `images` is [len(kept), H, W, 3] uint8 RGB; `kept[i]` is the input index of `images[i]`;
    `failures` maps the input index of every sample that could not be decoded to the reason.
    """

    images: np.ndarray
    kept: list[int]
    failures: dict[int, str] = field(default_factory=dict)


class Backend(Protocol):
    """Executes plans. Deterministic: the same bytes and plans give the same pixels.

    Every plan in one call has the same `output_size`. With `out` ([len(plans), H, W, 3] uint8)
    the images are written there and `AugmentResult.images` is `out[:len(kept)]`.
    """

    name: str

    def augment(
        self, encoded: Sequence[bytes], plans: Sequence[SamplePlan], out: np.ndarray | None = None
    ) -> AugmentResult: ...

    def close(self) -> None: ...


class SampleFailure(Exception):
    """One sample cannot be decoded or augmented; the message is the reason (as
    `AugmentResult.failures` reports it)."""


class DecodesApart(Protocol):
    """What a backend that decodes apart from augmenting (OpenCV) offers besides `augment`, so
    that one decode of an image serves several specs and later epochs:

    - `decode(data) -> [H, W, 3] uint8` RGB as stored (the EXIF orientation is the plan's);
      SampleFailure where `data` cannot be decoded;
    - `apply_decoded(image, plan, out)`: the plan's warp, colour, pixel steps and erasing from
      a decoded image into `out` ([H, W, 3] uint8), never writing to `image`; SampleFailure
      where the image does not fit the plan;
    - `run_each(count, work) -> {index: reason}`: `work(index)` for every index on the
      backend's threads, with the reason of each SampleFailure raised, by ascending index.

    `augment(encoded, plans, out)` equals decoding each image and applying its plan so."""

    def decode(self, data: bytes) -> np.ndarray: ...

    def apply_decoded(self, image: np.ndarray, plan: SamplePlan, out: np.ndarray) -> None: ...

    def run_each(self, count: int, work: Callable[[int], None]) -> dict[int, str]: ...


class DecodedSource(Protocol):
    """Runs a batch on a backend that decodes apart (`DecodesApart`), taking each image's decode
    from wherever the same bytes were decoded already (another stream's batch, a cache) or
    decoding it, and returns what `backend.augment(encoded, plans, out)` would. `turn()` is held
    while it runs the backend itself. Every image it uses is the decode of exactly those bytes,
    so the pixels never depend on where the decode came from."""

    def augment(
        self,
        backend: DecodesApart,
        encoded: Sequence[bytes],
        plans: Sequence[SamplePlan],
        out: np.ndarray | None,
        turn: Callable[[], AbstractContextManager[object]],
    ) -> AugmentResult: ...


def writes_to_device(backend: Backend, device: int) -> bool:
    """Whether `backend` writes batches into memory of GPU `device` itself (`augment_to_device`:
    DALI on that GPU), so that a CUDA IPC slot needs no copy from the host."""
    return callable(getattr(backend, "augment_to_device", None)) and getattr(backend, "device_id", None) == device


def decodes_apart(backend: Backend) -> bool:
    """Whether `backend` offers `DecodesApart`: OpenCV does; DALI decodes inside its pipeline."""
    return all(callable(getattr(backend, name, None)) for name in ("decode", "apply_decoded", "run_each"))


# Batches a backend without a `concurrent_batches` of its own may run at once: 2 keeps a thread
# pool busy while another producer is in Python.
DEFAULT_CONCURRENT_BATCHES = 2


# Batches a producer keeps in the works beyond the oldest one it has not published, for a
# backend without a `read_ahead_batches` of its own (OpenCV: its thread pool already overlaps
# two producers, scheduler concurrency 2).
DEFAULT_READ_AHEAD_BATCHES = 0


def concurrent_batches(backend: Backend) -> int:
    """How many batches the server lets run on `backend` at once (its scheduler's turns)."""
    return int(getattr(backend, "concurrent_batches", DEFAULT_CONCURRENT_BATCHES))


def read_ahead_batches(backend: Backend) -> int:
    """How many batches each producer reads and plans ahead for `backend`."""
    return int(getattr(backend, "read_ahead_batches", DEFAULT_READ_AHEAD_BATCHES))


HealthListener = Callable[["BackendError | None"], None]


class BackendHealth:
    """Whether a backend works, as its latest batches showed: `failure` is the BackendError of
    the latest failed batch, None once a batch succeeds again. Listeners hear every change
    (on the thread that ran the batch)."""

    def __init__(self) -> None:
        self.failure: BackendError | None = None
        self._listeners: list[HealthListener] = []
        self._lock = threading.Lock()

    def watch(self, listener: HealthListener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def failed(self, error: BackendError) -> None:
        self._change(error)

    def recovered(self) -> None:
        if self.failure is not None:
            self._change(None)

    def _change(self, failure: BackendError | None) -> None:
        with self._lock:
            changed = (failure is None) != (self.failure is None)
            self.failure = failure
            listeners = list(self._listeners) if changed else []
        for listener in listeners:
            listener(failure)


def backend_health(backend: Backend) -> BackendHealth:
    """The backend's health record; a backend that keeps none (OpenCV: it fails only on
    images) gets one that stays healthy."""
    health = getattr(backend, "health", None)
    return health if isinstance(health, BackendHealth) else BackendHealth()


def compact(images: np.ndarray, kept: list[int]) -> np.ndarray:
    """Move the kept rows (ascending indices) to the front in place; return that prefix."""
    for index, source in enumerate(kept):
        if index != source:
            images[index] = images[source]
    return images[: len(kept)]


def output_array(plans: Sequence[SamplePlan], out: np.ndarray | None) -> np.ndarray:
    """`out`, checked against the plans, or a new [N, H, W, 3] uint8 array."""
    out_h, out_w = output_size_of(plans)
    shape = (len(plans), out_h, out_w, 3)
    if out is None:
        return np.empty(shape, np.uint8)
    if out.shape != shape or out.dtype != np.uint8:
        raise ValueError(f"out has shape {out.shape} {out.dtype}, expected {shape} uint8")
    return out


def output_size_of(plans: Sequence[SamplePlan]) -> tuple[int, int]:
    """The shared output size of a batch; a ValueError when plans disagree."""
    sizes = {plan.output_size for plan in plans}
    if len(sizes) != 1:
        raise ValueError(
            f"samples of one batch have different output sizes {sorted(sizes)}; "
            "add a crop or resize to the spec"
        )
    return sizes.pop()
