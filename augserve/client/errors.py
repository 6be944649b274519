"""The one exception type a client raises."""

from __future__ import annotations

import grpc

from augserve.rpc.convert import RESUME_METADATA_KEY


class AugserveClientError(Exception):
    """A failed call: `code` is the gRPC status code, `message` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str, resume_token: bytes = b"") -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.resume_token = resume_token

    @classmethod
    def from_rpc(cls, error: grpc.RpcError, resume_token: bytes = b"") -> AugserveClientError:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        for key, value in (error.trailing_metadata() or ()) if hasattr(error, "trailing_metadata") else ():
            if key == RESUME_METADATA_KEY:
                resume_token = value
        return cls(code or grpc.StatusCode.UNKNOWN, details or "", resume_token)
