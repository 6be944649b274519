"""Choosing a backend: `auto | dali | dali-cpu | opencv`, made explicit and logged."""

from __future__ import annotations

import logging

from augserve.backends.base import Backend
from augserve.backends.dali import DaliBackend, dali_available, gpu_count, import_dali
from augserve.backends.opencv import OpenCVBackend
from augserve.core.errors import BackendError

log = logging.getLogger(__name__)

BACKEND_CHOICES = ("auto", "dali", "dali-cpu", "opencv")


def create_backend(choice: str = "auto", threads: int | None = None, device_id: int = 0) -> Backend:
    """Create the backend named by `choice`.

    auto: DALI on GPU `device_id` when DALI imports, a GPU is visible and a DALI pipeline
    builds and reproduces a known-good picture there; else OpenCV, with the reason logged.
    dali: DALI on the GPU; dali-cpu: DALI with `device_id=None` (both a BackendError where
    DALI or the GPU is missing). opencv: the OpenCV backend. `threads` defaults to every core
    (OpenCV) or 2 per pipeline (DALI).
    """
    if choice not in BACKEND_CHOICES:
        raise ValueError(f"backend: expected one of {list(BACKEND_CHOICES)}, got {choice!r}")
    if choice == "auto":
        backend = _auto(threads, device_id)
    elif choice == "opencv":
        backend = OpenCVBackend(threads)
    else:
        import_dali()  # a BackendError naming the import error
        if choice == "dali" and gpu_count() == 0:
            raise BackendError(
                "no GPU",
                "backend 'dali' needs a GPU that DALI can see; use 'dali-cpu' or 'opencv' here",
            )
        backend = DaliBackend(None if choice == "dali-cpu" else device_id, threads or 2)
    log.info("backend: %s with %s threads", backend.name, threads or "default")
    return backend


def _auto(threads: int | None, device_id: int) -> Backend:
    if not dali_available():
        return _fall_back(threads, "DALI is not installed", logging.INFO)
    gpus = gpu_count()
    if gpus == 0:
        return _fall_back(threads, "no GPU is visible", logging.INFO)
    backend = DaliBackend(device_id, threads or 2)
    try:
        backend.self_test()
    except BackendError as error:
        backend.close()
        return _fall_back(threads, f"DALI failed on GPU {device_id}: {error}", logging.WARNING)
    log.info(
        "backend auto: chose dali (DALI imports, %d GPU(s) are visible, a pipeline runs on GPU %d)",
        gpus,
        device_id,
    )
    return backend


def _fall_back(threads: int | None, reason: str, level: int) -> Backend:
    log.log(level, "backend auto: chose opencv (%s)", reason)
    return OpenCVBackend(threads)
