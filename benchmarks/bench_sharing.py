"""Decode once, augment many: four experiments with four different specs on one dataset, side
by side with four independent streams; and a dataset that fits the decoded-image cache, its
second epoch against its first. One run, a few minutes.

    python benchmarks/bench_sharing.py [--seconds S] [--json PATH] [--quick]

Part 1, shared decode. One server (`create_server`, OpenCV backend, every core, the decoded-image
cache off so that only sharing counts) in this process; four experiment processes, each
streaming its own spec (SPECS: four different augmentations to OUTPUT_SIDE²) of the same
dataset order (dataset, seed, batch size) over shared memory. Ways, each a row of rounds taken
in turn (common.py's windows, as bench_groups):
- shared decode: `decode_group_size=4`, so the four producers form one decode group from the
  first batch: each batch's images are read and decoded once and warped and coloured per spec.
- independent streams: `group_policy="alone"`: four producers that each read and decode every
  image themselves (what the server did before).
Each round uses a fresh seed per way, and every consumer touches what it receives.
Reported: aggregate and per-experiment images/s, the server's CPU per delivered image, and the
server's decodes per delivered image in the window (1 for independent streams, 1/4 shared).

Part 2, the cache. For each round a fresh server with the cache on (its default budget, which
the dataset's decoded images fit) and one experiment process streaming three epochs of one
spec; images/s of each epoch (from its first batch to its last, touched), with the server's
decodes and cache hits per epoch. Epoch 2 skips every decode.

Data: DATASET_IMAGES JPEGs (quality 90) of random sides in [MIN_SIDE, MAX_SIDE] pixels cut
from scikit-image's sample photos (common.make_dataset); batches of BATCH_SIZE.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from common import (
    DATASET_NAME,
    JPEG_QUALITY,
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
    server_config,
    server_counters,
    touch,
    window_arguments,
)

from augserve.client import Client
from augserve.core.spec import AugmentSpec
from augserve.rpc.server import AugserveServer, create_server
from augserve.streaming.limits import Limits

OUTPUT_SIDE = 224
BATCH_SIZE = 64
DATASET_IMAGES = 512  # a multiple of BATCH_SIZE
MIN_SIDE = 256
MAX_SIDE = 500
TRANSPORT = "shared_memory"
SEED = 3000
ROUNDS = 2
QUIET_BUDGET_SECONDS = 40.0
SESSION_CLOSE_SECONDS = 10.0
CACHE_EPOCHS = 3
TARGET_RATIO = 1.8  # shared decode over independent streams, aggregate, 4 experiments at 224²
SHARED_DECODE = "shared decode"
INDEPENDENT_STREAMS = "independent streams"
WAYS = (SHARED_DECODE, INDEPENDENT_STREAMS)
VERSIONED_PACKAGES = ("augserve", "numpy", "opencv-python-headless", "grpcio", "protobuf", "scikit-image")


def specs(side: int) -> tuple[dict, ...]:
    """Four experiments that differ only in augmentation, all to side×side outputs."""
    return (
        {"ops": [{"random_resized_crop": {"size": side}}, {"flip": {"horizontal": 0.5}}, {"brightness": {"factor": 0.2}}]},
        {"ops": [{"rotate": {"degrees": 15}}, {"random_resized_crop": {"size": side, "scale": [0.3, 1.0]}},
                 {"contrast": {"factor": 0.2}}]},
        {"ops": [{"resize_shorter_side": {"size": round(side * 8 / 7)}}, {"crop": {"size": side, "mode": "random"}},
                 {"saturation": {"factor": 0.3}}, {"hue": {"degrees": 10}}]},
        {"ops": [{"shear": {"degrees": 10}}, {"random_resized_crop": {"size": side, "scale": [0.5, 1.0]}},
                 {"flip": {"horizontal": 0.5}}, {"grayscale": {"p": 0.1}}]},
    )


@dataclass(frozen=True)
class BenchConfig:
    seconds: float = 8.0  # per cell of part 1, split into rounds
    rounds: int = ROUNDS
    quiet_budget_seconds: float = QUIET_BUDGET_SECONDS
    json_path: str | None = None

    def __post_init__(self) -> None:
        check_range("seconds", self.seconds, 0.2, 600)
        check_range("rounds", self.rounds, 1, 20)


@dataclass(frozen=True)
class DecodeCounts:
    """The server's decode counters over a window (differences)."""

    decoded: int
    shared: int
    cached: int
    images_delivered: int


