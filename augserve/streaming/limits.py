"""The server's limits: each one exceeded is answered with a status that names it."""

from __future__ import annotations

from dataclasses import dataclass

from augserve.core.errors import SpecError
from augserve.core.policy import DEFAULT_MAX_PIXELS
from augserve.core.spec import MAX_OPS

BATCH_OVERHEAD_BYTES = 1 << 20  # room for labels, ids, tokens and skipped names in a message
UNARY_THREADS = 16  # RPC threads kept for unary calls beyond every stream the limits allow


@dataclass(frozen=True)
class Limits:
    """Server limits. Each one exceeded is answered with a clear status."""

    max_sessions: int = 64
    max_batch_size: int = 1024
    max_output_pixels: int = 4096 * 4096  # per image
    max_spec_ops: int = MAX_OPS
    max_prefetch: int = 16
    default_prefetch: int = 4
    max_batch_bytes: int = 256 << 20  # images of one batch
    max_buffer_bytes: int = 4 << 30  # all producers' rings together
    max_decoded_pixels: int = DEFAULT_MAX_PIXELS  # per source image (decompression bombs)
    group_window: int = 8  # slots beyond a producer's prefetch, for members to drift apart
    stall_seconds: float = 30.0  # a lockstep member that long without consuming is detached
    max_pause_seconds: float = 600.0  # longest pause a member may announce (0 asks for this)
    group_wait_seconds: float = 30.0  # longest a new group waits for its announced members
    idle_session_seconds: float = 600.0  # a session with batches ready but no credit that long is closed
    open_timeout_seconds: float = 10.0  # a stream without its open message that long is cut
    max_pending_opens: int = 32  # streams waiting for their open message (past it the oldest is cut)
    max_pending_opens_per_peer: int = 8  # ... from one peer host
    decoded_cache_bytes: int = 1 << 30  # decoded images kept for later epochs and experiments (0: off)
    decode_share_bytes: int = 512 << 20  # decoded batches kept for other specs of the same order

    def __post_init__(self) -> None:
        for name in (
            "max_sessions", "max_batch_size", "max_output_pixels", "max_prefetch", "default_prefetch",
            "max_pending_opens", "max_pending_opens_per_peer",
        ):
            if getattr(self, name) < 1:
                raise SpecError(name, "must be at least 1")
        if self.default_prefetch > self.max_prefetch:
            raise SpecError("default_prefetch", f"is over max_prefetch {self.max_prefetch}")
        if self.group_window < 1:
            raise SpecError("group_window", "must be at least 1")
        for name in ("open_timeout_seconds", "idle_session_seconds", "max_pause_seconds"):
            if not getattr(self, name) > 0:
                raise SpecError(name, "must be positive")
        for name in ("decoded_cache_bytes", "decode_share_bytes"):
            if getattr(self, name) < 0:
                raise SpecError(name, "must not be negative")

    @property
    def rpc_threads(self) -> int:
        """RPC worker threads: every session and pending open, and room for unary calls
        (health checks, ListDatasets) that no number of streams can take."""
        return self.max_sessions + self.max_pending_opens + UNARY_THREADS

    @property
    def max_message_bytes(self) -> int:
        return self.max_batch_bytes + BATCH_OVERHEAD_BYTES
