"""Choosing a backend: `auto | dali | opencv`, made explicit and logged."""

from __future__ import annotations

import logging

from augserve.backends.base import Backend
from augserve.backends.dali import DaliBackend, dali_available, gpu_count
from augserve.backends.opencv import OpenCVBackend

log = logging.getLogger(__name__)

BACKEND_CHOICES = ("auto", "dali", "dali-cpu", "opencv")


def create_backend(choice: str = "auto", threads: int | None = None, device_id: int = 0) -> Backend:
    """Create the backend named by `choice`.

    auto: DALI on GPU `device_id` when DALI imports and a GPU is visible, else OpenCV.
    dali: DALI on the GPU (an error without one). dali-cpu: DALI with `device_id=None`.
    opencv: the OpenCV backend. `threads` defaults to every core.
    """
    if choice not in BACKEND_CHOICES:
        raise ValueError(f"backend: expected one of {list(BACKEND_CHOICES)}, got {choice!r}")
    if choice == "auto":
        has_dali = dali_available()
        gpus = gpu_count() if has_dali else 0
        if has_dali and gpus > 0:
            choice = "dali"
            reason = f"DALI imports and {gpus} GPU(s) are visible"
        else:
            choice = "opencv"
            reason = "DALI is not installed" if not has_dali else "no GPU is visible"
        log.info("backend auto: chose %s (%s)", choice, reason)
    if choice == "opencv":
        backend: Backend = OpenCVBackend(threads)
    else:
        if not dali_available():
            raise RuntimeError("backend: DALI is not installed (pip install 'augserve[dali]')")
        if choice == "dali" and gpu_count() == 0:
            raise RuntimeError("backend: 'dali' needs a GPU; use 'dali-cpu' or 'opencv' here")
        backend = DaliBackend(None if choice == "dali-cpu" else device_id, threads or 2)
    log.info("backend: %s with %s threads", backend.name, threads or "default")
    return backend
