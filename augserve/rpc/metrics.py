"""The Prometheus endpoint: the server's state, read at scrape time.

Nothing is counted twice: a collector turns the session manager's counters and live sessions
into metric families when Prometheus asks, so the hot paths carry no metrics code. Per-session
series disappear when their session closes.

The endpoint is a small HTTP server of its own, not prometheus_client's `start_http_server`
(one thread per connection, without limit or timeout: 300 half-sent requests held 300 threads).
What a hostile or broken client can take from it is bounded:

- One I/O thread reads request heads from every connection without blocking, so a client that
  sends half a request holds a file descriptor and a few bytes, never a thread. The head must
  be complete within `REQUEST_READ_SECONDS` of the connection and `MAX_HEAD_BYTES`, else the
  connection is closed. At most `MAX_PENDING_CONNECTIONS` heads are read at once and a newcomer
  crowds out the oldest: a scraper sends its request at once, a stalling client never does.
- `WORKER_THREADS` threads answer complete requests (when `MAX_QUEUED_REQUESTS` already wait,
  503), each response written within `RESPONSE_WRITE_SECONDS`.
- Only `GET /metrics` is served (404 elsewhere), one request per connection.
- When the server has bearer tokens, a scrape needs `Authorization: Bearer <token>` just as the
  gRPC calls do (401 with `WWW-Authenticate: Bearer` otherwise): session ids and dataset names
  are not for whoever reaches the port. Without tokens the endpoint is open, and therefore
  listens on loopback unless a host is configured (`MetricsEndpoint.bind_host`).
"""

from __future__ import annotations

import hmac
import io
import logging
import queue
import selectors
import socket
import threading
import time
import urllib.parse
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from augserve.streaming.counters import PRODUCTION_BUCKETS
from augserve.streaming.manager import ManagerSnapshot, SessionManager

log = logging.getLogger(__name__)

WORKER_THREADS = 4  # scrapes are rare and take milliseconds: a few threads answer them all
MAX_QUEUED_REQUESTS = 16  # complete requests waiting for a worker; more are answered 503
MAX_PENDING_CONNECTIONS = 128  # connections whose request head is still arriving
REQUEST_READ_SECONDS = 3.0  # for the whole request head, from accept; scrapers send it at once
RESPONSE_WRITE_SECONDS = 5.0  # for the whole response, to a client that reads slowly or never
MAX_HEAD_BYTES = 8192  # request line and headers; a scrape sends a few hundred bytes
LISTEN_BACKLOG = 64  # connections the kernel holds before the I/O thread accepts them
LOOPBACK_HOST = "127.0.0.1"
BUSY_RESPONSE = b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n"


class ManagerCollector(Collector):
    def __init__(self, manager: SessionManager, device: str) -> None:
        self.manager = manager
        self.device = device

    def collect(self) -> Iterator[Metric]:
        manager = self.manager
        snapshot = manager.snapshot()
        counters = snapshot.counters
        per_session = [
            (item.session_id, item.dataset, item.images_sent, item.batches_sent, item.queue_depth, item.credits)
            for item in snapshot.sessions
        ]
        groups = snapshot.producers
        buffer_bytes = snapshot.buffer_bytes
        bucket_counts = counters.production_bucket_counts
        production_sum = counters.production_seconds_sum
        totals = (counters.batches_produced, counters.batches_delivered, counters.images_delivered,
                  counters.images_skipped, counters.sessions_opened, counters.detached)

        backend = GaugeMetricFamily("augserve_backend_info", "Backend in use (value 1)", labels=["backend", "device"])
        backend.add_metric([manager.backend.name, self.device], 1)
        yield backend
        yield GaugeMetricFamily("augserve_sessions", "Open sessions", value=len(per_session))
        yield GaugeMetricFamily("augserve_producers", "Producers (groups) running", value=len(groups))
        yield GaugeMetricFamily("augserve_buffer_bytes", "Bytes of batch buffers held by producers", value=buffer_bytes)
        for name, help_text, value in zip(
            ("batches_produced", "batches_delivered", "images_delivered", "images_skipped", "sessions_opened", "sessions_detached"),
            ("Batches produced", "Batches delivered to sessions", "Images delivered to sessions",
             "Images skipped as bad (decode errors, pixel limit, ...)", "Sessions opened", "Sessions detached from their group"),
            totals,
        ):
            yield CounterMetricFamily(f"augserve_{name}", help_text, value=value)

        images = CounterMetricFamily("augserve_session_images", "Images delivered to a session", labels=["session", "dataset"])
        batches = CounterMetricFamily("augserve_session_batches", "Batches delivered to a session", labels=["session", "dataset"])
        queue = GaugeMetricFamily("augserve_session_queue_depth", "Batches produced for a session and not yet sent", labels=["session", "dataset"])
        credits = GaugeMetricFamily("augserve_session_credits", "Credits granted by a client and not yet used", labels=["session", "dataset"])
        for session_id, dataset, image_count, batch_count, depth, credit in per_session:
            images.add_metric([session_id, dataset], image_count)
            batches.add_metric([session_id, dataset], batch_count)
            queue.add_metric([session_id, dataset], depth)
            credits.add_metric([session_id, dataset], credit)
        yield from (images, batches, queue, credits)

        yield from group_metrics(snapshot)
        yield from decode_metrics(snapshot)

        yield from pipeline_cache_metrics(manager.backend)

        cumulative, running = [], 0
        for bound, count in zip((*map(str, PRODUCTION_BUCKETS), "+Inf"), bucket_counts):
            running += count
            cumulative.append((bound, running))
        histogram = HistogramMetricFamily("augserve_production_seconds", "Seconds to produce a batch (turn at the backend included)")
        histogram.add_metric([], cumulative, sum_value=production_sum)
        yield histogram


