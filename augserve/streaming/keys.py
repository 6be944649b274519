"""What identifies a stream, and the resume tokens that point into one."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from augserve.core.targets import TargetRequest
from augserve.core.tokens import ResumeToken

__all__ = ["ResumeToken", "StreamKey", "stream_hash"]


def stream_hash(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class StreamKey:
    """What makes two sessions' batches identical (so they can share one producer)."""

    dataset: str
    fingerprint: str
    split: str
    spec_json: str
    seed: int
    batch_size: int
    shard_index: int
    shard_count: int
    drop_last: bool
    on_bad_image: str
    max_decoded_pixels: int
    shared_memory: bool  # the ring is a /dev/shm file clients map
    targets: TargetRequest = TargetRequest()
    cuda_ipc: bool = False  # the ring is device memory clients map by CUDA IPC handle

    @property
    def slotted(self) -> bool:
        """Clients read batches from the ring itself and release the slots (not in-band)."""
        return self.shared_memory or self.cuda_ipc

    @property
    def transport(self) -> str:
        return "cuda_ipc" if self.cuda_ipc else "shared_memory" if self.shared_memory else "inband"

    @property
    def order_key(self) -> tuple:
        """What makes two streams hold the same images at the same cursors, whatever their
        specs: they can share reading and decoding (a `DecodeGroup`). The seed counts only
        where it shuffles (validation is read in manifest order)."""
        return (
            self.dataset, self.fingerprint, self.split, self.seed if self.split != "validation" else None,
            self.batch_size, self.shard_index, self.shard_count, self.drop_last,
        )

    @property
    def token_hash(self) -> str:
        """Identity for resume tokens: everything but the transport (it may change)."""
        parts = {name: getattr(self, name) for name in self.__dataclass_fields__ if name not in ("shared_memory", "cuda_ipc", "targets")}
        if self.targets.any:  # absent otherwise, so that a plain stream's tokens stay as they were
            parts["targets"] = self.targets.key()
        return stream_hash(parts)
