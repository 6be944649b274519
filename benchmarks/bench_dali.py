"""Images per second of augserve's DALI backend on the CPU (DALI with `device_id=None`): one
batch at a time, as the backend used to run, against overlapped (read-ahead, DALI's own
prefetch, concurrent pipelines), as DALI's raw pipeline and as a real server delivers it over
shared memory, side by side in one run.

    python benchmarks/bench_dali.py [--seconds S] [--rounds R] [--json PATH] [--quick]

Ways (rows), each measured in rounds taken in turn with the others (order reversed every other
round), after the quiet gate:
- raw, one at a time: `DaliBackend(prefetch_depth=1, pipelines_per_shape=1)` called in a loop
  on one thread with bytes and plans made before the round (no files, headers or plans in the
  window): DALI's own rate, one batch at a time.
- raw, overlapped: the default `DaliBackend` with 3 batches kept in flight by 3 threads (as a
  producer with read-ahead 2 does), bytes and plans made before the round.
- server, one at a time: a real server whose backend is `DaliBackend(prefetch_depth=1,
  pipelines_per_shape=1, read_ahead_batches=0, concurrent_batches=1)`: its producer reads a
  batch's files, checks headers, draws plans, runs DALI, then reads the next (the backend's
  behaviour before read-ahead).
- server, overlapped: a real server with the default `DaliBackend`.
Both servers run for the whole run; one client process (spawned) reads one stream over shared
memory and touches every cache line of every batch. "DALI busy" is the share of each window in
which the way's backend had a batch in DALI (`cache_stats().busy_seconds`): what one batch at a
time leaves idle is what overlap can win back, whatever else the machine runs.

Data: 512 JPEGs (quality 90, 256×256) cut from scikit-image's sample photos; spec: rotate ±20°,
shift ±0.1, horizontal flip, random_resized_crop to 224×224, brightness/contrast/saturation
±0.2 (bench_backends' spec); batch 32; DALI threads per pipeline: `os.cpu_count()`.
Targets: server overlapped ≥ 1.5× server one at a time; and what the server delivers against
DALI's raw rate in the same configuration.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# bench_backends' spec, so that its DALI-CPU figure (about 556 images/s at 256×256 on 2 threads)
# compares with these.
from bench_backends import SPEC
from common import (
    DATASET_NAME,
    JPEG_QUALITY,
    ProcessConsumer,
    QuietGate,
    Round,
    RoundsSummary,
    StreamJob,
    ThreadConsumer,
    WindowRun,
    announce,
    make_dataset,
    measure_row,
    run_round,
    window_arguments,
)

from augserve.backends.dali import DaliBackend
from augserve.core.images import inspect_image
from augserve.core.plan import SamplePlan, make_plan
from augserve.core.spec import AugmentSpec
from augserve.data.datasets import load_manifest
from augserve.rpc.server import AugserveServer, DatasetConfig, ServerConfig, create_server

DATASET_IMAGES = 512
SIDE = 256
BATCH_SIZE = 32
RAW_BATCHES = 8  # distinct batches (bytes and plans) the raw rows cycle through
RAW_IN_FLIGHT = 3  # batches the overlapped raw row keeps in flight (a producer's read-ahead 2)
ROUNDS = 3
QUIET_BUDGET_SECONDS = 60.0
TARGET_RATIO = 1.5
VERSIONED_PACKAGES = ("augserve", "numpy", "nvidia-dali-cuda120", "nvidia-dali-cuda130", "grpcio")

RAW_SERIAL = "raw pipeline, one batch at a time"
RAW_OVERLAPPED = "raw pipeline, overlapped"
SERVER_SERIAL = "server over shared memory, one batch at a time"
SERVER_OVERLAPPED = "server over shared memory, overlapped"
WAYS = (RAW_SERIAL, RAW_OVERLAPPED, SERVER_SERIAL, SERVER_OVERLAPPED)


def serial_backend(threads: int) -> DaliBackend:
    """The backend as it ran before read-ahead: one pipeline per shape without prefetch, one
    batch at a time across the server."""
    return DaliBackend(
        None,
        threads,
        prefetch_depth=1,
        pipelines_per_shape=1,
        read_ahead_batches=0,
        concurrent_batches=1,
    )


@dataclass(frozen=True)
class BenchConfig:
    seconds: float = 6.0
    rounds: int = ROUNDS
    quiet_budget_seconds: float = QUIET_BUDGET_SECONDS
    json_path: str | None = None


@dataclass(frozen=True)
class DaliBusy:
    """A backend's `busy_seconds` (time with a batch in DALI) at a moment, or over a window."""

    seconds: float
    busy_seconds: float

    def __sub__(self, other: DaliBusy) -> DaliBusy:
        return DaliBusy(self.seconds - other.seconds, self.busy_seconds - other.busy_seconds)


