"""Delivered images per second through augserve's transports: a real server on 127.0.0.1 to
clients over shared memory and in-band gRPC, against the rate the same backend produces in
process, side by side in one run.

    python benchmarks/bench_transport.py [--seconds S] [--json PATH] [--quick]

Ways, each for 1 and 2 concurrent consumers:
- in-process: `augment_batch` on an `OpenCVBackend` with every core, in a loop that reads the
  batch's files, checks each file's header once (a HeaderCache for the run) and writes into
  one reused output array, as a server producer does. Two consumers are two such loops on
  threads sharing the backend and the cache, as two producers share them in the server. No
  gRPC, no server: the rate the backend can produce.
- shared memory / in-band: one server (`create_server`, OpenCV backend, every core) in this
  process; each consumer is a client in its own process (multiprocessing, spawn), so a
  client's Python work never waits for the server's GIL. Two clients use different seeds, so
  the server runs them on two producers instead of grouping them onto one.

Every consumer touches what it receives: it reads one byte of every 64-byte cache line of the
batch and sums them, so all of the data crosses the memory bus, as a copy would, but nothing is
written. A batch counts when its touch is done.

Data: 512 JPEGs (quality 90, 256×256) cut from scikit-image's sample photos, in an ImageFolder
tree in a temporary folder. Spec: `random_resized_crop` to the output size, horizontal flip
(p=0.5), brightness ±0.2. Outputs [N, H, W, 3] uint8; MB = 10⁶ bytes of pixels delivered.

Timing. A cell is one (output size, batch size, consumers, way). Its `--seconds` are split
into ROUNDS rounds, taken in turn with the other two ways of its row (the order reversed every
other round). A round opens fresh streams, lets every consumer take WARMUP_BATCHES batches and
WARMUP_SECONDS, then opens one common window; each consumer's rate is the images of its
batches after the first one finished in the window, over the time from that first to its last
batch finished in the window (a consumer with fewer than MIN_COUNTED_BATCHES after the first
goes on past the window until it has them). A cell's rate is the mean over rounds of the
consumers' summed rates. The machine may be shared: before each round the run waits, within a
budget, until other users of the machine are quiet (QuietGate). The machinery (consumers,
rounds, CPU accounting, the quiet gate, the data set) is in common.py, shared with bench_groups.

CPU accounting over each window: this process (the server, or the in-process loops) by thread
role from /proc/self/task, the client processes by `time.process_time`, and the whole
machine from /proc/stat. "Other load" is the machine's busy time less this run's own: work of
other users of the machine during the window, which the numbers of that cell suffered.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

# common sits beside this file: `python benchmarks/bench_transport.py` puts this folder on
# sys.path, and spawned client processes inherit it.
from common import (
    DATASET_NAME,
    JPEG_QUALITY,
    ClientPool,
    ProcessConsumer,
    QuietGate,
    Round,
    RoundsSummary,
    StreamJob,
    ThreadConsumer,
    WindowRun,
    announce,
    check_range,
    in_process_batches,
    make_dataset,
    measure_row,
    run_round,
    spec_dict,
    start_server,
    window_arguments,
)

from augserve.backends.opencv import OpenCVBackend
from augserve.data.datasets import Manifest, load_manifest
from augserve.core.images import HeaderCache
from augserve.rpc.server import AugserveServer
from augserve.streaming.limits import Limits
from augserve.core.spec import AugmentSpec

# (output side in pixels, images per batch), in the order they are measured.
SHAPES = ((224, 64), (224, 256), (64, 256), (64, 64))
QUICK_SHAPES = ((224, 64), (64, 256))
CONSUMER_COUNTS = (1, 2)
IN_PROCESS = "in-process"
SHARED_MEMORY = "shared_memory"
INBAND = "inband"
WAYS = (IN_PROCESS, SHARED_MEMORY, INBAND)
# Share of the in-process rate each transport should deliver.
TARGETS = {SHARED_MEMORY: 0.95, INBAND: 0.70}
ROUNDS = 2
QUIET_BUDGET_SECONDS = 60.0
DATASET_IMAGES = 512  # a multiple of every batch size: no short batch at an epoch's end
SOURCE_SIDE = 256
SEED = 1000  # consumer k of round r streams with seed SEED + 10 * r + k
VERSIONED_PACKAGES = (
    "augserve",
    "numpy",
    "opencv-python-headless",
    "grpcio",
    "protobuf",
    "scikit-image",
)


@dataclass(frozen=True)
class BenchConfig:
    """What one run measures: `seconds` per cell (split into `rounds`) for each of `shapes`
    ((output side, batch size)) and each of CONSUMER_COUNTS."""

    seconds: float = 4.0
    shapes: tuple[tuple[int, int], ...] = SHAPES
    rounds: int = ROUNDS
    quiet_budget_seconds: float = QUIET_BUDGET_SECONDS
    json_path: str | None = None

    def __post_init__(self) -> None:
        check_range("seconds", self.seconds, 0.2, 600)
        check_range("rounds", self.rounds, 1, 20)
        if not self.shapes:
            raise ValueError("shapes: expected at least one (side, batch size)")


# --- one cell --------------------------------------------------------------------------------


@dataclass
class Cell(RoundsSummary):
    """One (output side, batch size, consumers, way): `images_per_second` is the mean of its
    rounds' rates; `megabytes_per_second` the pixels those images hold."""

    side: int
    batch_size: int
    consumers: int
    way: str
    rounds: list[Round] = field(default_factory=list)

    @property
    def megabytes_per_second(self) -> float:
        return self.images_per_second * self.side * self.side * 3 / 1e6

    def _images_in_windows(self) -> float:
        return sum(item.images_per_second * item.cpu.seconds for item in self.rounds)

    @property
    def process_ms_per_image(self) -> float:
        """This process's CPU (server, or in-process loops) per delivered image."""
        return (
            1e3 * sum(item.cpu.process_seconds for item in self.rounds) / self._images_in_windows()
        )

    @property
    def client_ms_per_image(self) -> float | None:
        return None if self.way == IN_PROCESS else self.consumer_ms_per_image

    def role_ms_per_image(self) -> dict[str, float]:
        images = self._images_in_windows()
        return {role: 1e3 * seconds / images for role, seconds in self.role_seconds().items()}

    def to_json(self) -> dict:
        return {
            "side": self.side,
            "batch_size": self.batch_size,
            "consumers": self.consumers,
            "way": self.way,
            "images_per_second": self.images_per_second,
            "megabytes_per_second": self.megabytes_per_second,
            "process_cpu_ms_per_image": self.process_ms_per_image,
            "client_cpu_ms_per_image": self.client_ms_per_image,
            "process_cpu_ms_per_image_by_thread": self.role_ms_per_image(),
            "other_load_cores": self.other_cores,
            "steal_cores": self.steal_cores,
            "rounds": [item.to_json() for item in self.rounds],
        }


