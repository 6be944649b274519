"""One producer for many identical experiments: delivered images/s per experiment and CPU per
delivered image when 1, 2 and 4 experiments read the same stream from one shared group, from
as many independent server streams, or from loaders of their own, side by side in one run.

    python benchmarks/bench_groups.py [--seconds S] [--json PATH] [--quick]

Ways, each for EXPERIMENT_COUNTS experiments (one experiment = one consumer process):
- shared group: one server (`create_server`, OpenCV backend, every core) in this process; each
  experiment is a client process streaming the same stream (dataset, spec, seed, batch size)
  over shared memory with `group_size` = the number of experiments, so the group waits for all
  of them and one producer makes every batch once for all members (lockstep: the group moves at
  the pace of its slowest member). Every client checks the server called its stream shared.
- independent streams: the same clients, the same stream, the same seed, but
  `group_policy="alone"`: the server runs one producer per client, each making the very same
  batches. Every client checks its stream was not shared.
- own loaders: no server; each experiment's process runs the classic loop of an experiment
  that augments its own data, `augment_batch` on an `OpenCVBackend` of its own with every core,
  reading the batch's files, checking each file's header once and writing into one reused
  output array (common's `in_process_batches`, as in bench_transport's in-process way).
  Processes, not threads: separate experiments are separate processes, and a process's CPU is
  its own.

Every consumer touches what it receives (one byte of every 64-byte cache line, summed), as in
bench_transport; a batch counts when its touch is done. Consumers take batches as fast as they
can.

Data: DATASET_IMAGES JPEGs (quality 90) of random width and height in [MIN_SIDE, MAX_SIDE]
pixels, cut from scikit-image's sample photos. Spec: `random_resized_crop` to the output size,
horizontal flip (p=0.5), brightness ±0.2. Outputs [N, H, W, 3] uint8, batch BATCH_SIZE.

Timing (common.py's machinery, shared with bench_transport): a cell is one (output size,
experiments, way); its `--seconds` are split into rounds taken in turn with the other ways of
its row (order reversed every other round), each round waiting first for a quiet machine. A
round opens fresh streams (seed SEED + 100 * round + 10 * way), lets every consumer warm up,
then opens one common window. A consumer's rate is the images of its batches after its first
finished in the window over the time from that one to its last; per experiment is the mean
over consumers, aggregate the sum; a cell's numbers are means over rounds.

CPU per delivered image, over each window: the server is this whole process (/proc/self/task,
by thread role in the JSON) over the images the server counted as delivered in that window;
clients and own loaders are their processes' `time.process_time` over the images they took.
The server's counters (batches produced and delivered) are read at the window's edges: in a
shared group of N, delivered / produced is N.
"""

from __future__ import annotations

import os
import sys

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

# common sits beside this file: `python benchmarks/bench_groups.py` puts this folder on
# sys.path, and spawned experiment processes inherit it.
from common import (
    DATASET_NAME,
    JPEG_QUALITY,
    ClientPool,
    LoaderJob,
    ProcessConsumer,
    QuietGate,
    Round,
    RoundsSummary,
    ServerCounters,
    StreamJob,
    WindowRun,
    announce,
    check_range,
    make_dataset,
    measure_row,
    run_round,
    server_counters,
    spec_dict,
    start_server,
    window_arguments,
)

from augserve.rpc.server import AugserveServer
from augserve.streaming.limits import Limits