def busy_reader(backend: DaliBackend):
    return lambda: DaliBusy(time.monotonic(), backend.cache_stats().busy_seconds)


@dataclass
class Cell(RoundsSummary):
    way: str
    rounds: list[Round] = field(default_factory=list)

    @property
    def busy_fraction(self) -> float:
        """The share of the windows in which DALI had a batch (1.0: never idle)."""
        readings = [item.counters for item in self.rounds if item.counters is not None]
        return sum(r.busy_seconds for r in readings) / max(sum(r.seconds for r in readings), 1e-9)

    def to_json(self) -> dict:
        return {
            "way": self.way,
            "images_per_second": self.images_per_second,
            "dali_busy_fraction": self.busy_fraction,
            "other_cores": self.other_cores,
            "rounds": [item.to_json() for item in self.rounds],
        }


@dataclass(frozen=True)
class RawBatch:
    encoded: list[bytes]
    plans: list[SamplePlan]


def raw_batches_of(dataset_path: Path, spec: AugmentSpec) -> list[RawBatch]:
    """RAW_BATCHES batches of the data set's first files, with their epoch-0 plans."""
    manifest = load_manifest(dataset_path, use_cache=False)
    made = []
    for index in range(RAW_BATCHES):
        encoded, plans = [], []
        for sample_id in range(index * BATCH_SIZE, (index + 1) * BATCH_SIZE):
            data = Path(manifest.path(sample_id)).read_bytes()
            header = inspect_image(data, manifest.paths[sample_id], 40_000_000)
            encoded.append(data)
            plans.append(
                make_plan(spec, 0, 0, sample_id, (header.height, header.width), header.orientation)
            )
        made.append(RawBatch(encoded, plans))
    return made


def raw_serial(backend: DaliBackend, batches: list[RawBatch]) -> Iterator[np.ndarray]:
    out = np.empty((BATCH_SIZE, 224, 224, 3), np.uint8)
    index = 0
    while True:
        batch = batches[index % len(batches)]
        yield backend.augment(batch.encoded, batch.plans, out).images
        index += 1


def raw_overlapped(
    backend: DaliBackend, batches: list[RawBatch], pool: ThreadPoolExecutor
) -> Iterator[np.ndarray]:
    """RAW_IN_FLIGHT batches in flight, each into an array of its own, yielded in order."""
    outs = [np.empty((BATCH_SIZE, 224, 224, 3), np.uint8) for _ in range(RAW_IN_FLIGHT + 1)]
    submitted = []
    index = 0

    def submit() -> None:
        nonlocal index
        batch = batches[index % len(batches)]
        submitted.append(
            pool.submit(backend.augment, batch.encoded, batch.plans, outs[index % len(outs)])
        )
        index += 1

    try:
        for _ in range(RAW_IN_FLIGHT):
            submit()
        while True:
            images = submitted.pop(0).result().images
            submit()  # its array is not the one yielded: there is one more array than in flight
            yield images
    finally:
        for future in submitted:
            future.result()


