"""What identifies a stream, and the resume tokens that point into one."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from augserve.core.errors import SpecError
from augserve.core.plan import MAX_EPOCH, MAX_SAMPLE_ID

TOKEN_VERSION = 1


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
    shared_memory: bool

    @property
    def token_hash(self) -> str:
        """Identity for resume tokens: everything but the memory kind (transport may change)."""
        parts = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "shared_memory"}
        return stream_hash(parts)


@dataclass(frozen=True)
class ResumeToken:
    """Where a stream continues: the next sample (`position` in `epoch`'s shard order) of the
    stream whose parameters hash to `stream_hash`."""

    stream_hash: str
    epoch: int
    position: int

    def encode(self) -> bytes:
        text = json.dumps({"v": TOKEN_VERSION, "stream": self.stream_hash, "epoch": self.epoch, "position": self.position})
        return base64.urlsafe_b64encode(text.encode())

    @classmethod
    def decode(cls, data: bytes, field: str = "open.resume_token") -> ResumeToken:
        try:
            fields = json.loads(base64.urlsafe_b64decode(data))
            if fields["v"] != TOKEN_VERSION:
                raise ValueError("version")
            token = cls(str(fields["stream"]), int(fields["epoch"]), int(fields["position"]))
        except Exception:
            raise SpecError(field, "not a resume token issued by an augserve server") from None
        if not 0 <= token.epoch <= MAX_EPOCH or not 0 <= token.position <= MAX_SAMPLE_ID:
            raise SpecError(field, "not a resume token issued by an augserve server")
        return token
