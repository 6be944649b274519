"""The gRPC server: the Augment service, health checking, reflection, graceful shutdown.

`create_server(config)` builds and starts a server and returns it (tests bind port 0 and read
`server.port`); `serve(config)` runs one until SIGTERM or SIGINT.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent import futures
from dataclasses import dataclass, field
from typing import Callable, Iterator

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import augserve
from augserve._proto.augserve.v1 import augserve_pb2 as pb
from augserve._proto.augserve.v1 import augserve_pb2_grpc as pb_grpc
from augserve.backends import create_backend
from augserve.backends.base import Backend
from augserve.data.datasets import Dataset, load_manifest
from augserve.core.errors import SpecError
from augserve.rpc.metrics import MetricsEndpoint
from augserve.rpc.security import TlsFiles, TokenInterceptor, load_tokens, server_credentials
from augserve.streaming.scheduler import FairScheduler
from augserve.streaming.manager import Limits, Session, SessionManager
from augserve.core.spec import eval_spec
from augserve.rpc.status import status_of
from augserve.transport.ring import remove_stale_segments
from augserve.rpc.convert import RESUME_METADATA_KEY, parse_open

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Augment"].full_name
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass(frozen=True)
class DatasetConfig:
    """A dataset the server serves: an ImageFolder tree or a CSV file list."""

    path: str
    validation_fraction: float = 0.0
    split_seed: int = 0


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (read AugserveServer.port)
    backend: str = "auto"
    threads: int | None = None  # backend worker threads; default: every core
    datasets: dict[str, DatasetConfig] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    grace_seconds: float = 10.0
    metrics_port: int | None = None  # Prometheus /metrics on this port (0: any free port)
    metrics_host: str | None = None  # default: the same address as the gRPC server
    tls: TlsFiles | None = None  # certificate, key, and a client CA for mutual TLS
    token_file: str | None = None  # bearer tokens, one per line (and AUGSERVE_TOKENS)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise SpecError("port", f"{self.port} is outside [0, 65535]")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise SpecError("metrics_port", f"{self.metrics_port} is outside [0, 65535]")
        for name in self.datasets:
            if not name or not all(c.isalnum() or c in "-_." for c in name):
                raise SpecError("datasets", f"dataset name {name!r} must be letters, digits, '-', '_' or '.'")


class AugmentServicer(pb_grpc.AugmentServicer):
    """One method per RPC; all state lives in the SessionManager."""

    def __init__(self, manager: SessionManager, device: str) -> None:
        self.manager = manager
        self.device = device

    def Stream(self, request_iterator: Iterator[pb.ClientMessage], context: grpc.ServicerContext) -> Iterator[pb.ServerMessage]:
        session: Session | None = None
        try:
            first = next(request_iterator, None)
            if first is None:
                return
            if isinstance(first, Undecodable):
                raise first.field_error()
            kind = first.WhichOneof("kind")
            if kind != "open":
                raise SpecError(kind or "message", "the first message of a stream must be open")
            request = parse_open(first.open, eval_spec, self.manager.limits.max_decoded_pixels)
            session = self.manager.open(request)
            context.add_callback(session.cancel)
            threading.Thread(
                target=_read_client, args=(request_iterator, session), name=f"augserve-reader-{session.id}", daemon=True
            ).start()
            yield pb.ServerMessage(info=session.info())
            yield from session.messages()
        except Exception as error:
            code, message = status_of(error)
            if session is not None and session.last_token:
                context.set_trailing_metadata(((RESUME_METADATA_KEY, session.last_token),))
            context.abort(code, message)
        finally:
            if session is not None:
                self.manager.close(session)

    def ListDatasets(self, request: pb.ListDatasetsRequest, context: grpc.ServicerContext) -> pb.ListDatasetsResponse:
        if isinstance(request, Undecodable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.field_error()))
        response = pb.ListDatasetsResponse()
        for name, dataset in sorted(self.manager.datasets.items()):
            manifest = dataset.manifest
            response.datasets.add(
                name=name,
                samples=len(manifest),
                classes=list(manifest.classes),
                train_samples=len(dataset.split_ids("train")),
                validation_samples=len(dataset.split_ids("validation")),
                image_size=list(manifest.uniform_size() or ()),
            )
        return response

    def GetServerInfo(self, request: pb.ServerInfoRequest, context: grpc.ServicerContext) -> pb.ServerInfo:
        if isinstance(request, Undecodable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.field_error()))
        manager = self.manager
        with manager.condition:
            return pb.ServerInfo(
                version=augserve.__version__,
                backend=manager.backend.name,
                device=self.device,
                limits=manager.limits.to_proto(),
                live_sessions=len(manager.sessions),
                producers=len(manager.producers),
                batches_produced=manager.counters.batches_produced,
                batches_delivered=manager.counters.batches_delivered,
                datasets=sorted(manager.datasets),
                buffer_bytes=manager.buffer_bytes,
            )


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes are not the message its method takes."""

    message_type: str
    error: str

    def field_error(self) -> SpecError:
        return SpecError("message", f"could not be parsed as {self.message_type} ({self.error})")


def _tolerant(message_class: type) -> Callable[[bytes], object]:
    """A deserializer that hands undecodable bytes to the servicer (which names the problem with
    INVALID_ARGUMENT) instead of failing inside grpc (INTERNAL)."""

    def deserialize(data: bytes) -> object:
        try:
            return message_class.FromString(data)
        except DecodeError as error:
            return Undecodable(message_class.DESCRIPTOR.full_name, str(error))

    return deserialize