class Bench:
    """Both servers, the raw backends and the client process of one run."""

    def __init__(self, dataset_path: Path, run: WindowRun) -> None:
        self.threads = os.cpu_count() or 1
        self.connection = run.clients.connections[0]
        self.spec = AugmentSpec.from_dict(SPEC)
        self.raw = raw_batches_of(dataset_path, self.spec)
        self.raw_backends = {
            RAW_SERIAL: serial_backend(self.threads),
            RAW_OVERLAPPED: DaliBackend(None, self.threads),
        }
        self.pool = ThreadPoolExecutor(RAW_IN_FLIGHT, thread_name_prefix="bench-raw")
        datasets = {DATASET_NAME: DatasetConfig(str(dataset_path))}
        self.servers: dict[str, AugserveServer] = {}
        for way, backend in (
            (SERVER_SERIAL, serial_backend(self.threads)),
            (SERVER_OVERLAPPED, DaliBackend(None, self.threads)),
        ):
            config = ServerConfig(
                host="127.0.0.1",
                port=0,
                backend="dali-cpu",
                threads=self.threads,
                datasets=datasets,
            )
            self.servers[way] = create_server(config, backend)

    def measure(self, way: str, round_index: int, seconds: float) -> Round:
        if way in self.raw_backends:
            backend = self.raw_backends[way]
            batches = (
                raw_serial(backend, self.raw)
                if way == RAW_SERIAL
                else raw_overlapped(backend, self.raw, self.pool)
            )
            consumer = ThreadConsumer(batches, "bench-raw-consumer")
            return run_round([consumer], seconds, busy_reader(backend))
        server = self.servers[way]
        job = StreamJob(
            server.address, DATASET_NAME, SPEC, BATCH_SIZE, 100 + round_index, "shared_memory"
        )
        return run_round(
            [ProcessConsumer(self.connection, job)], seconds, busy_reader(server.backend)
        )

    def cache_stats(self) -> dict[str, dict]:
        from dataclasses import asdict

        stats = {way: asdict(backend.cache_stats()) for way, backend in self.raw_backends.items()}
        stats.update(
            {way: asdict(server.backend.cache_stats()) for way, server in self.servers.items()}
        )
        return stats

    def close(self) -> None:
        for server in self.servers.values():
            server.stop(grace=2.0)
        for backend in self.raw_backends.values():
            backend.close()
        self.pool.shutdown(wait=True)


def run_benchmark(config: BenchConfig, bench: Bench, gate: QuietGate) -> list[Cell]:
    seconds_per_round = config.seconds / config.rounds
    measured = measure_row(
        WAYS, config.rounds, gate, lambda way, index: bench.measure(way, index, seconds_per_round)
    )
    cells = [Cell(way, measured[way]) for way in WAYS]
    for cell in cells:
        print(
            f"  {cell.way}: {cell.images_per_second:,.0f} images/s (rounds {cell.rounds_text()})",
            flush=True,
        )
    return cells


def ratio_text(numerator: Cell, denominator: Cell) -> str:
    rounds = [
        a.images_per_second / b.images_per_second
        for a, b in zip(numerator.rounds, denominator.rounds)
    ]
    return f"{numerator.images_per_second / denominator.images_per_second:.2f}× (rounds {', '.join(f'{r:.2f}' for r in rounds)})"


