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
from dataclasses import field
from typing import Annotated, Any, Literal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import AfterValidator, BeforeValidator, Field

import augserve
from augserve._proto.augserve.v1 import augserve_pb2_grpc as pb_grpc
from augserve.backends import BACKEND_CHOICES, create_backend
from augserve.backends.base import Backend, backend_health, concurrent_batches
from augserve.core.config import (
    ConfigModel,
    Flag,
    NonNegativeInteger,
    NonNegativeNumber,
    Number,
    Port,
    PositiveInteger,
    Text,
    config_dataclass,
    plain_dataclass,
)
from augserve.core.errors import SpecError
from augserve.data.datasets import Dataset, load_manifest
from augserve.data.reading import DEFAULT_MAX_FILE_BYTES
from augserve.rpc import keepalive
from augserve.rpc.metrics import MetricsEndpoint
from augserve.rpc.schema import reflection_pool
from augserve.rpc.security import TlsFiles, TokenInterceptor, load_tokens, server_credentials
from augserve.rpc.servicer import SERVICE_NAME, AugmentServicer, TolerantDecoding
from augserve.streaming.limits import Limits
from augserve.streaming.manager import SessionManager
from augserve.streaming.scheduler import FairScheduler
from augserve.transport.cuda_ipc import CudaError, CudaIpcDevice, cuda_ipc_device
from augserve.transport.ring import remove_stale_segments

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


@config_dataclass
class DatasetConfig:
    """A dataset the server serves: an ImageFolder tree or a CSV file list.

    Files (CSV rows, symlink targets) must lie inside the dataset's root (the tree, or the CSV's
    folder) unless `allow_outside_root`; each file is at most `max_file_bytes`."""

    path: Text
    validation_fraction: Annotated[Number, Field(ge=0.0, lt=1.0)] = 0.0  # held out of every class
    split_seed: NonNegativeInteger = 0
    allow_outside_root: Flag = False
    max_file_bytes: PositiveInteger = DEFAULT_MAX_FILE_BYTES


def _dataset_name(name: str) -> str:
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"dataset name {name!r} must be letters, digits, '-', '_' or '.'")
    return name


def _path_or_entry(entry: Any) -> Any:
    # In a config file a dataset is its path, or a mapping of DatasetConfig's fields.
    return {"path": entry} if isinstance(entry, str) else entry


ServerLimits = plain_dataclass(Limits)  # Limits, validated


@config_dataclass
class ServerConfig(ConfigModel):
    """The server's configuration: the keys of `augserve serve --config FILE`, each also a flag
    (`--metrics-port`, `--limits.max-sessions`)."""

    host: Text = Field("127.0.0.1", description="address to bind (127.0.0.1: loopback only)")
    port: Port = Field(0, description="gRPC port (0: any free port; read AugserveServer.port)")
    backend: Literal[BACKEND_CHOICES] = "auto"
    threads: PositiveInteger | None = Field(None, description="backend worker threads (null: every core)")
    cuda_ipc_device: NonNegativeInteger | None = Field(
        None,
        description="GPU whose memory holds CUDA IPC batches for trainers on that GPU (null: the dali backend's own GPU; "
        "set it to give a CPU backend's batches to them)",
    )
    datasets: dict[Annotated[Text, AfterValidator(_dataset_name)], Annotated[DatasetConfig, BeforeValidator(_path_or_entry)]] = field(
        default_factory=dict
    )
    limits: ServerLimits = field(default_factory=Limits)
    grace_seconds: NonNegativeNumber = Field(10.0, description="how long a shutdown drains live streams")
    metrics_port: Port | None = Field(None, description="serve Prometheus metrics on this port (0: any free port)")
    metrics_host: Text | None = Field(
        None, description="address of the metrics endpoint (null: 127.0.0.1 without tokens, the gRPC host with them)"
    )
    tls_cert: Text | None = Field(None, description="PEM certificate: serve TLS (with tls_key)")
    tls_key: Text | None = Field(None, description="PEM private key of tls_cert")
    tls_client_ca: Text | None = Field(None, description="PEM CA: require client certificates it signed (mutual TLS)")
    token_file: Text | None = Field(None, description="bearer tokens, one per line (also AUGSERVE_TOKENS=a,b)")

    @property
    def tls(self) -> TlsFiles | None:
        """The certificate, key and client CA, when any is set."""
        if not (self.tls_cert or self.tls_key or self.tls_client_ca):
            return None
        return TlsFiles(self.tls_cert, self.tls_key, self.tls_client_ca)


