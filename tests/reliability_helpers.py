"""What the reliability suite (tests/test_reliability_*.py) shares: the long-mode switch, process
gauges read from /proc, a control client that checks every pixel it receives, and the figures
the suite reports (docs/reliability.md).

Long mode: `AUGSERVE_LONG=1` runs the tests marked `long_only` and scales durations and example
counts up with `scaled(default, long)`. Figures: with `AUGSERVE_RELIABILITY_FIGURES=FILE` every
test merges what it counted (requests fuzzed, images tried, faults injected, gauges) into that
JSON file; without it they are only printed (`pytest -s` shows them).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from augserve.backends.opencv import OpenCVBackend
from augserve.client import Client
from augserve.backends.batch import SourceImage, augment_batch
from augserve.core.spec import AugmentSpec
from augserve.transport.ring import our_segments
from helpers import encode

LONG_MODE = os.environ.get("AUGSERVE_LONG") == "1"


def long_only(test):
    """Mark a test `slow` and run it only in long mode."""
    return pytest.mark.slow(pytest.mark.skipif(not LONG_MODE, reason="long mode only: set AUGSERVE_LONG=1")(test))

FIGURES_ENV = "AUGSERVE_RELIABILITY_FIGURES"
_figures_lock = threading.Lock()


def scaled(default: float, long: float) -> float:
    """`long` in long mode (AUGSERVE_LONG=1), else `default`."""
    return long if LONG_MODE else default


def record_figures(section: str, **values: object) -> None:
    """Merge `values` into `section` of the figures file (when one is named) and print them."""
    print(f"[reliability] {section}: {json.dumps(values, sort_keys=True, default=str)}")
    target = os.environ.get(FIGURES_ENV)
    if not target:
        return
    path = Path(target)
    with _figures_lock:
        figures = json.loads(path.read_text()) if path.exists() else {}
        figures["mode"] = "long" if LONG_MODE else "default"
        figures.setdefault(section, {}).update(json.loads(json.dumps(values, default=str)))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")


# ---- process gauges ----


@dataclass(frozen=True)
class Gauges:
    """One reading of a process: resident memory (bytes), open file descriptors, threads, and
    the augserve shared-memory segments it created in /dev/shm."""

    rss_bytes: int
    open_fds: int
    threads: int
    shm_segments: int

    def as_figures(self) -> dict[str, float]:
        return {**asdict(self), "rss_mib": round(self.rss_bytes / 2**20, 1)}


def read_gauges(pid: int) -> Gauges:
    """Read /proc/`pid` (Linux): VmRSS and Threads from status, entries of fd/."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return Gauges(
        rss_bytes=int(fields["VmRSS"][0]) * 1024,
        open_fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=int(fields["Threads"][0]),
        shm_segments=sum(1 for path in our_segments() if path.name.split("-")[2] == str(pid)),
    )


class GaugeSampler:
    """Reads a process's gauges every `interval` seconds in a thread; `peak` is the field-wise
    maximum of the readings."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.readings: list[Gauges] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), name="gauge-sampler", daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            self.readings.append(read_gauges(self.pid))
            self._stop.wait(interval)

    def stop(self) -> Gauges:
        self._stop.set()
        self._thread.join(5)
        return self.peak

    @property
    def peak(self) -> Gauges:
        return Gauges(*(max(getattr(reading, name) for reading in self.readings) for name in Gauges.__dataclass_fields__))


# ---- a control client ----


def write_png_dataset(root: Path, classes: int = 2, per_class: int = 6, size: int = 32, seed: int = 0) -> Path:
    """An ImageFolder tree of lossless PNG pictures: decoding gives the same pixels in every
    backend, so batches of pixel-copy specs can be compared byte for byte."""
    rng = np.random.default_rng(seed)
    for label in range(classes):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            noise = cv2.GaussianBlur(rng.normal(128, 60, (size, size, 3)), (0, 0), 1.0)
            (folder / f"{index:03d}.png").write_bytes(encode(np.clip(noise, 0, 255).astype(np.uint8)))
    return root


# Pixel copies only (flip, crop, erasing): both backends give identical bytes for these.
CONTROL_SPEC = AugmentSpec.from_dict({"ops": [{"flip": {"horizontal": 0.5, "vertical": 0.5}}, {"crop": {"size": 24}}]})
CONTROL_SEED = 77


class VerifyingControlClient:
    """Streams a dataset endlessly in a thread and checks every batch byte for byte against
    `augment_batch` run in this process (tests/test_server_faults.py's ControlClient checks
    shapes only, on a shared dataset name; this one gets its own dataset name so that no
    fuzzed or hostile session can join its group).

    `dataset_root` must be the served folder (an ImageFolder tree of PNG files, see
    `write_png_dataset`) and `dataset` the name it is served under (its whole split is "all")."""

    def __init__(self, address: str, dataset: str, dataset_root: Path, transport: str = "inband") -> None:
        self.address = address
        self.dataset = dataset
        self.paths = sorted(dataset_root.glob("*/*.png"))
        self.backend = OpenCVBackend(threads=1)
        self.batches = 0
        self.mismatches = 0
        self.error: BaseException | None = None
        self._transport = transport
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="control-client", daemon=True)
        self._thread.start()

    def _expected(self, epoch: int, sample_ids: np.ndarray, labels: np.ndarray) -> bytes:
        sources = [
            SourceImage(int(sample_id), int(label), str(self.paths[sample_id]), self.paths[sample_id].read_bytes())
            for sample_id, label in zip(sample_ids, labels)
        ]
        return augment_batch(self.backend, CONTROL_SPEC, CONTROL_SEED, epoch, sources).images.tobytes()

    def _run(self) -> None:
        try:
            with Client(self.address, timeout=600) as client, client.stream(
                self.dataset, spec=CONTROL_SPEC, batch_size=4, epochs=0, seed=CONTROL_SEED, split="all",
                transport=self._transport, group_policy="alone",
            ) as stream:
                for batch in stream:
                    if batch.images.shape != (len(batch.sample_ids), 24, 24, 3) or batch.skipped:
                        self.mismatches += 1
                    elif batch.images.tobytes() != self._expected(batch.epoch, batch.sample_ids, batch.labels):
                        self.mismatches += 1
                    self.batches += 1
                    if self._stop.is_set():
                        return
                    time.sleep(0.01)  # a steady trickle, not a competitor for the CPU
        except BaseException as error:  # reported by check()
            self.error = error

    def check(self, since: int = 0, more: int = 3, timeout: float = 30.0) -> int:
        """Wait for `more` batches beyond `since`; assert no error and no mismatch so far."""
        deadline = time.monotonic() + timeout
        while self.batches < since + more and self.error is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.error is None, f"the control client failed: {self.error!r}"
        assert self.mismatches == 0, f"{self.mismatches} control batches differ from the in-process run"
        assert self.batches >= since + more, f"the control client stalled at {self.batches} batches"
        return self.batches

    def finish(self) -> int:
        self._stop.set()
        self._thread.join(30)
        self.backend.close()
        assert self.error is None, f"the control client failed: {self.error!r}"
        assert self.mismatches == 0
        return self.batches


def count_codes(codes: Counter) -> dict[str, int]:
    """A Counter of grpc.StatusCode (or strings) as plain {name: count}."""
    return {getattr(code, "name", str(code)): count for code, count in sorted(codes.items(), key=lambda item: str(item[0]))}
