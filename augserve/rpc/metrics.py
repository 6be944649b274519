"""The Prometheus endpoint: the server's state, read at scrape time.

Nothing is counted twice: a collector turns the session manager's counters and live sessions
into metric families when Prometheus asks, so the hot paths carry no metrics code. Per-session
series disappear when their session closes.
"""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from augserve.streaming.counters import PRODUCTION_BUCKETS
from augserve.streaming.manager import SessionManager


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
        groups = [(str(item.producer_id), item.dataset, item.members) for item in snapshot.producers]
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

        members = GaugeMetricFamily("augserve_group_members", "Sessions fed by a producer", labels=["producer", "dataset"])
        for producer_id, dataset, count in groups:
            members.add_metric([producer_id, dataset], count)
        yield members

        cumulative, running = [], 0
        for bound, count in zip((*map(str, PRODUCTION_BUCKETS), "+Inf"), bucket_counts):
            running += count
            cumulative.append((bound, running))
        histogram = HistogramMetricFamily("augserve_production_seconds", "Seconds to produce a batch (turn at the backend included)")
        histogram.add_metric([], cumulative, sum_value=production_sum)
        yield histogram


class MetricsEndpoint:
    """An HTTP /metrics endpoint for one server (its own registry, so servers never mix)."""

    def __init__(self, manager: SessionManager, device: str, host: str, port: int) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(ManagerCollector(manager, device))
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