@dataclass
class Cell(RoundsSummary):
    way: str
    rounds: list[Round] = field(default_factory=list)
    decodes: list[DecodeCounts] = field(default_factory=list)

    @property
    def per_experiment(self) -> float:
        return self.images_per_second / len(SPECS)

    @property
    def server_ms_per_image(self) -> float:
        images = sum(item.counters.images_delivered for item in self.rounds)
        return 1e3 * sum(item.cpu.process_seconds for item in self.rounds) / max(images, 1)

    def round_server_ms(self) -> list[float]:
        """The server's CPU ms per delivered image in each round."""
        return [1e3 * item.cpu.process_seconds / max(item.counters.images_delivered, 1) for item in self.rounds]

    @property
    def decodes_per_delivered_image(self) -> float:
        delivered = sum(item.images_delivered for item in self.decodes)
        return sum(item.decoded for item in self.decodes) / max(delivered, 1)

    def to_json(self) -> dict:
        return {
            "way": self.way,
            "images_per_second_aggregate": self.images_per_second,
            "images_per_second_per_experiment": self.per_experiment,
            "server_cpu_ms_per_delivered_image": self.server_ms_per_image,
            "experiment_cpu_ms_per_image": self.consumer_ms_per_image,
            "decodes_per_delivered_image": self.decodes_per_delivered_image,
            "decode_counts": [dataclasses.asdict(item) for item in self.decodes],
            "other_load_cores": self.other_cores,
            "rounds": [item.to_json() for item in self.rounds],
        }


SPECS = specs(OUTPUT_SIDE)


def decode_counts(server: AugserveServer) -> DecodeCounts:
    counted = server.manager.counters.snapshot()
    return DecodeCounts(counted.images_decoded, counted.decode_shared, counted.decode_cached, counted.images_delivered)


def difference(after: DecodeCounts, before: DecodeCounts) -> DecodeCounts:
    return DecodeCounts(*(getattr(after, name) - getattr(before, name) for name in ("decoded", "shared", "cached", "images_delivered")))


class SharingBench:
    """Part 1: one server without the cache and four experiment processes."""

    def __init__(self, dataset_path: Path, connections: Sequence) -> None:
        config = server_config(dataset_path)
        self.server = create_server(dataclasses.replace(config, limits=Limits(decoded_cache_bytes=0)))
        self.connections = connections
        self.decodes: dict[str, list[DecodeCounts]] = {way: [] for way in WAYS}

    def close(self) -> None:
        self.server.stop(grace=2.0)

    def measure(self, seconds: float, way: str, round_index: int) -> Round:
        seed = SEED + 100 * round_index + 10 * WAYS.index(way)  # no producer of another round or way meets it
        jobs = [
            StreamJob(
                self.server.address, DATASET_NAME, spec, BATCH_SIZE, seed, TRANSPORT,
                group_policy="alone" if way == INDEPENDENT_STREAMS else "lockstep",
                decode_group_size=len(SPECS) if way == SHARED_DECODE else 0,
            )
            for spec in SPECS
        ]
        handles = [ProcessConsumer(self.connections[index], job) for index, job in enumerate(jobs)]
        marks: list[DecodeCounts] = []

        def read_counters() -> ServerCounters:
            marks.append(decode_counts(self.server))
            return server_counters(self.server)

        measured = run_round(handles, seconds, read_counters)
        self.decodes[way].append(difference(marks[1], marks[0]))
        if not self.server.manager.wait_idle(SESSION_CLOSE_SECONDS):
            raise TimeoutError("the round's sessions did not close")
        return measured


# --- part 2: epochs with the cache -------------------------------------------------------------