SIDES = (224, 64)  # output sides, in the order they are measured
QUICK_SIDES = (224,)
BATCH_SIZE = 64
EXPERIMENT_COUNTS = (1, 2, 4)
SHARED_GROUP = "shared group"
INDEPENDENT_STREAMS = "independent streams"
OWN_LOADERS = "own loaders"
WAYS = (SHARED_GROUP, INDEPENDENT_STREAMS, OWN_LOADERS)
SERVER_WAYS = (SHARED_GROUP, INDEPENDENT_STREAMS)
# At TARGET_EXPERIMENTS experiments, the shared group's aggregate rate over that of as many
# independent streams.
TARGET_EXPERIMENTS = 4
TARGET_RATIO = 3.5
ROUNDS = 2
QUIET_BUDGET_SECONDS = 40.0
DATASET_IMAGES = 512  # a multiple of BATCH_SIZE: no short batch at an epoch's end
MIN_SIDE = 256
MAX_SIDE = 500
TRANSPORT = "shared_memory"
SEED = 2000
# After a round, how long to wait for the server to close its sessions before the next one.
SESSION_CLOSE_SECONDS = 10.0
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
    """What one run measures: `seconds` per cell (split into `rounds`) for each of `sides`
    (output side in pixels) and each of EXPERIMENT_COUNTS."""

    seconds: float = 6.0
    sides: tuple[int, ...] = SIDES
    rounds: int = ROUNDS
    quiet_budget_seconds: float = QUIET_BUDGET_SECONDS
    json_path: str | None = None

    def __post_init__(self) -> None:
        check_range("seconds", self.seconds, 0.2, 600)
        check_range("rounds", self.rounds, 1, 20)
        if not self.sides:
            raise ValueError("sides: expected at least one output side")


# --- one cell --------------------------------------------------------------------------------


@dataclass
class Cell(RoundsSummary):
    """One (output side, experiments, way): rates are means over its rounds;
    `images_per_second` is summed over the experiments (the aggregate)."""

    side: int
    experiments: int
    way: str
    rounds: list[Round] = field(default_factory=list)

    @property
    def per_experiment(self) -> float:
        return self.images_per_second / self.experiments

    @property
    def slowest_experiment(self) -> float:
        """Mean over rounds of the slowest experiment's images/s."""
        return float(
            np.mean([min(c.images_per_second for c in item.consumers) for item in self.rounds])
        )

    def _counted(self, name: str) -> int:
        return sum(getattr(item.counters, name) for item in self.rounds)

    @property
    def batches_produced(self) -> int:
        return self._counted("batches_produced")

    @property
    def batches_delivered(self) -> int:
        return self._counted("batches_delivered")

    @property
    def server_ms_per_image(self) -> float | None:
        """The server process's CPU per image it delivered in the windows."""
        images = self._counted("images_delivered")
        if self.way not in SERVER_WAYS or not images:
            return None
        return 1e3 * sum(item.cpu.process_seconds for item in self.rounds) / images

    @property
    def total_ms_per_image(self) -> float:
        """Server and experiment processes together; `consumer_ms_per_image` is the
        experiments' part: client work for server ways (gRPC, slot release, touch), all of the
        augmentation for own loaders."""
        return (self.server_ms_per_image or 0.0) + self.consumer_ms_per_image

    def role_ms_per_image(self) -> dict[str, float]:
        """The server's CPU per delivered image by thread role."""
        images = self._counted("images_delivered")
        if not images:
            return {}
        return {role: 1e3 * seconds / images for role, seconds in self.role_seconds().items()}

    def to_json(self) -> dict:
        return {
            "side": self.side,
            "batch_size": BATCH_SIZE,
            "experiments": self.experiments,
            "way": self.way,
            "images_per_second_aggregate": self.images_per_second,
            "images_per_second_per_experiment": self.per_experiment,
            "images_per_second_slowest_experiment": self.slowest_experiment,
            "server_cpu_ms_per_delivered_image": self.server_ms_per_image,
            "experiment_cpu_ms_per_image": self.consumer_ms_per_image,
            "total_cpu_ms_per_image": self.total_ms_per_image,
            "server_cpu_ms_per_delivered_image_by_thread": self.role_ms_per_image(),
            "batches_produced_in_windows": self.batches_produced,
            "batches_delivered_in_windows": self.batches_delivered,
            "other_load_cores": self.other_cores,
            "steal_cores": self.steal_cores,
            "rounds": [item.to_json() for item in self.rounds],
        }


