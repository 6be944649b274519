"""Backends execute sample plans: OpenCV on the CPU, NVIDIA DALI on the GPU (or CPU)."""

from augserve.backends.base import AugmentResult, Backend
from augserve.backends.select import BACKEND_CHOICES, create_backend

__all__ = ["AugmentResult", "Backend", "BACKEND_CHOICES", "create_backend"]
