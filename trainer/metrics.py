"""Metrics out of a training run: JSON lines, CSV tables and a progress bar."""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

STEP_COLUMNS = ("epoch", "step", "batch_loss", "data_loss", "penalty", "accuracy", "learning_rate", "images_per_second", "data_wait_fraction")
EPOCH_COLUMNS = (
    "epoch", "step", "train_data_loss", "train_penalty", "train_accuracy", "val_loss", "val_accuracy",
    "images", "images_per_second", "data_wait_fraction", "seconds", "val_seconds",
    "val_miou",  # segmentation only (empty otherwise)
)


class MetricsLog:
    """Appends records to metrics.jsonl (all), steps.csv and epochs.csv under `folder`.
    Appending keeps a resumed run's earlier records."""

    def __init__(self, folder: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self.folder = folder
        if enabled:
            folder.mkdir(parents=True, exist_ok=True)

    def _append_csv(self, name: str, columns: tuple[str, ...], record: dict[str, Any]) -> None:
        path = self.folder / name
        new = not path.exists()
        with open(path, "a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(record)

    def write(self, kind: str, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.folder / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"kind": kind, "time": time.time(), **record}) + "\n")
        if kind == "step":
            self._append_csv("steps.csv", STEP_COLUMNS, record)
        elif kind == "epoch":
            self._append_csv("epochs.csv", EPOCH_COLUMNS, record)


class TrainerGauges:
    """A Prometheus /metrics endpoint of the trainer (data-wait fraction, images/s, loss,
    accuracy, epoch, step), updated with every step record; its own registry."""

    NAMES = {
        "data_wait_fraction": "Fraction of step time spent waiting for batches from augserve",
        "images_per_second": "Training images per second in the current epoch",
        "data_loss": "Mean data loss in the current epoch",
        "accuracy": "Training accuracy in the current epoch",
        "epoch": "Current epoch",
        "step": "Optimizer steps taken",
    }

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        self.registry = CollectorRegistry()
        self.gauges = {name: Gauge(f"augserve_trainer_{name}", text, registry=self.registry) for name, text in self.NAMES.items()}
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = self._server.server_port

    def update(self, record: dict[str, Any]) -> None:
        for name, gauge in self.gauges.items():
            if name in record:
                gauge.set(record[name])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class Progress:
    """A tqdm bar per epoch on a terminal; nothing at all elsewhere (a pipe, a log file) or when
    disabled (`run.progress: false`): the log lines carry the numbers."""

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled and self.stream.isatty()
        self._bar: tqdm | None = None

    def update(self, epoch: int, epochs: int, done: int, total: int | None, text: str) -> None:
        """`done` batches of `total` (None: not known) in epoch `epoch` (0-based) of `epochs`."""
        if not self.enabled:
            return
        if self._bar is None:
            self._bar = tqdm(
                total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", file=self.stream,
                dynamic_ncols=True, mininterval=0.2,
            )
        self._bar.set_postfix_str(text, refresh=False)
        self._bar.update(done - self._bar.n)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
