"""Server totals since start, read by GetServerInfo and the metrics endpoint."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace

PRODUCTION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class CounterValues:
    batches_produced: int = 0
    batches_delivered: int = 0
    images_delivered: int = 0
    images_skipped: int = 0
    sessions_opened: int = 0
    detached: int = 0
    rejoined: int = 0  # detached sessions that went back to their group
    pauses: int = 0  # pauses announced by members (validation, checkpoints)
    images_decoded: int = 0  # decodes the backend ran
    decode_shared: int = 0  # images taken from another producer's decode of the same batch
    decode_cached: int = 0  # images taken from the decoded-image cache
    # Seconds from a producer's turn at the backend to its batch being ready, as a histogram.
    production_bucket_counts: list[int] = field(default_factory=lambda: [0] * (len(PRODUCTION_BUCKETS) + 1))
    production_seconds_sum: float = 0.0


class Counters:
    """Thread-safe totals; attributes read the current values (e.g. `counters.batches_produced`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = CounterValues()

    def __getattr__(self, name: str) -> object:
        if name.startswith("_"):
            raise AttributeError(name)
        with self._lock:
            return getattr(self._values, name)

    def add(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self._values, name, getattr(self._values, name) + amount)

    def observe_production(self, seconds: float) -> None:
        index = next((i for i, bound in enumerate(PRODUCTION_BUCKETS) if seconds <= bound), len(PRODUCTION_BUCKETS))
        with self._lock:
            self._values.batches_produced += 1
            self._values.production_bucket_counts[index] += 1
            self._values.production_seconds_sum += seconds

    def snapshot(self) -> CounterValues:
        with self._lock:
            values = replace(self._values)
            values.production_bucket_counts = list(self._values.production_bucket_counts)
            return values