class Bench:
    """The server and the experiment processes of one run."""

    def __init__(self, dataset_path: Path, pool: ClientPool) -> None:
        self.dataset_path = dataset_path
        self.pool = pool
        self.server: AugserveServer = start_server(dataset_path)

    def close(self) -> None:
        self.server.stop(grace=2.0)

    def counters(self) -> ServerCounters:
        return server_counters(self.server)

    def wait_sessions_closed(self) -> None:
        """Let the last round's sessions and producers go before the next round opens."""
        manager = self.server.manager
        if not manager.wait_idle(SESSION_CLOSE_SECONDS):
            raise TimeoutError(
                f"{len(manager.sessions)} sessions and {len(manager.producers)} producers "
                f"still open {SESSION_CLOSE_SECONDS:g} s after a round"
            )

    def job(self, way: str, side: int, experiments: int, seed: int) -> StreamJob | LoaderJob:
        """What each of the experiments of one round runs."""
        if way == OWN_LOADERS:
            return LoaderJob(str(self.dataset_path), spec_dict(side), BATCH_SIZE, seed)
        return StreamJob(
            self.server.address,
            DATASET_NAME,
            spec_dict(side),
            BATCH_SIZE,
            seed,
            TRANSPORT,
            group_size=experiments if way == SHARED_GROUP else 0,
            group_policy="alone" if way == INDEPENDENT_STREAMS else "lockstep",
            expect_shared=way == SHARED_GROUP and experiments > 1,
        )

    def measure(
        self, side: int, experiments: int, seconds: float, way: str, round_index: int
    ) -> Round:
        # One seed per round and way: no stream of one round can meet another's producer.
        job = self.job(way, side, experiments, SEED + 100 * round_index + 10 * WAYS.index(way))
        handles = [
            ProcessConsumer(self.pool.connections[index], job) for index in range(experiments)
        ]
        measured = run_round(handles, seconds, self.counters)
        self.wait_sessions_closed()
        return measured


def run_benchmark(config: BenchConfig, bench: Bench, gate: QuietGate) -> list[Cell]:
    """Every cell; within a row (side, experiments) the ways take turns round by round."""
    cells: list[Cell] = []
    round_seconds = config.seconds / config.rounds
    for side in config.sides:
        for experiments in EXPERIMENT_COUNTS:
            measure = partial(bench.measure, side, experiments, round_seconds)
            measured = measure_row(WAYS, config.rounds, gate, measure)
            for way in WAYS:
                cell = Cell(side, experiments, way, measured[way])
                print(
                    f"  {side}×{side}, {experiments} experiment(s), {way:19} "
                    f"{cell.per_experiment:6.0f} images/s each, "
                    f"{cell.images_per_second:6.0f} in all "
                    f"(rounds: {cell.rounds_text()}; produced {cell.batches_produced}, delivered "
                    f"{cell.batches_delivered}; other load {cell.other_cores:.2f} cores)",
                    file=sys.stderr,
                    flush=True,
                )
                cells.append(cell)
    return cells