class Bench:
    """The server, the in-process backend and the client processes of one run."""

    def __init__(self, dataset_path: Path, manifest: Manifest, clients: ClientPool) -> None:
        self.manifest = manifest
        self.clients = clients
        self.backend = OpenCVBackend(os.cpu_count() or 1)
        # One for the run, as the server's producers share theirs.
        self.headers = HeaderCache()
        self.server: AugserveServer = start_server(dataset_path)

    def close(self) -> None:
        self.server.stop(grace=2.0)
        self.backend.close()

    def measure(
        self, side: int, batch_size: int, consumers: int, seconds: float, way: str, round_index: int
    ) -> Round:
        seeds = [SEED + 10 * round_index + index for index in range(consumers)]
        if way == IN_PROCESS:
            spec = AugmentSpec.from_dict(spec_dict(side))
            handles = [
                ThreadConsumer(
                    in_process_batches(
                        self.backend, self.manifest, spec, batch_size, seed, self.headers
                    ),
                    f"bench-loop-{index}",
                )
                for index, seed in enumerate(seeds)
            ]
        else:
            # Different seeds: the server runs the clients on producers of their own.
            handles = [
                ProcessConsumer(
                    self.clients.connections[index],
                    StreamJob(
                        self.server.address, DATASET_NAME, spec_dict(side), batch_size, seed, way
                    ),
                )
                for index, seed in enumerate(seeds)
            ]
        return run_round(handles, seconds)


def run_benchmark(config: BenchConfig, bench: Bench, gate: QuietGate) -> list[Cell]:
    """Every cell; within a row (shape, consumers) the ways take turns round by round."""
    cells: list[Cell] = []
    round_seconds = config.seconds / config.rounds
    for side, batch_size in config.shapes:
        for consumers in CONSUMER_COUNTS:
            measure = partial(bench.measure, side, batch_size, consumers, round_seconds)
            measured = measure_row(WAYS, config.rounds, gate, measure)
            for way in WAYS:
                cell = Cell(side, batch_size, consumers, way, measured[way])
                print(
                    f"  {side}×{side} batch {batch_size:3d}, {consumers} consumer(s), {way:13} "
                    f"{cell.images_per_second:7.0f} images/s (rounds: {cell.rounds_text()}; "
                    f"other load {cell.other_cores:.2f} cores, steal {cell.steal_cores:.2f})",
                    file=sys.stderr,
                    flush=True,
                )
                cells.append(cell)
    return cells


# --- reporting -------------------------------------------------------------------------------


def _ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.0%}" if baseline else "n/a"


