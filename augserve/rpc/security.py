"""TLS (optionally mutual) and bearer tokens, for server and client.

Tokens come from a file (one per line, `#` comments) or the environment (`AUGSERVE_TOKENS`,
comma-separated, on the server; `AUGSERVE_TOKEN` on the client), never from the command line
where `ps` would show them. Every call but health checking (which load balancers and
Kubernetes probes make without credentials) needs `authorization: Bearer <token>`.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc

from augserve.core.errors import SpecError

TOKENS_ENVIRONMENT = "AUGSERVE_TOKENS"
CLIENT_TOKEN_ENVIRONMENT = "AUGSERVE_TOKEN"
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the server's (or client's) certificate and key, and the CA that signs peers."""

    certificate: str | None = None
    private_key: str | None = None
    peer_ca: str | None = None

    def read(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        def load(field: str, path: str | None) -> bytes | None:
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as error:
                raise SpecError(field, f"cannot read {path}: {error.strerror}") from None

        return (load("tls_cert", self.certificate), load("tls_key", self.private_key), load("tls_ca", self.peer_ca))


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """TLS for the server; with `peer_ca`, clients must present a certificate it signed."""
    certificate, key, client_ca = files.read()
    if certificate is None or key is None:
        raise SpecError("tls_cert", "TLS needs both a certificate and a private key")
    return grpc.ssl_server_credentials([(key, certificate)], root_certificates=client_ca, require_client_auth=client_ca is not None)


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """TLS for a client: `peer_ca` verifies the server; certificate and key for mutual TLS."""
    certificate, key, server_ca = files.read()
    return grpc.ssl_channel_credentials(root_certificates=server_ca, private_key=key, certificate_chain=certificate)


def load_tokens(token_file: str | None) -> tuple[str, ...]:
    """Tokens from `token_file` and `AUGSERVE_TOKENS`; empty means no token is required."""
    tokens = [token.strip() for token in os.environ.get(TOKENS_ENVIRONMENT, "").split(",") if token.strip()]
    if token_file:
        try:
            lines = Path(token_file).read_text().splitlines()
        except OSError as error:
            raise SpecError("token_file", f"cannot read {token_file}: {error.strerror}") from None
        tokens += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return tuple(tokens)


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as `handler` that ends with UNAUTHENTICATED."""

    def refuse(request_or_iterator: object, context: grpc.ServicerContext):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class TokenInterceptor(grpc.ServerInterceptor):
    """Admits calls bearing one of `tokens` (compared in constant time)."""

    def __init__(self, tokens: tuple[str, ...]) -> None:
        self._tokens = tuple(token.encode() for token in tokens)

    def _admitted(self, metadata: tuple[tuple[str, str], ...]) -> bool:
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                offered = value[len("Bearer "):].encode()
                return any(hmac.compare_digest(offered, token) for token in self._tokens)
        return False

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or details.method.startswith(OPEN_METHOD_PREFIXES) or self._admitted(details.invocation_metadata):
            return handler
        return _refusal(handler, "missing or wrong bearer token (metadata 'authorization: Bearer <token>')")


def client_token(token: str | None) -> str | None:
    """The given token, else `AUGSERVE_TOKEN` from the environment, else None."""
    return token or os.environ.get(CLIENT_TOKEN_ENVIRONMENT) or None