# --- reporting -------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown_tables(cells: Sequence[Cell]) -> str:
    """One table per output side: rates, CPU and counters per (experiments, way)."""
    baseline = {
        (c.side, c.way): c.images_per_second
        for c in cells
        if c.experiments == 1 and c.images_per_second
    }
    parts = []
    for side in dict.fromkeys(c.side for c in cells):
        lines = [
            f"{side}×{side} outputs, batch {BATCH_SIZE}:",
            "",
            (
                "| experiments | way | img/s per experiment | slowest | aggregate img/s "
                "| aggregate vs 1 experiment | server CPU ms / delivered img "
                "| experiment CPU ms / img | total CPU ms / img | batches produced "
                "| batches delivered | delivered / produced | other load, cores |"
            ),
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for cell in (c for c in cells if c.side == side):
            single = baseline.get((side, cell.way))
            scaling = f"{cell.images_per_second / single:.2f}×" if single else "n/a"
            server_way = cell.way in SERVER_WAYS
            produced = f"{cell.batches_produced:,}" if server_way else "n/a"
            delivered = f"{cell.batches_delivered:,}" if server_way else "n/a"
            sharing = (
                f"{cell.batches_delivered / cell.batches_produced:.2f}"
                if server_way and cell.batches_produced
                else "n/a"
            )
            lines.append(
                f"| {cell.experiments} | {cell.way} | {cell.per_experiment:,.0f} "
                f"| {cell.slowest_experiment:,.0f} | {cell.images_per_second:,.0f} | {scaling} "
                f"| {_ms(cell.server_ms_per_image)} | {cell.consumer_ms_per_image:.3f} "
                f"| {cell.total_ms_per_image:.3f} | {produced} | {delivered} | {sharing} "
                f"| {cell.other_cores:.2f} |"
            )
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def target_summary(cells: Sequence[Cell]) -> list[str]:
    """The shared group's aggregate over the independent ways' at TARGET_EXPERIMENTS, from the
    cells' means and round by round (round r of two ways ran back to back, so its ratio is the
    one least moved by other load that came and went)."""
    lookup = {(c.side, c.experiments, c.way): c for c in cells}
    lines = []
    for side in dict.fromkeys(c.side for c in cells):
        shared = lookup.get((side, TARGET_EXPERIMENTS, SHARED_GROUP))
        streams = lookup.get((side, TARGET_EXPERIMENTS, INDEPENDENT_STREAMS))
        loaders = lookup.get((side, TARGET_EXPERIMENTS, OWN_LOADERS))
        if shared is None or streams is None or not streams.images_per_second:
            continue
        ratio = shared.images_per_second / streams.images_per_second
        verdict = "met" if ratio >= TARGET_RATIO else "not met"
        by_round = ", ".join(
            f"{mine.images_per_second / theirs.images_per_second:.2f}×"
            for mine, theirs in zip(shared.rounds, streams.rounds, strict=True)
            if theirs.images_per_second
        )
        against_loaders = (
            f"; over {TARGET_EXPERIMENTS} own loaders "
            f"{shared.images_per_second / loaders.images_per_second:.2f}×"
            if loaders is not None and loaders.images_per_second
            else ""
        )
        lines.append(
            f"{side}×{side}: at {TARGET_EXPERIMENTS} experiments the shared group delivers "
            f"{ratio:.2f}× the aggregate of {TARGET_EXPERIMENTS} independent streams "
            f"(rounds: {by_round}; target ≥ {TARGET_RATIO}×: {verdict}){against_loaders}."
        )
    return lines


def parse_args(argv: Sequence[str] | None = None) -> BenchConfig:
    args = window_arguments(argv, __doc__.split("\n\n")[0], 6.0, 1.5, f"outputs {QUICK_SIDES} only")
    if args.quick:
        return BenchConfig(args.seconds, QUICK_SIDES, 1, 10.0, args.json_path)
    return BenchConfig(args.seconds, SIDES, ROUNDS, QUIET_BUDGET_SECONDS, args.json_path)


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_args(argv)
    run = WindowRun(
        VERSIONED_PACKAGES,
        max(EXPERIMENT_COUNTS),
        "bench-experiment",
        "augserve-bench-groups-",
        config.quiet_budget_seconds,
    )
    with run:
        dataset_path = make_dataset(run.folder, DATASET_IMAGES, (MIN_SIDE, MAX_SIDE))
        announce(
            len(config.sides) * len(EXPERIMENT_COUNTS) * len(WAYS), config.seconds, config.rounds
        )
        bench = Bench(dataset_path, run.clients)
        try:
            cells = run_benchmark(config, bench, run.gate)
        finally:
            bench.close()

    details = {
        "dataset": {
            "images": DATASET_IMAGES,
            "min_side": MIN_SIDE,
            "max_side": MAX_SIDE,
            "jpeg_quality": JPEG_QUALITY,
        },
        "batch_size": BATCH_SIZE,
        "transport": TRANSPORT,
        "specs": {side: spec_dict(side) for side in config.sides},
        "target": {"experiments": TARGET_EXPERIMENTS, "shared_over_independent": TARGET_RATIO},
    }
    run.publish(
        config,
        (
            f"Data: {DATASET_IMAGES} JPEGs q{JPEG_QUALITY}, sides {MIN_SIDE}–{MAX_SIDE} px; spec: "
            f"random_resized_crop + flip + brightness; batch {BATCH_SIZE}; server: OpenCV backend, "
            f"{os.cpu_count()} threads, prefetch {Limits().default_prefetch}, {TRANSPORT}; "
            "experiments: one process each (spawn); own loaders: OpenCVBackend with "
            f"{os.cpu_count()} threads per process."
        ),
        markdown_tables(cells),
        target_summary(cells),
        details,
        [cell.to_json() for cell in cells],
    )


if __name__ == "__main__":
    main()
