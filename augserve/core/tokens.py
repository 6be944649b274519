"""Resume tokens: where a stream continues, as the server issues them to clients.

A token names the stream (a hash of everything that makes its batches) and the next sample
(`position` in `epoch`'s shard order). Servers issue and check them; a client may re-point a
token it holds at the start of another epoch of the same stream (the loader's `set_epoch`), the
one thing a client may do with one besides sending it back.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

from augserve.core.errors import SpecError
from augserve.core.plan import MAX_EPOCH, MAX_SAMPLE_ID

TOKEN_VERSION = 1


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