def markdown_tables(cells: Sequence[Cell]) -> str:
    """Rates per row (shape × consumers) and way with ratios to in-process; then CPU."""
    lookup = {(c.side, c.batch_size, c.consumers, c.way): c for c in cells}
    rows = sorted(
        {(c.side, c.batch_size, c.consumers) for c in cells}, key=lambda r: (-r[0], r[1], r[2])
    )
    rates = [
        (
            "| output | batch | clients | in-process img/s | MB/s | shared memory img/s | MB/s "
            "| shm / in-process | in-band img/s | MB/s | in-band / in-process |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cpu = [
        (
            "| output | batch | clients | in-process | shm: server | shm: client "
            "| in-band: server | in-band: server rpc threads | in-band: client "
            "| other load, cores (in-process, shm, in-band) |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for side, batch_size, consumers in rows:
        local, shared, inband = (lookup[(side, batch_size, consumers, way)] for way in WAYS)
        base = local.images_per_second
        rates.append(
            f"| {side}×{side} | {batch_size} | {consumers} "
            f"| {base:,.0f} | {local.megabytes_per_second:,.0f} "
            f"| {shared.images_per_second:,.0f} | {shared.megabytes_per_second:,.0f} "
            f"| {_ratio(shared.images_per_second, base)} "
            f"| {inband.images_per_second:,.0f} | {inband.megabytes_per_second:,.0f} "
            f"| {_ratio(inband.images_per_second, base)} |"
        )
        rpc_ms = inband.role_ms_per_image().get("augserve-rpc", 0.0)
        other = ", ".join(f"{c.other_cores:.2f}" for c in (local, shared, inband))
        cpu.append(
            f"| {side}×{side} | {batch_size} | {consumers} "
            f"| {local.process_ms_per_image:.3f} | {shared.process_ms_per_image:.3f} "
            f"| {shared.client_ms_per_image:.3f} | {inband.process_ms_per_image:.3f} "
            f"| {rpc_ms:.3f} | {inband.client_ms_per_image:.3f} | {other} |"
        )
    return (
        "Delivered images/s and MB/s (10⁶ bytes of pixels), sum over clients:\n\n"
        + "\n".join(rates)
        + "\n\nCPU ms per delivered image (server: this whole process; other load: cores busy "
        "with work not of this run, mean over rounds):\n\n" + "\n".join(cpu)
    )


def target_summary(cells: Sequence[Cell]) -> list[str]:
    lookup = {(c.side, c.batch_size, c.consumers, c.way): c.images_per_second for c in cells}
    lines = []
    for way, target in TARGETS.items():
        ratios = [
            lookup[(c.side, c.batch_size, c.consumers, way)] / c.images_per_second
            for c in cells
            if c.way == IN_PROCESS and c.images_per_second
        ]
        met = sum(ratio >= target for ratio in ratios)
        lines.append(
            f"Target {way} ≥ {target:.0%} of in-process: {min(ratios):.0%} to {max(ratios):.0%}, "
            f"met in {met} of {len(ratios)} rows."
        )
    return lines


def parse_args(argv: Sequence[str] | None = None) -> BenchConfig:
    args = window_arguments(argv, __doc__.split("\n\n")[0], 4.0, 1.0, f"shapes {QUICK_SHAPES}")
    if args.quick:
        return BenchConfig(args.seconds, QUICK_SHAPES, 1, 10.0, args.json_path)
    return BenchConfig(args.seconds, SHAPES, ROUNDS, QUIET_BUDGET_SECONDS, args.json_path)


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_args(argv)
    run = WindowRun(
        VERSIONED_PACKAGES,
        max(CONSUMER_COUNTS),
        "bench-client",
        "augserve-bench-",
        config.quiet_budget_seconds,
    )
    with run:
        dataset_path = make_dataset(run.folder, DATASET_IMAGES, (SOURCE_SIDE, SOURCE_SIDE))
        manifest = load_manifest(dataset_path)
        announce(
            len(config.shapes) * len(CONSUMER_COUNTS) * len(WAYS), config.seconds, config.rounds
        )
        bench = Bench(dataset_path, manifest, run.clients)
        try:
            cells = run_benchmark(config, bench, run.gate)
        finally:
            bench.close()

    details = {
        "dataset": {
            "images": DATASET_IMAGES,
            "side": SOURCE_SIDE,
            "jpeg_quality": JPEG_QUALITY,
        },
        "specs": {side: spec_dict(side) for side in sorted({side for side, _ in config.shapes})},
        "targets": TARGETS,
    }
    run.publish(
        config,
        (
            f"Data: {DATASET_IMAGES} JPEGs {SOURCE_SIDE}×{SOURCE_SIDE} q{JPEG_QUALITY}; spec: "
            "random_resized_crop + flip + brightness; server: OpenCV backend, "
            f"{os.cpu_count()} threads, prefetch {Limits().default_prefetch}; "
            "clients: one process each (spawn)."
        ),
        markdown_tables(cells),
        target_summary(cells),
        details,
        [cell.to_json() for cell in cells],
    )


if __name__ == "__main__":
    main()
