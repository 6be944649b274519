"""Exception types shared across augserve; each maps to one gRPC status code in server.py."""

from __future__ import annotations


class AugserveError(Exception):
    """Base of every error augserve raises on purpose."""


class SpecError(AugserveError, ValueError):
    """An augmentation spec or configuration field is invalid.

    `field` is the dotted path of the offending field (e.g. ``ops[1].rotate.degrees``), so the
    message a user sees always names what to fix.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class BadImageError(AugserveError):
    """An image could not be used: corrupt, truncated, not an image, or over the pixel limit."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class NotFoundError(AugserveError):
    """A named thing (dataset) does not exist on this server."""


class LimitError(AugserveError):
    """A request is over one of the server's limits, or the server is full."""


class UnavailableError(AugserveError):
    """The server is shutting down or cannot serve right now; retry (with a resume token)."""


class BackendError(UnavailableError):
    """The backend itself failed, not an image: DALI not importable, a pipeline that would not
    build, a CUDA error, out of memory. The server's fault, so UNAVAILABLE (retry later, with a
    resume token); `cause` says which of those it was."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(f"backend failure ({cause}): {detail}")
        self.cause = cause
        self.detail = detail


class AuthenticationError(AugserveError):
    """Missing or wrong credentials."""


class IdleError(AugserveError):
    """A session that granted no credit and did nothing else for too long was closed."""