def cuda_ipc_target(requested: int | None, backend: Backend) -> CudaIpcDevice | None:
    """The GPU CUDA IPC batches live on: `requested` (SpecError where it cannot be), else the
    GPU the backend runs on (none, logged, where CUDA IPC cannot run there), else none."""
    device = requested if requested is not None else getattr(backend, "device_id", None)
    if device is None:
        return None
    try:
        target = cuda_ipc_device(device)
    except (CudaError, OSError) as error:
        if requested is not None:
            raise SpecError("config.cuda_ipc_device", f"GPU {device} cannot hold CUDA IPC batches: {error}") from None
        log.warning("CUDA IPC is off: GPU %d cannot hold its batches (%s)", device, error)
        return None
    log.info("CUDA IPC batches for trainers on GPU %d (UUID %s)", device, target.uuid.hex())
    return target


class AugserveServer:
    """A running server. `stop()` is graceful: health NOT_SERVING, no new sessions, live
    streams end with UNAVAILABLE and a resume token, then the gRPC server stops."""

    def __init__(self, config: ServerConfig, backend: Backend | None = None) -> None:
        self.config = config
        remove_stale_segments()
        datasets = {
            name: Dataset(
                name,
                load_manifest(entry.path, max_file_bytes=entry.max_file_bytes, allow_outside_root=entry.allow_outside_root),
                entry.validation_fraction,
                entry.split_seed,
            )
            for name, entry in config.datasets.items()
        }
        self.backend = backend or create_backend(config.backend, config.threads)
        self.manager = SessionManager(
            self.backend, datasets, config.limits, FairScheduler(concurrent_batches(self.backend)),
            cuda_ipc_device=cuda_ipc_target(config.cuda_ipc_device, self.backend),
        )
        message_bytes = config.limits.max_message_bytes
        self.tokens = load_tokens(config.token_file)
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.limits.rpc_threads, thread_name_prefix="augserve-rpc"),
            interceptors=[TolerantDecoding(), *([TokenInterceptor(self.tokens)] if self.tokens else [])],
            maximum_concurrent_rpcs=config.limits.rpc_threads,
            options=[
                ("grpc.max_send_message_length", message_bytes),
                ("grpc.max_receive_message_length", 4 << 20),
                ("grpc.so_reuseport", 0),
                *keepalive.SERVER_OPTIONS,
            ],
        )
        self.device = "cpu" if self.backend.name in ("opencv", "dali-cpu") else f"cuda:{getattr(self.backend, 'device_id', 0)}"
        self.servicer = AugmentServicer(self.manager, self.device)
        pb_grpc.add_AugmentServicer_to_server(self.servicer, self.grpc_server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        self._started = False
        backend_health(self.backend).watch(self._backend_health_changed)
        # The pool of augserve/rpc/schema.py: method symbols resolve and the proto's comments travel.
        reflected = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(reflected, self.grpc_server, pool=reflection_pool(reflected))
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
            host = MetricsEndpoint.bind_host(self.config.metrics_host, self.config.host, self.tokens)
            self.metrics = MetricsEndpoint(self.manager, self.device, host, self.config.metrics_port, self.tokens)
            log.info("Prometheus metrics on http://%s:%d/metrics", host, self.metrics.port)
        self._started = True
        self._backend_health_changed(backend_health(self.backend).failure)
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

    def _backend_health_changed(self, failure: Exception | None) -> None:
        """Health follows the backend: NOT_SERVING while its latest batch failed on its own
        (DALI missing, a pipeline build, CUDA, memory), SERVING once a batch succeeds."""
        if not self._started:
            return
        if failure is not None:
            log.error("health NOT_SERVING: %s", failure)
        status = health_pb2.HealthCheckResponse.SERVING if failure is None else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            self.health.set(service, status)

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

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the server stopped within `timeout` seconds (None: wait until it does)."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> AugserveServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop(grace=1.0)


def create_server(config: ServerConfig, backend: Backend | None = None) -> AugserveServer:
    """Build and start a server; the caller stops it."""
    return AugserveServer(config, backend).start()


SIGNAL_POLL_SECONDS = 0.2


def serve(config: ServerConfig, port_file: str | None = None) -> None:
    """Run a server until SIGTERM or SIGINT, then shut down gracefully. `port_file` receives
    the bound port once the server is up (useful with port 0)."""
    server = create_server(config)

    def on_signal(number: int, frame: object) -> None:
        log.info("received %s: shutting down", signal.Signals(number).name)
        threading.Thread(target=server.stop, name="augserve-shutdown").start()

    # Before the port file: whoever reads it may signal at once.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if port_file:
        temporary = f"{port_file}.tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(f"{server.port}\n")
        os.replace(temporary, port_file)
    # Python runs a signal's handler in the main thread, and the kernel may hand the signal to
    # any of the server's threads: a main thread blocked in an untimed wait would not see it
    # until something else woke it. Waking every SIGNAL_POLL_SECONDS bounds that delay.
    while not server.wait(SIGNAL_POLL_SECONDS):
        pass