# Per group (a producer and the sessions it feeds): gauges, then counters since it started.
GROUP_GAUGES = (
    ("members", "members", "Sessions fed by a producer"),
    ("paused_members", "paused_members", "Members that announced a pause (validation, a checkpoint) still running"),
    ("decode_producers", "decode_producers", "Producers sharing this producer's decodes (its dataset order, any spec)"),
)
GROUP_COUNTERS = (
    ("detaches", "detaches", "Members detached from this group (fell behind or stalled)"),
    ("rejoins", "rejoins", "Detached members that came back to this group"),
    ("batches_produced", "batches_produced", "Batches this group's producer made"),
    ("images_decoded", "images_decoded", "Images this group's producer decoded itself"),
    ("decode_shared", "shared_decode_hits", "Images taken from another spec's decode of the same batch"),
    ("decode_cached", "decode_cache_hits", "Images taken from the decoded-image cache"),
)


def group_metrics(snapshot: ManagerSnapshot) -> Iterator[Metric]:
    """augserve_group_* families, one series per live producer (labels producer, dataset)."""
    labels = ["producer", "dataset"]
    for field_name, metric_name, help_text in GROUP_GAUGES:
        family = GaugeMetricFamily(f"augserve_group_{metric_name}", help_text, labels=labels)
        for item in snapshot.producers:
            family.add_metric([str(item.producer_id), item.dataset], getattr(item, field_name))
        yield family
    for field_name, metric_name, help_text in GROUP_COUNTERS:
        family = CounterMetricFamily(f"augserve_group_{metric_name}", help_text, labels=labels)
        for item in snapshot.producers:
            family.add_metric([str(item.producer_id), item.dataset], getattr(item, field_name))
        yield family


def decode_metrics(snapshot: ManagerSnapshot) -> Iterator[Metric]:
    """Server-wide decoding: decodes, shared decodes, the decoded-image cache, rejoins."""
    counters = snapshot.counters
    for name, help_text, value in (
        ("images_decoded", "Images decoded (OpenCV: decodes run; DALI: images it decoded and kept)", counters.images_decoded),
        ("shared_decode_hits", "Images a producer took from another spec's decode of the same batch", counters.decode_shared),
        ("sessions_rejoined", "Detached sessions that went back to their group", counters.rejoined),
        ("pauses", "Pauses announced by sessions (validation, checkpoints)", counters.pauses),
    ):
        yield CounterMetricFamily(f"augserve_{name}", help_text, value=value)
    yield GaugeMetricFamily("augserve_decode_share_bytes", "Decoded batches kept for other specs of the same order", value=snapshot.decode_share_bytes)
    cache = snapshot.decoded_cache
    if cache is None:
        return
    yield GaugeMetricFamily("augserve_decoded_cache_bytes", "Decoded pixels held by the decoded-image cache", value=cache.bytes)
    yield GaugeMetricFamily("augserve_decoded_cache_max_bytes", "Budget of the decoded-image cache (0: off)", value=cache.max_bytes)
    yield GaugeMetricFamily("augserve_decoded_cache_entries", "Images in the decoded-image cache", value=cache.entries)
    yield GaugeMetricFamily("augserve_decoded_cache_hit_ratio", "Cache lookups that found their image, since start", value=cache.hit_rate)
    for name, help_text, value in (
        ("hits", "Decoded-image cache lookups that found their image", cache.hits),
        ("misses", "Decoded-image cache lookups that did not (the image was decoded)", cache.misses),
        ("evictions", "Images dropped from the decoded-image cache to make room", cache.evictions),
    ):
        yield CounterMetricFamily(f"augserve_decoded_cache_{name}", help_text, value=value)