def epoch_rates(address: str, spec: dict, seed: int, epochs: int) -> list[tuple[int, float]]:
    """In a client process: stream `epochs` epochs, touching every batch; per epoch (images
    after its first batch, seconds from its first batch to its last)."""
    marks: dict[int, list[tuple[float, int]]] = {}
    with Client(address) as client, client.stream(
        DATASET_NAME, spec=AugmentSpec.from_dict(spec), batch_size=BATCH_SIZE, seed=seed, epochs=epochs, transport=TRANSPORT
    ) as stream:
        for batch in stream:
            touch(batch.images)
            marks.setdefault(batch.epoch, []).append((time.monotonic(), len(batch.sample_ids)))
    rates = []
    for epoch in range(epochs):
        times = marks[epoch]
        rates.append((sum(count for _, count in times[1:]), times[-1][0] - times[0][0]))
    return rates


def _epoch_rates_worker(queue, *arguments) -> None:
    try:
        queue.put(("done", epoch_rates(*arguments)))
    except Exception as error:  # noqa: BLE001 - raised again in the coordinator
        queue.put(("error", repr(error)))


@dataclass
class CacheRound:
    rates: list[float]  # images/s per epoch
    decoded: int  # server decodes over all epochs (every one in epoch 1)
    cached: int  # cache hits over all epochs
    cache_bytes: int


def measure_cache_round(dataset_path: Path, gate: QuietGate, round_index: int) -> CacheRound:
    """A fresh server (an empty cache) and one experiment process over CACHE_EPOCHS epochs."""
    gate.wait()
    server = create_server(server_config(dataset_path))
    try:
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        process = context.Process(
            target=_epoch_rates_worker, args=(queue, server.address, SPECS[0], SEED + 7 + round_index, CACHE_EPOCHS),
            daemon=True,
        )
        process.start()
        status, payload = queue.get(timeout=300)
        process.join(30)
        if status != "done":
            raise RuntimeError(f"the experiment failed: {payload}")
        counted = decode_counts(server)
        rates = [images / seconds if seconds > 0 else 0.0 for images, seconds in payload]
        return CacheRound(rates, counted.decoded, counted.cached, server.manager.decoded_cache.stats().bytes)
    finally:
        server.stop(grace=2.0)


# --- reporting -----------------------------------------------------------------------------------


