"""Which GPU a trainer wants its batches on, as CUDA IPC names it (its UUID)."""

from __future__ import annotations

import sys
from typing import Any

from augserve.transport.cuda_ipc import CudaDriver, cuda_ipc_unavailable


def cuda_ordinal(device: Any) -> int | None:
    """The CUDA ordinal `device` names (1, "cuda:1", torch.device("cuda", 1); "cuda": torch's
    current device), None for any other device ("cpu", None)."""
    if device is None or isinstance(device, bool):
        return None
    if isinstance(device, int):
        return device
    text = str(device)
    if text == "cuda":
        torch = sys.modules.get("torch")  # torch's current device where torch is in use
        return int(torch.cuda.current_device()) if torch is not None and torch.cuda.is_available() else 0
    if text.startswith("cuda:") and text[5:].isdigit():
        return int(text[5:])
    return None


def gpu_uuid(device: Any) -> tuple[bytes, str]:
    """(UUID of the GPU `device` names, "") or (b"", why there is none here)."""
    ordinal = cuda_ordinal(device)
    if ordinal is None:
        return b"", f"{device!r} is not a CUDA device (pass cuda_device=\"cuda:N\")"
    reason = cuda_ipc_unavailable(ordinal)
    if reason is not None:
        return b"", reason
    return CudaDriver.shared().device_uuid(ordinal), ""
