"""The one place where exceptions become gRPC status codes (and back, for clients)."""

from __future__ import annotations

import logging

import grpc

from augserve.core.errors import (
    AuthenticationError,
    BadImageError,
    IdleError,
    LimitError,
    NotFoundError,
    SpecError,
    UnavailableError,
)

log = logging.getLogger(__name__)

STATUS_OF: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (SpecError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (LimitError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (BadImageError, grpc.StatusCode.DATA_LOSS),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (IdleError, grpc.StatusCode.DEADLINE_EXCEEDED),
)


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, message) for an exception; unexpected ones are logged with their traceback and
    leave as INTERNAL without it."""
    for kind, code in STATUS_OF:
        if isinstance(error, kind):
            return code, str(error)
    log.error("internal error", exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}); see the server log"