# The pipeline cache's counters and gauges, for a backend that keeps one (DALI's `cache_stats()`).
PIPELINE_COUNTERS = (
    ("builds", "Pipelines built"),
    ("build_failures", "Pipeline builds that failed"),
    ("evictions", "Idle pipelines evicted from the cache (count or device memory bound)"),
    ("hits", "Batches that found a built pipeline of their shape"),
    ("misses", "Batches that had to build a pipeline"),
    ("backend_failures", "Batches that failed in the backend itself (not a bad image)"),
)
PIPELINE_GAUGES = (
    ("pipelines", "Pipelines cached now"),
    ("busy", "Cached pipelines with batches in flight"),
    ("max_pipelines", "Most pipelines the cache holds"),
    ("device_bytes", "Device memory the cached pipelines took when built"),
    ("max_device_bytes", "Device memory budget of the pipeline cache"),
)


def pipeline_cache_metrics(backend: object) -> Iterator[Metric]:
    """augserve_pipeline_* families from the backend's `cache_stats()`; nothing for a backend
    without a pipeline cache (OpenCV). Gauges the backend cannot measure are left out."""
    cache_stats = getattr(backend, "cache_stats", None)
    if cache_stats is None:
        return
    stats = cache_stats()
    for name, help_text in PIPELINE_COUNTERS:
        yield CounterMetricFamily(f"augserve_pipeline_{name}", help_text, value=getattr(stats, name))
    for name, help_text in PIPELINE_GAUGES:
        value = getattr(stats, name)
        if value is not None:
            yield GaugeMetricFamily(f"augserve_pipeline_{name}", help_text, value=value)


def bearer_token_admitted(authorization: str | None, tokens: tuple[bytes, ...]) -> bool:
    """Whether an HTTP `Authorization` value is `Bearer <one of tokens>` (the scheme in any
    case, as RFC 7235 allows). Every token is compared with `hmac.compare_digest`, so the time
    taken tells neither which token matched nor how much of one."""
    scheme, _, offered = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    # http.client decodes header bytes as latin-1: encoding back gives the bytes that were sent.
    offered_bytes = offered.strip().encode("latin-1")
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(offered_bytes, token)
    return matched


class HeadState(Enum):
    WAITING = "waiting"  # more bytes are to come
    COMPLETE = "complete"  # the head ended with its blank line: answer it
    REFUSED = "refused"  # the peer closed early or sent more than a head may hold: drop it


@dataclass
class _PartialHead:
    deadline: float  # time.monotonic() seconds
    received: bytearray = field(default_factory=bytearray)


Key = TypeVar("Key", bound=Hashable)


