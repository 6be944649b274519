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
  reading the batch's files and writing into one reused output array (bench_transport's
  `in_process_batches`). Processes, not threads: separate experiments are separate processes,
  and a process's CPU is its own.

Every consumer touches what it receives (one byte of every 64-byte cache line, summed), as in
bench_transport; a batch counts when its touch is done. Consumers take batches as fast as they
can.

Data: DATASET_IMAGES JPEGs (quality 90) of random width and height in [MIN_SIDE, MAX_SIDE]
pixels, cut from scikit-image's sample photos. Spec: `random_resized_crop` to the output size,
horizontal flip (p=0.5), brightness ±0.2. Outputs [N, H, W, 3] uint8, batch BATCH_SIZE.

Timing (bench_transport's machinery, imported from it): a cell is one (output size,
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

import argparse
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import cv2
import numpy as np

# bench_transport sits beside this file: `python benchmarks/bench_groups.py` puts this folder
# on sys.path, and spawned children inherit it.
from bench_transport import (
    JPEG_QUALITY,
    SAMPLE_PHOTOS,
    WINDOW_LEAD_SECONDS,
    ConsumerRound,
    PipeSignals,
    ProcessConsumer,
    QuietGate,
    Round,
    StopWorker,
    consume,
    cpu_sample,
    in_process_batches,
    library_versions,
    machine_info,
    spec_dict,
    window_cpu,
)

from augserve.backends.opencv import OpenCVBackend
from augserve.client import Client
from augserve.datasets import Manifest, load_manifest
from augserve.server import AugserveServer, DatasetConfig, ServerConfig, create_server
from augserve.sessions import Limits
from augserve.spec import AugmentSpec

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
DATASET_NAME = "bench"
DATASET_IMAGES = 512  # a multiple of BATCH_SIZE: no short batch at an epoch's end
MIN_SIDE = 256
MAX_SIDE = 500
TRANSPORT = "shared_memory"
SEED = 2000
# After a round, how long to wait for the server to close its sessions before the next one.
SESSION_CLOSE_SECONDS = 10.0


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
        if not 0.2 <= self.seconds <= 600:
            raise ValueError(f"seconds: expected a number in [0.2, 600], got {self.seconds}")
        if not 1 <= self.rounds <= 20:
            raise ValueError(f"rounds: expected an integer in [1, 20], got {self.rounds}")
        if not self.sides:
            raise ValueError("sides: expected at least one output side")


# --- what one experiment process runs --------------------------------------------------------


@dataclass(frozen=True)
class ExperimentJob:
    """One experiment's batches for one round. `way` is one of WAYS; server ways stream from
    `address`, OWN_LOADERS augments `dataset_path` in the worker. `expect_shared`: whether the
    server must call the stream shared (the worker fails the round otherwise). `transport` and
    `seed` name the job in ProcessConsumer's errors."""

    way: str
    address: str
    dataset: str
    dataset_path: str
    spec: dict
    batch_size: int
    seed: int
    group_size: int
    group_policy: str
    expect_shared: bool
    transport: str = TRANSPORT


def stream_batches(client: Client, job: ExperimentJob) -> Iterator[np.ndarray]:
    """Endless batches of the job's stream; the stream closes when the generator does."""
    with client.stream(
        job.dataset,
        spec=AugmentSpec.from_dict(job.spec),
        batch_size=job.batch_size,
        seed=job.seed,
        epochs=0,
        transport=job.transport,
        group_size=job.group_size,
        group_policy=job.group_policy,
    ) as stream:
        if stream.facts.transport != job.transport:
            raise RuntimeError(
                f"asked for {job.transport}, the server chose {stream.facts.transport}"
            )
        if stream.facts.shared != job.expect_shared:
            raise RuntimeError(
                f"{job.way}: the server says shared={stream.facts.shared}, "
                f"expected {job.expect_shared}"
            )
        for batch in stream:
            yield batch.images


def loader_batches(
    backend: OpenCVBackend, manifest: Manifest, job: ExperimentJob
) -> Iterator[np.ndarray]:
    """The job's batches made in this process, as an experiment with its own loader does."""
    spec = AugmentSpec.from_dict(job.spec)
    return in_process_batches(backend, manifest, spec, job.batch_size, job.seed)


def experiment_worker(connection: Connection) -> None:
    """An experiment process: runs one ExperimentJob per ("stream", job) message until
    ("stop",). The coordinator drives it through bench_transport's ProcessConsumer."""
    clients: dict[str, Client] = {}
    manifests: dict[str, Manifest] = {}
    try:
        while True:
            message = connection.recv()
            if message[0] == "stop":
                return
            job: ExperimentJob = message[1]
            backend: OpenCVBackend | None = None
            try:
                if job.way == OWN_LOADERS:
                    manifest = manifests.get(job.dataset_path)
                    if manifest is None:
                        manifest = load_manifest(job.dataset_path, use_cache=False)
                        manifests[job.dataset_path] = manifest
                    backend = OpenCVBackend(os.cpu_count() or 1)
                    batches = loader_batches(backend, manifest, job)
                else:
                    if job.address not in clients:
                        clients[job.address] = Client(job.address)
                    batches = stream_batches(clients[job.address], job)
                try:
                    result = consume(batches, PipeSignals(connection))
                finally:
                    batches.close()
                connection.send(("done", result))
            except StopWorker:
                raise
            except Exception:  # noqa: BLE001 - the coordinator raises it with this traceback
                connection.send(("error", traceback.format_exc()))
            finally:
                if backend is not None:
                    backend.close()
    except (EOFError, KeyboardInterrupt, StopWorker):
        return
    finally:
        for client in clients.values():
            client.close()


class ExperimentPool:
    """`count` experiment processes (spawned: no fork of a process running gRPC threads).
    bench_transport's ClientPool, whose worker cannot join groups, with this file's worker."""

    def __init__(self, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.connections: list[Connection] = []
        self.processes = []
        for index in range(count):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=experiment_worker,
                args=(theirs,),
                name=f"bench-experiment-{index}",
                daemon=True,
            )
            process.start()
            theirs.close()
            self.connections.append(ours)
            self.processes.append(process)

    def close(self) -> None:
        for connection in self.connections:
            try:
                connection.send(("stop",))
            except OSError:
                pass
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.terminate()
                process.join(5)
        for connection in self.connections:
            connection.close()


# --- one round, one cell ---------------------------------------------------------------------


@dataclass(frozen=True)
class ServerCounters:
    """The server's counters at one moment (cumulative since it started)."""

    batches_produced: int
    batches_delivered: int
    images_delivered: int

    def __sub__(self, other: ServerCounters) -> ServerCounters:
        return ServerCounters(
            self.batches_produced - other.batches_produced,
            self.batches_delivered - other.batches_delivered,
            self.images_delivered - other.images_delivered,
        )


@dataclass(frozen=True)
class GroupRound:
    """One window of one cell: bench_transport's Round and the server's counters over it."""

    measured: Round
    counters: ServerCounters

    @property
    def consumers(self) -> tuple[ConsumerRound, ...]:
        return self.measured.consumers

    @property
    def aggregate(self) -> float:
        return self.measured.images_per_second


def run_round(
    consumers: Sequence[ProcessConsumer], seconds: float, counters: Callable[[], ServerCounters]
) -> GroupRound:
    """bench_transport's run_round, with the server's counters read beside the CPU samples:
    wait until every consumer is warm, open one window of `seconds` for all, collect."""
    for consumer in consumers:
        consumer.wait_warm()
    start = time.monotonic() + WINDOW_LEAD_SECONDS
    end = start + seconds
    for consumer in consumers:
        consumer.open_window(start, end)
    time.sleep(max(0.0, start - time.monotonic()))
    before, counters_before = cpu_sample(), counters()
    time.sleep(max(0.0, end - time.monotonic()))
    after, counters_after = cpu_sample(), counters()
    results = tuple(consumer.result() for consumer in consumers)
    measured = Round(results, window_cpu(before, after), client_processes=True)
    return GroupRound(measured, counters_after - counters_before)


@dataclass
class Cell:
    """One (output side, experiments, way): rates are means over its rounds."""

    side: int
    experiments: int
    way: str
    rounds: list[GroupRound] = field(default_factory=list)

    @property
    def aggregate(self) -> float:
        """Images/s summed over the experiments."""
        return float(np.mean([item.aggregate for item in self.rounds]))

    @property
    def per_experiment(self) -> float:
        return self.aggregate / self.experiments

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
        return 1e3 * sum(item.measured.cpu.process_seconds for item in self.rounds) / images

    @property
    def consumer_ms_per_image(self) -> float:
        """The experiment processes' CPU per image they took: client work for server ways
        (gRPC, slot release, touch), all of the augmentation for own loaders."""
        consumers = [consumer for item in self.rounds for consumer in item.consumers]
        return 1e3 * sum(c.cpu_seconds for c in consumers) / sum(c.images for c in consumers)

    @property
    def total_ms_per_image(self) -> float:
        return (self.server_ms_per_image or 0.0) + self.consumer_ms_per_image

    def role_ms_per_image(self) -> dict[str, float]:
        """The server's CPU per delivered image by thread role."""
        images = self._counted("images_delivered")
        if not images:
            return {}
        totals: dict[str, float] = {}
        for item in self.rounds:
            for role, seconds in item.measured.cpu.by_role.items():
                totals[role] = totals.get(role, 0.0) + seconds
        return {role: 1e3 * seconds / images for role, seconds in sorted(totals.items())}

    @property
    def other_cores(self) -> float:
        """Mean over rounds of the cores other users of the machine took (noise)."""
        return float(np.mean([item.measured.other_cores for item in self.rounds]))

    @property
    def steal_cores(self) -> float:
        return float(np.mean([item.measured.cpu.machine_steal_cores for item in self.rounds]))

    def to_json(self) -> dict:
        return {
            "side": self.side,
            "batch_size": BATCH_SIZE,
            "experiments": self.experiments,
            "way": self.way,
            "images_per_second_aggregate": self.aggregate,
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
            "rounds": [
                {
                    "images_per_second": item.aggregate,
                    "counters": asdict(item.counters),
                    "consumers": [asdict(consumer) for consumer in item.consumers],
                    "cpu": asdict(item.measured.cpu),
                }
                for item in self.rounds
            ],
        }


class Bench:
    """The server and the experiment processes of one run."""

    def __init__(self, dataset_path: Path, pool: ExperimentPool) -> None:
        self.dataset_path = dataset_path
        self.pool = pool
        self.server: AugserveServer = create_server(
            ServerConfig(
                host="127.0.0.1",
                port=0,
                backend="opencv",
                threads=os.cpu_count() or 1,
                datasets={DATASET_NAME: DatasetConfig(str(dataset_path))},
                limits=Limits(),
            )
        )

    def close(self) -> None:
        self.server.stop(grace=2.0)

    def counters(self) -> ServerCounters:
        manager = self.server.manager
        with manager.condition:
            counted = manager.counters
            return ServerCounters(
                counted.batches_produced, counted.batches_delivered, counted.images_delivered
            )

    def wait_sessions_closed(self) -> None:
        """Let the last round's sessions and producers go before the next round opens."""
        manager = self.server.manager
        deadline = time.monotonic() + SESSION_CLOSE_SECONDS
        with manager.condition:
            while manager.sessions or manager.producers:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{len(manager.sessions)} sessions and {len(manager.producers)} producers "
                        f"still open {SESSION_CLOSE_SECONDS:g} s after a round"
                    )
                manager.condition.wait(min(left, 0.1))

    def measure(
        self, way: str, side: int, experiments: int, round_index: int, seconds: float
    ) -> GroupRound:
        # One seed per round and way: no stream of one round can meet another's producer.
        seed = SEED + 100 * round_index + 10 * WAYS.index(way)
        job = ExperimentJob(
            way=way,
            address=self.server.address,
            dataset=DATASET_NAME,
            dataset_path=str(self.dataset_path),
            spec=spec_dict(side),
            batch_size=BATCH_SIZE,
            seed=seed,
            group_size=experiments if way == SHARED_GROUP else 0,
            group_policy="alone" if way == INDEPENDENT_STREAMS else "lockstep",
            expect_shared=way == SHARED_GROUP and experiments > 1,
        )
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
            row = {way: Cell(side, experiments, way) for way in WAYS}
            for round_index in range(config.rounds):
                order = WAYS if round_index % 2 == 0 else WAYS[::-1]
                for way in order:
                    gate.wait()
                    row[way].rounds.append(
                        bench.measure(way, side, experiments, round_index, round_seconds)
                    )
            for way in WAYS:
                cell = row[way]
                rates = ", ".join(f"{item.aggregate:.0f}" for item in cell.rounds)
                print(
                    f"  {side}×{side}, {experiments} experiment(s), {way:19} "
                    f"{cell.per_experiment:6.0f} images/s each, {cell.aggregate:6.0f} in all "
                    f"(rounds: {rates}; produced {cell.batches_produced}, delivered "
                    f"{cell.batches_delivered}; other load {cell.other_cores:.2f} cores)",
                    file=sys.stderr,
                    flush=True,
                )
                cells.append(cell)
    return cells