def markdown(cells: Sequence[Cell], cache_rounds: Sequence[CacheRound]) -> str:
    lines = [
        f"Four experiments, four specs, {OUTPUT_SIDE}×{OUTPUT_SIDE} outputs, batch {BATCH_SIZE}, cache off:",
        "",
        (
            "| way | aggregate img/s | img/s per experiment | rounds | server CPU ms / delivered img "
            "| experiment CPU ms / img | decodes / delivered img | other load, cores |"
        ),
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for cell in cells:
        lines.append(
            f"| {cell.way} | {cell.images_per_second:,.0f} | {cell.per_experiment:,.0f} | {cell.rounds_text()} "
            f"| {cell.server_ms_per_image:.3f} | {cell.consumer_ms_per_image:.3f} "
            f"| {cell.decodes_per_delivered_image:.3f} | {cell.other_cores:.2f} |"
        )
    lines += [
        "",
        f"One experiment, a dataset that fits the cache ({DATASET_IMAGES} images), per epoch:",
        "",
        "| round | " + " | ".join(f"epoch {epoch + 1} img/s" for epoch in range(CACHE_EPOCHS))
        + f" | epoch 2 / epoch 1 | decodes in {CACHE_EPOCHS} epochs | cache hits | cache bytes |",
        "|---:|" + "---:|" * CACHE_EPOCHS + "---:|---:|---:|---:|",
    ]
    for index, item in enumerate(cache_rounds):
        lines.append(
            f"| {index + 1} | " + " | ".join(f"{rate:,.0f}" for rate in item.rates)
            + f" | {item.rates[1] / item.rates[0]:.2f}× | {item.decoded:,} | {item.cached:,} | {item.cache_bytes:,} |"
        )
    return "\n".join(lines)


def target_lines(cells: Sequence[Cell], cache_rounds: Sequence[CacheRound]) -> list[str]:
    lookup = {cell.way: cell for cell in cells}
    shared, independent = lookup[SHARED_DECODE], lookup[INDEPENDENT_STREAMS]
    ratio = shared.images_per_second / independent.images_per_second
    by_round = ", ".join(
        f"{mine.images_per_second / theirs.images_per_second:.2f}×"
        for mine, theirs in zip(shared.rounds, independent.rounds, strict=True)
    )
    verdict = "met" if ratio >= TARGET_RATIO else "not met"
    # Images/s follow whatever else the machine runs in each window; the server's CPU per
    # delivered image much less so, and where the server has the cores it bounds images/s.
    cpu_by_round = ", ".join(
        f"{theirs / mine:.2f}×"
        for mine, theirs in zip(shared.round_server_ms(), independent.round_server_ms(), strict=True)
    )
    speedups = [item.rates[1] / item.rates[0] for item in cache_rounds]
    return [
        (
            f"Shared decode delivers {ratio:.2f}× the aggregate of four independent streams "
            f"(rounds: {by_round}; target ≥ {TARGET_RATIO}×: {verdict})."
        ),
        (
            f"The server's CPU per delivered image: {shared.server_ms_per_image:.3f} ms shared, "
            f"{independent.server_ms_per_image:.3f} ms independent, "
            f"{independent.server_ms_per_image / shared.server_ms_per_image:.2f}× less shared "
            f"(rounds: {cpu_by_round})."
        ),
        f"With the cache, epoch 2 runs at {np.mean(speedups):.2f}× epoch 1 (rounds: "
        + ", ".join(f"{value:.2f}×" for value in speedups) + "), decoding nothing.",
    ]


def parse_args(argv: Sequence[str] | None = None) -> BenchConfig:
    args = window_arguments(argv, __doc__.split("\n\n")[0], 8.0, 2.0, "one round of each part")
    if args.quick:
        return BenchConfig(args.seconds, 1, 10.0, args.json_path)
    return BenchConfig(args.seconds, ROUNDS, QUIET_BUDGET_SECONDS, args.json_path)


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_args(argv)
    run = WindowRun(VERSIONED_PACKAGES, len(SPECS), "bench-sharing", "augserve-bench-sharing-", config.quiet_budget_seconds)
    with run:
        dataset_path = make_dataset(run.folder, DATASET_IMAGES, (MIN_SIDE, MAX_SIDE))
        announce(len(WAYS), config.seconds, config.rounds)
        bench = SharingBench(dataset_path, run.clients.connections)
        try:
            measured = measure_row(WAYS, config.rounds, run.gate, partial(bench.measure, config.seconds / config.rounds))
        finally:
            bench.close()
        cells = [Cell(way, measured[way], bench.decodes[way]) for way in WAYS]
        for cell in cells:
            print(f"  {cell.way:19} {cell.images_per_second:6.0f} images/s in all (rounds: {cell.rounds_text()}; "
                  f"{cell.decodes_per_delivered_image:.2f} decodes per delivered image)", file=sys.stderr, flush=True)
        cache_rounds = []
        for round_index in range(config.rounds):
            item = measure_cache_round(dataset_path, run.gate, round_index)
            print("  cache round: " + ", ".join(f"{rate:.0f}" for rate in item.rates) + " images/s by epoch",
                  file=sys.stderr, flush=True)
            cache_rounds.append(item)
    run.publish(
        config,
        (
            f"Data: {DATASET_IMAGES} JPEGs q{JPEG_QUALITY}, sides {MIN_SIDE}–{MAX_SIDE} px; four specs to "
            f"{OUTPUT_SIDE}×{OUTPUT_SIDE} (random_resized_crop, rotate, shear, resize + crop; flip, brightness, contrast, "
            f"saturation, hue, grayscale); batch {BATCH_SIZE}; server: OpenCV backend, {os.cpu_count()} threads, "
            f"{TRANSPORT}; experiments: one process each (spawn)."
        ),
        markdown(cells, cache_rounds),
        target_lines(cells, cache_rounds),
        {"dataset": {"images": DATASET_IMAGES, "min_side": MIN_SIDE, "max_side": MAX_SIDE}, "batch_size": BATCH_SIZE,
         "specs": list(SPECS), "target": {"shared_over_independent": TARGET_RATIO}},
        [cell.to_json() for cell in cells] + [{"cache_round": dataclasses.asdict(item)} for item in cache_rounds],
    )


if __name__ == "__main__":
    main()