class PendingHeads(Generic[Key]):
    """Request heads still arriving, by connection: which are complete, which to drop (too
    slow, too large, crowded out). Bookkeeping only: the endpoint's I/O thread reads the
    sockets and carries the decisions out. Times are `time.monotonic()` seconds."""

    def __init__(self, capacity: int, read_seconds: float, max_head_bytes: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.read_seconds = read_seconds
        self.max_head_bytes = max_head_bytes
        # Insertion order is arrival order, and every head has the same time to arrive, so the
        # first entry is both the oldest and the next to expire.
        self._heads: dict[Key, _PartialHead] = {}

    def __len__(self) -> int:
        return len(self._heads)

    def __contains__(self, key: object) -> bool:
        return key in self._heads

    def admit(self, key: Key, now: float) -> list[Key]:
        """Start waiting for `key`'s head; the connections it crowds out (oldest first), to close."""
        crowded_out = []
        while len(self._heads) >= self.capacity:
            oldest = next(iter(self._heads))
            del self._heads[oldest]
            crowded_out.append(oldest)
        self._heads[key] = _PartialHead(now + self.read_seconds)
        return crowded_out

    def feed(self, key: Key, data: bytes) -> tuple[HeadState, bytes]:
        """Bytes received on `key` (b"": the peer closed). COMPLETE comes with the head, up to
        and including its blank line; COMPLETE and REFUSED forget `key`."""
        received = self._heads[key].received
        received += data
        end = _head_end(received)
        if data and end is None and len(received) <= self.max_head_bytes:
            return HeadState.WAITING, b""
        del self._heads[key]
        if end is None or end > self.max_head_bytes:
            return HeadState.REFUSED, b""
        return HeadState.COMPLETE, bytes(received[:end])

    def expired(self, now: float) -> list[Key]:
        """The connections whose head did not arrive in time, forgotten, to close."""
        late = []
        for key, head in self._heads.items():
            if head.deadline > now:
                break
            late.append(key)
        for key in late:
            del self._heads[key]
        return late

    def seconds_to_next_deadline(self, now: float) -> float | None:
        """How long until `expired` has something to say; None while nothing is pending."""
        for head in self._heads.values():
            return max(0.0, head.deadline - now)
        return None

    def drain(self) -> list[Key]:
        """Forget every connection; them, to close."""
        keys = list(self._heads)
        self._heads.clear()
        return keys


def _head_end(received: bytearray) -> int | None:
    """Where the head ends (after its blank line; bare LF line ends accepted as http.server
    does), or None."""
    ends = [index + len(mark) for mark in (b"\r\n\r\n", b"\n\n") if (index := received.find(mark)) >= 0]
    return min(ends, default=None)


class _MetricsRequestHandler(BaseHTTPRequestHandler):
    """Answers one request whose head the I/O thread has read already: `request` is the
    connection and that head, `server` the endpoint."""

    server: MetricsEndpoint  # type: ignore[assignment]  # the endpoint stands in for socketserver's
    server_version = "augserve"  # the Server header: no Python version for a visitor to look up
    sys_version = ""

    def setup(self) -> None:
        self.connection, head = self.request
        self.rfile = io.BytesIO(head)
        self.wfile = io.BytesIO()  # sent whole by finish()

    def finish(self) -> None:
        # One sendall under a timeout bounds the whole response (a socket file would bound each
        # send, and a client reading a byte at a time could hold the worker for ever).
        self.connection.settimeout(RESPONSE_WRITE_SECONDS)
        self.connection.sendall(self.wfile.getvalue())

    def do_GET(self) -> None:
        if urllib.parse.urlsplit(self.path).path != "/metrics":
            self._reply(HTTPStatus.NOT_FOUND, b"only /metrics is served here\n")
        elif not self.server.admits(self.headers.get("Authorization")):
            self._reply(HTTPStatus.UNAUTHORIZED, b"missing or wrong bearer token\n",
                        extra_headers=(("WWW-Authenticate", 'Bearer realm="augserve metrics"'),))
        else:
            self._reply(HTTPStatus.OK, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)

    def _reply(
        self, status: HTTPStatus, body: bytes, content_type: str = "text/plain; charset=utf-8",
        extra_headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra_headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        # Scrapes every few seconds would flood stderr, where http.server writes them.
        log.debug("metrics %s: " + format, self.address_string(), *args)


class MetricsEndpoint:
    """/metrics for one server (its own registry, so servers never mix) on `host`:`port`; port
    0 takes any free port, and `host`, `port` then say where it listens. With `tokens`, a
    scrape must bear one of them. The module docstring gives the bounds on threads and time;
    `close()` stops it."""

    def __init__(self, manager: SessionManager, device: str, host: str, port: int, tokens: tuple[str, ...] = ()) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(ManagerCollector(manager, device))
        self._tokens = tuple(token.encode() for token in tokens)
        self._pending: PendingHeads[socket.socket] = PendingHeads(MAX_PENDING_CONNECTIONS, REQUEST_READ_SECONDS, MAX_HEAD_BYTES)
        # Only the I/O thread puts, so checking qsize() before put() bounds the queue.
        self._requests: queue.SimpleQueue[tuple[socket.socket, bytes] | None] = queue.SimpleQueue()
        self._closing = threading.Event()
        self._listener = _listen(host, port)
        self.host, self.port = self._listener.getsockname()[:2]
        self._wake_reader, self._wake_writer = socket.socketpair()  # ends select() at close()
        self._selector = selectors.DefaultSelector()
        for endpoint_socket in (self._listener, self._wake_reader):
            endpoint_socket.setblocking(False)
            self._selector.register(endpoint_socket, selectors.EVENT_READ)
        self._io_thread = threading.Thread(target=self._read_heads, name="augserve-metrics-io", daemon=True)
        self._workers = [
            threading.Thread(target=self._answer, name=f"augserve-metrics-{index}", daemon=True)
            for index in range(WORKER_THREADS)
        ]
        for thread in (self._io_thread, *self._workers):
            thread.start()

    @staticmethod
    def bind_host(configured_host: str | None, grpc_host: str, tokens: tuple[str, ...]) -> str:
        """Where /metrics listens: `configured_host` when one is set (`metrics_host`); else,
        when tokens guard the endpoint, the gRPC server's host as before; else loopback
        (127.0.0.1), because an open endpoint shows session ids and dataset names to whoever
        reaches it. To scrape an open endpoint from another machine, set `metrics_host`."""
        if configured_host:
            return configured_host
        return grpc_host if tokens else LOOPBACK_HOST

    def admits(self, authorization: str | None) -> bool:
        """Whether a request with this `Authorization` header may read the metrics."""
        return not self._tokens or bearer_token_admitted(authorization, self._tokens)

    def close(self) -> None:
        """Stop listening and close every connection. Joins the threads within
        RESPONSE_WRITE_SECONDS and a second: a worker first finishes the response it writes."""
        if self._closing.is_set():
            return
        self._closing.set()
        deadline = time.monotonic() + RESPONSE_WRITE_SECONDS + 1.0
        _send_quietly(self._wake_writer, b"x")
        self._io_thread.join(max(0.0, deadline - time.monotonic()))
        for _ in self._workers:  # after the I/O thread, so no request is queued behind these
            self._requests.put(None)
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        self._selector.close()
        for endpoint_socket in (self._listener, self._wake_reader, self._wake_writer):
            endpoint_socket.close()

    def _read_heads(self) -> None:
        """The I/O thread: accepts connections, reads request heads without blocking, drops the
        late ones and queues the complete ones for the workers."""
        try:
            while not self._closing.is_set():
                for key, _ in self._selector.select(self._pending.seconds_to_next_deadline(time.monotonic())):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is not self._wake_reader:
                        self._receive(key.fileobj)  # type: ignore[arg-type]  # only sockets are registered
                for connection in self._pending.expired(time.monotonic()):
                    self._drop(connection)
        except Exception:  # an endpoint that stops must say why
            log.exception("the metrics endpoint stopped reading requests")
        finally:
            for connection in self._pending.drain():
                self._drop(connection)

    def _accept(self) -> None:
        for _ in range(LISTEN_BACKLOG):  # then read what has arrived before accepting more
            try:
                connection, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as error:  # out of file descriptors, say: keep serving those open
                log.warning("the metrics endpoint cannot accept a connection: %s", error)
                return
            connection.setblocking(False)
            for crowded_out in self._pending.admit(connection, time.monotonic()):
                self._drop(crowded_out)
            self._selector.register(connection, selectors.EVENT_READ)

    def _receive(self, connection: socket.socket) -> None:
        if connection not in self._pending:  # crowded out by an accept of the same select()
            return
        try:
            data = connection.recv(MAX_HEAD_BYTES)
        except BlockingIOError:
            return
        except OSError:  # reset by the peer: as good as closed
            data = b""
        state, head = self._pending.feed(connection, data)
        if state is HeadState.REFUSED:
            self._drop(connection)
        elif state is HeadState.COMPLETE:
            self._selector.unregister(connection)
            if self._requests.qsize() >= MAX_QUEUED_REQUESTS:
                _send_quietly(connection, BUSY_RESPONSE)
                connection.close()
            else:
                self._requests.put((connection, head))

    def _drop(self, connection: socket.socket) -> None:
        self._selector.unregister(connection)
        connection.close()

    def _answer(self) -> None:
        """A worker: answers queued requests until close()."""
        while (request := self._requests.get()) is not None:
            connection, head = request
            try:
                if not self._closing.is_set():
                    _MetricsRequestHandler((connection, head), _peer(connection), self)  # type: ignore[arg-type]
            except OSError as error:  # the client went away or stopped reading
                log.debug("metrics response not delivered: %s", error)
            except Exception:  # a failing collector must not end the worker
                log.exception("metrics request failed")
            finally:
                connection.close()


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host`:`port`, IPv4 or IPv6 as `host` resolves ("[::1]" too)."""
    family, _, _, _, address = socket.getaddrinfo(
        host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    return socket.create_server(address, family=family, backlog=LISTEN_BACKLOG)


def _peer(connection: socket.socket) -> tuple[str, int]:
    try:
        return connection.getpeername()[:2]
    except OSError:  # already gone; the address only appears in debug logs
        return ("", 0)


def _send_quietly(connection: socket.socket, data: bytes) -> None:
    """Best effort: the peer may be gone, or its buffer full, and nothing waits for it."""
    try:
        connection.send(data)
    except OSError:
        pass