# --- the data set ----------------------------------------------------------------------------


def make_dataset(root: Path, count: int = DATASET_IMAGES) -> Path:
    """`count` JPEGs of random width and height in [MIN_SIDE, MAX_SIDE] as an ImageFolder tree
    under `root`: windows of that aspect (50–100 % of the largest that fits) of each sample
    photo, resized, one class folder per photo. bench_transport's data set has one fixed size."""
    import skimage.data  # only here: experiment processes need not import it

    rng = np.random.default_rng(0)
    photos = []
    for name in SAMPLE_PHOTOS:
        photo = getattr(skimage.data, name)()
        if photo.ndim == 2:
            photo = np.stack([photo] * 3, axis=-1)
        photos.append(np.ascontiguousarray(photo[..., :3]))
    dataset = root / "images"
    for index in range(count):
        pick = index % len(photos)
        photo = photos[pick]
        height, width = (int(side) for side in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
        scale = min(photo.shape[0] / height, photo.shape[1] / width) * rng.uniform(0.5, 1.0)
        crop_height, crop_width = max(1, int(height * scale)), max(1, int(width * scale))
        top = rng.integers(0, photo.shape[0] - crop_height + 1)
        left = rng.integers(0, photo.shape[1] - crop_width + 1)
        window = photo[top : top + crop_height, left : left + crop_width]
        shrinking = crop_height >= height
        image = cv2.resize(
            window,
            (width, height),
            interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR,
        )
        folder = dataset / SAMPLE_PHOTOS[pick]
        folder.mkdir(parents=True, exist_ok=True)
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        if not cv2.imwrite(
            str(folder / f"{index:05d}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
        ):
            raise RuntimeError(f"could not write a JPEG under {folder}")
    return dataset


# --- reporting -------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown_tables(cells: Sequence[Cell]) -> str:
    """One table per output side: rates, CPU and counters per (experiments, way)."""
    baseline = {(c.side, c.way): c.aggregate for c in cells if c.experiments == 1 and c.aggregate}
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
            scaling = f"{cell.aggregate / single:.2f}×" if single else "n/a"
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
                f"| {cell.slowest_experiment:,.0f} | {cell.aggregate:,.0f} | {scaling} "
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
        if shared is None or streams is None or not streams.aggregate:
            continue
        ratio = shared.aggregate / streams.aggregate
        verdict = "met" if ratio >= TARGET_RATIO else "not met"
        by_round = ", ".join(
            f"{mine.aggregate / theirs.aggregate:.2f}×"
            for mine, theirs in zip(shared.rounds, streams.rounds, strict=True)
            if theirs.aggregate
        )
        against_loaders = (
            f"; over {TARGET_EXPERIMENTS} own loaders {shared.aggregate / loaders.aggregate:.2f}×"
            if loaders is not None and loaders.aggregate
            else ""
        )
        lines.append(
            f"{side}×{side}: at {TARGET_EXPERIMENTS} experiments the shared group delivers "
            f"{ratio:.2f}× the aggregate of {TARGET_EXPERIMENTS} independent streams "
            f"(rounds: {by_round}; target ≥ {TARGET_RATIO}×: {verdict}){against_loaders}."
        )
    return lines


def parse_args(argv: Sequence[str] | None = None) -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="timed seconds per cell, split into rounds (default 6; 1.5 with --quick)",
    )
    parser.add_argument(
        "--json", dest="json_path", default=None, help="also write raw numbers to this file"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke run: outputs {QUICK_SIDES} only, one round, 1.5 s per cell",
    )
    args = parser.parse_args(argv)
    if args.quick:
        return BenchConfig(args.seconds or 1.5, QUICK_SIDES, 1, 10.0, args.json_path)
    return BenchConfig(args.seconds or 6.0, SIDES, ROUNDS, QUIET_BUDGET_SECONDS, args.json_path)


def _exit_on_signal(number: int, frame: object) -> None:
    raise SystemExit(128 + number)


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_args(argv)
    # SIGTERM ends a run as Ctrl-C does: the server, the experiment processes and the temporary
    # folder are cleaned up on the way out.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    machine = machine_info()
    versions = library_versions()
    began = time.monotonic()
    pool = ExperimentPool(max(EXPERIMENT_COUNTS))
    try:
        with tempfile.TemporaryDirectory(prefix="augserve-bench-groups-") as folder:
            # The server's manifest cache goes to the temporary folder, not ~/.cache.
            os.environ["AUGSERVE_CACHE"] = str(Path(folder) / "cache")
            dataset_path = make_dataset(Path(folder))
            cells_count = len(config.sides) * len(EXPERIMENT_COUNTS) * len(WAYS)
            print(
                f"Measuring {cells_count} cells of {config.seconds:g} s "
                f"({config.rounds} round(s) each)...",
                file=sys.stderr,
                flush=True,
            )
            bench = Bench(dataset_path, pool)
            gate = QuietGate(config.quiet_budget_seconds)
            try:
                cells = run_benchmark(config, bench, gate)
            finally:
                bench.close()
    finally:
        pool.close()
    elapsed = time.monotonic() - began

    print(
        f"Machine: {machine['cpu_count']} CPUs ({machine['cpu_model']}), {machine['platform']}, "
        f"Python {machine['python']}"
    )
    print("Versions: " + ", ".join(f"{name} {value}" for name, value in versions.items()))
    print(
        f"Data: {DATASET_IMAGES} JPEGs q{JPEG_QUALITY}, sides {MIN_SIDE}–{MAX_SIDE} px; spec: "
        f"random_resized_crop + flip + brightness; batch {BATCH_SIZE}; server: OpenCV backend, "
        f"{os.cpu_count()} threads, prefetch {Limits().default_prefetch}, {TRANSPORT}; "
        "experiments: one process each (spawn); own loaders: OpenCVBackend with "
        f"{os.cpu_count()} threads per process."
    )
    print(
        f"{config.seconds:g} s per cell as {config.rounds} round(s), ways interleaved; "
        f"run took {elapsed:.0f} s, of which {gate.waited:.0f} s waiting for other load to pass "
        f"({gate.rounds_started_busy} round(s) started with the machine busy)."
    )
    print()
    print(markdown_tables(cells))
    print()
    for line in target_summary(cells):
        print(line)

    if config.json_path:
        report = {
            "machine": machine,
            "versions": versions,
            "config": asdict(config),
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
            "quiet_wait": {"seconds": gate.waited, "rounds_started_busy": gate.rounds_started_busy},
            "elapsed_seconds": elapsed,
            "cells": [cell.to_json() for cell in cells],
        }
        with open(config.json_path, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2, ensure_ascii=False)
            handle.write("\n")


if __name__ == "__main__":
    main()