def markdown_table(cells: Sequence[Cell]) -> str:
    by_way = {cell.way: cell for cell in cells}
    lines = [
        "| way | images/s | rounds | DALI busy | CPU ms per image (this process) | other load, cores |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for cell in cells:
        cpu = sum(item.cpu.process_seconds for item in cell.rounds)
        images = sum(consumer.images for item in cell.rounds for consumer in item.consumers)
        lines.append(
            f"| {cell.way} | {cell.images_per_second:,.0f} | {cell.rounds_text()} | "
            f"{cell.busy_fraction:.0%} | {1e3 * cpu / max(images, 1):.2f} | {cell.other_cores:.2f} |"
        )
    lines += [
        "",
        "| ratio | value |",
        "|---|---|",
        f"| server overlapped / server one at a time | {ratio_text(by_way[SERVER_OVERLAPPED], by_way[SERVER_SERIAL])} |",
        f"| raw overlapped / raw one at a time | {ratio_text(by_way[RAW_OVERLAPPED], by_way[RAW_SERIAL])} |",
        f"| server / raw, one at a time | {ratio_text(by_way[SERVER_SERIAL], by_way[RAW_SERIAL])} |",
        f"| server / raw, overlapped | {ratio_text(by_way[SERVER_OVERLAPPED], by_way[RAW_OVERLAPPED])} |",
    ]
    return "\n".join(lines)


def target_lines(cells: Sequence[Cell]) -> list[str]:
    by_way = {cell.way: cell for cell in cells}
    ratio = by_way[SERVER_OVERLAPPED].images_per_second / by_way[SERVER_SERIAL].images_per_second
    verdict = "met" if ratio >= TARGET_RATIO else "not met"
    busy = by_way[SERVER_SERIAL].busy_fraction
    return [
        f"Server over shared memory, overlapped against one batch at a time: {ratio:.2f}× "
        f"(target ≥ {TARGET_RATIO}×: {verdict}).",
        f"One batch at a time, the server kept DALI busy {busy:.0%} of the time: overlap can win "
        f"back at most {1 / max(busy, 1e-9):.2f}× where DALI's own work is the limit; overlapped it "
        f"was busy {by_way[SERVER_OVERLAPPED].busy_fraction:.0%}.",
    ]


def parse_args(argv: Sequence[str] | None = None) -> BenchConfig:
    def add_rounds(parser) -> None:
        parser.add_argument(
            "--rounds", type=int, default=ROUNDS, help=f"rounds per cell (default {ROUNDS})"
        )

    args = window_arguments(argv, __doc__.split("\n\n")[0], 12.0, 2.0, "every way", add_rounds)
    if args.quick:
        return BenchConfig(args.seconds, 1, 5.0, args.json_path)
    return BenchConfig(
        args.seconds, args.rounds, QUIET_BUDGET_SECONDS * args.rounds / ROUNDS, args.json_path
    )


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_args(argv)
    run = WindowRun(
        VERSIONED_PACKAGES,
        1,
        "bench-dali-client",
        "augserve-bench-dali-",
        config.quiet_budget_seconds,
    )
    with run:
        dataset_path = make_dataset(run.folder, DATASET_IMAGES, (SIDE, SIDE))
        announce(len(WAYS), config.seconds, config.rounds)
        bench = Bench(dataset_path, run)
        started = time.monotonic()
        try:
            cells = run_benchmark(config, bench, run.gate)
            stats = bench.cache_stats()
        finally:
            bench.close()
        measuring_seconds = time.monotonic() - started
    details = {
        "dataset": {"images": DATASET_IMAGES, "side": SIDE, "jpeg_quality": JPEG_QUALITY},
        "batch_size": BATCH_SIZE,
        "spec": SPEC,
        "dali_threads_per_pipeline": os.cpu_count(),
        "raw_in_flight": RAW_IN_FLIGHT,
        "measuring_seconds": measuring_seconds,
        "pipeline_cache": stats,
        "target": {"server_overlapped_over_serial": TARGET_RATIO},
    }
    run.publish(
        config,
        (
            f"Data: {DATASET_IMAGES} JPEGs q{JPEG_QUALITY}, {SIDE}×{SIDE}; spec: rotate, shift, flip, "
            f"random_resized_crop 224, brightness/contrast/saturation; batch {BATCH_SIZE}; DALI on the "
            f"CPU, {os.cpu_count()} threads per pipeline; servers: shared memory, one client process."
        ),
        markdown_table(cells),
        target_lines(cells),
        details,
        [cell.to_json() for cell in cells],
    )


if __name__ == "__main__":
    main()