def augment_handlers(servicer: AugmentServicer) -> grpc.GenericRpcHandler:
    """The Augment service's method handlers, with tolerant request deserializers."""
    serialize = {name: getattr(pb, name).SerializeToString for name in ("ServerMessage", "ListDatasetsResponse", "ServerInfo")}
    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Stream": grpc.stream_stream_rpc_method_handler(
                servicer.Stream, _tolerant(pb.ClientMessage), serialize["ServerMessage"]
            ),
            "ListDatasets": grpc.unary_unary_rpc_method_handler(
                servicer.ListDatasets, _tolerant(pb.ListDatasetsRequest), serialize["ListDatasetsResponse"]
            ),
            "GetServerInfo": grpc.unary_unary_rpc_method_handler(
                servicer.GetServerInfo, _tolerant(pb.ServerInfoRequest), serialize["ServerInfo"]
            ),
        },
    )


def _read_client(request_iterator: Iterator[pb.ClientMessage], session: Session) -> None:
    """Apply credits and slot releases as they arrive; a protocol error ends the session."""
    try:
        for message in request_iterator:
            if isinstance(message, Undecodable):
                session.fail(message.field_error())
                return
            kind = message.WhichOneof("kind")
            if kind == "credit":
                session.grant(message.credit.batches)
            elif kind == "release":
                session.release_slot(message.release.sequence)
            elif kind == "open":
                session.fail(SpecError("open", "the session is already open; a stream opens one session"))
                return
            else:
                session.fail(SpecError("message", "empty ClientMessage (expected credit or release)"))
                return
    except grpc.RpcError:
        session.cancel()  # the client went away
    except Exception as error:  # malformed input must not kill the server
        log.warning("session %s: reader stopped: %s", session.id, error)
        session.cancel()


class AugserveServer:
    """A running server. `stop()` is graceful: health NOT_SERVING, no new sessions, live
    streams end with UNAVAILABLE and a resume token, then the gRPC server stops."""

    def __init__(self, config: ServerConfig, backend: Backend | None = None) -> None:
        self.config = config
        remove_stale_segments()
        datasets = {
            name: Dataset(name, load_manifest(entry.path), entry.validation_fraction, entry.split_seed)
            for name, entry in config.datasets.items()
        }
        self.backend = backend or create_backend(config.backend, config.threads)
        concurrency = 2 if self.backend.name == "opencv" else 1
        self.manager = SessionManager(self.backend, datasets, config.limits, FairScheduler(concurrency))
        message_bytes = config.limits.max_message_bytes
        self.tokens = load_tokens(config.token_file)
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.limits.max_sessions + 16, thread_name_prefix="augserve-rpc"),
            interceptors=[TokenInterceptor(self.tokens)] if self.tokens else [],
            maximum_concurrent_rpcs=config.limits.max_sessions + 16,
            options=[
                ("grpc.max_send_message_length", message_bytes),
                ("grpc.max_receive_message_length", 4 << 20),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.device = "cpu" if self.backend.name in ("opencv", "dali-cpu") else f"cuda:{getattr(self.backend, 'device_id', 0)}"
        self.grpc_server.add_generic_rpc_handlers((augment_handlers(AugmentServicer(self.manager, self.device)),))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc_server)
        address = f"{config.host}:{config.port}"
        if config.tls is not None:
            self.port = self.grpc_server.add_secure_port(address, server_credentials(config.tls))
        else:
            self.port = self.grpc_server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind {config.host}:{config.port}")
        self._stopped = threading.Event()
        self.metrics: MetricsEndpoint | None = None

    @property
    def address(self) -> str:
        host = self.config.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"

    def start(self) -> AugserveServer:
        self.grpc_server.start()
        if self.config.metrics_port is not None:
            host = self.config.metrics_host or self.config.host
            self.metrics = MetricsEndpoint(self.manager, self.device, host, self.config.metrics_port)
            log.info("Prometheus metrics on http://%s:%d/metrics", host, self.metrics.port)
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "augserve %s serving %s on %s with backend %s (%s)",
            augserve.__version__, ", ".join(sorted(self.manager.datasets)) or "no datasets", self.address,
            self.backend.name, self.device,
        )
        protections = [name for name, on in (("TLS", self.config.tls is not None), ("bearer tokens", bool(self.tokens))) if on]
        if protections:
            log.info("clients need %s", " and ".join(protections))
        elif self.config.host not in LOOPBACK_HOSTS:
            log.warning(
                "!!! listening on %s beyond loopback WITHOUT TLS OR TOKENS: anyone who reaches this port can "
                "read every dataset served. Use --tls-cert/--tls-key and --token-file. !!!", self.config.host
            )
        return self

    def stop(self, grace: float | None = None) -> None:
        if self._stopped.is_set():
            return
        grace = self.config.grace_seconds if grace is None else grace
        self.health.enter_graceful_shutdown()
        self.manager.shutdown(timeout=grace)
        self.grpc_server.stop(grace).wait()
        if self.metrics is not None:
            self.metrics.close()
        self.backend.close()
        self._stopped.set()
        log.info("augserve stopped")

    def wait(self) -> None:
        self._stopped.wait()

    def __enter__(self) -> AugserveServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop(grace=1.0)


def create_server(config: ServerConfig, backend: Backend | None = None) -> AugserveServer:
    """Build and start a server; the caller stops it."""
    return AugserveServer(config, backend).start()


def serve(config: ServerConfig, port_file: str | None = None) -> None:
    """Run a server until SIGTERM or SIGINT, then shut down gracefully. `port_file` receives
    the bound port once the server is up (useful with port 0)."""
    server = create_server(config)
    if port_file:
        temporary = f"{port_file}.tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(f"{server.port}\n")
        os.replace(temporary, port_file)

    def on_signal(number: int, frame: object) -> None:
        log.info("received %s: shutting down", signal.Signals(number).name)
        threading.Thread(target=server.stop, name="augserve-shutdown").start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.wait()
