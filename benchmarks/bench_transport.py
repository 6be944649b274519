"""Delivered images per second through augserve's transports: a real server on 127.0.0.1 to
clients over shared memory and in-band gRPC, against the rate the same backend produces in
process, side by side in one run.

    python benchmarks/bench_transport.py [--seconds S] [--json PATH] [--quick]

Ways, each for 1 and 2 concurrent consumers:
- in-process: `augment_batch` on an `OpenCVBackend` with every core, in a loop that reads the
  batch's files and writes into one reused output array, as a server producer does. Two
  consumers are two such loops on threads sharing the backend, as two producers share it in
  the server. No gRPC, no server: the rate the backend can produce.
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
budget, until other users of the machine are quiet (QuietGate).

CPU accounting over each window: this process (the server, or the in-process loops) by thread
role from /proc/self/task, the client processes by `time.process_time`, and the whole
machine from /proc/stat. "Other load" is the machine's busy time less this run's own: work of
other users of the machine during the window, which the numbers of that cell suffered.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from augserve.backends.opencv import OpenCVBackend
from augserve.client import Client
from augserve.datasets import Manifest, epoch_order, load_manifest
from augserve.produce import SourceImage, augment_batch
from augserve.server import AugserveServer, DatasetConfig, ServerConfig, create_server
from augserve.sessions import Limits
from augserve.spec import AugmentSpec

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
WARMUP_BATCHES = 2
MIN_COUNTED_BATCHES = 2
WARMUP_SECONDS = 0.5
# Gap between the last consumer reporting warm and the window opening.
WINDOW_LEAD_SECONDS = 0.05
# A consumer that takes this long for warm-up or one window is reported as failed.
CONSUMER_TIMEOUT_SECONDS = 120.0
CACHE_LINE_BYTES = 64
# Before each round, wait until the machine's busy time (all of it someone else's: between
# rounds this run is idle) is at most QUIET_CORES over a QUIET_SAMPLE_SECONDS sample, for at
# most QUIET_WAIT_SECONDS per round and QUIET_BUDGET_SECONDS per run.
QUIET_CORES = 0.25
QUIET_SAMPLE_SECONDS = 0.25
QUIET_WAIT_SECONDS = 10.0
QUIET_BUDGET_SECONDS = 60.0
DATASET_NAME = "bench"
DATASET_IMAGES = 512  # a multiple of every batch size: no short batch at an epoch's end
SOURCE_SIDE = 256
JPEG_QUALITY = 90
# Photos bundled with scikit-image (no download); each becomes one class folder.
SAMPLE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
)
SEED = 1000  # consumer k of round r streams with seed SEED + 10 * r + k


def spec_dict(side: int) -> dict:
    """The spec of every cell with `side`×`side` outputs, as `AugmentSpec.from_dict` takes it."""
    return {
        "ops": [
            {"random_resized_crop": {"size": side}},
            {"flip": {"horizontal": 0.5}},
            {"brightness": {"factor": 0.2}},
        ]
    }


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
        if not 0.2 <= self.seconds <= 600:
            raise ValueError(f"seconds: expected a number in [0.2, 600], got {self.seconds}")
        if not 1 <= self.rounds <= 20:
            raise ValueError(f"rounds: expected an integer in [1, 20], got {self.rounds}")
        if not self.shapes:
            raise ValueError("shapes: expected at least one (side, batch size)")


# --- measuring one consumer ------------------------------------------------------------------


def touch(images: np.ndarray) -> int:
    """Sum one byte of every 64-byte cache line of `images` (any shape, uint8, contiguous):
    all of the batch is read from memory, nothing is written."""
    return int(images.reshape(-1)[::CACHE_LINE_BYTES].sum(dtype=np.uint64))


@dataclass(frozen=True)
class ConsumerRound:
    """One consumer's window: `images` in the batches after its first finished batch, over
    `seconds` from that batch to its last; `cpu_seconds` its process's CPU in that span."""

    images: int
    batches: int
    seconds: float
    cpu_seconds: float
    checksum: int

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


class WindowSignals(Protocol):
    """How a consumer talks to the coordinator (over a pipe, or through thread events)."""

    def warmed(self) -> None: ...

    def window(self) -> tuple[float, float] | None: ...


def consume(batches: Iterator[np.ndarray], signals: WindowSignals) -> ConsumerRound:
    """Touch batches until the coordinator's window has closed and at least MIN_COUNTED_BATCHES
    followed the anchor (a slow stream runs past the window rather than yield no rate).
    `batches` yields [N, H, W, 3] uint8 arrays valid until the next one is asked for. Times are
    `time.monotonic()`, one clock for every process of the machine."""
    started = time.monotonic()
    taken = 0
    warm = False
    window: tuple[float, float] | None = None
    first: tuple[float, float] | None = None  # (finish time, process CPU) of the anchor batch
    last: tuple[float, float] | None = None
    images = batches_counted = checksum = 0
    for array in batches:
        checksum += touch(array)
        finished = time.monotonic()
        taken += 1
        if window is None:
            if not warm and taken >= WARMUP_BATCHES and finished - started >= WARMUP_SECONDS:
                signals.warmed()
                warm = True
            window = signals.window()
            continue
        start, end = window
        if finished < start:
            continue
        if finished > end and batches_counted >= MIN_COUNTED_BATCHES:
            break
        if first is None:
            first = (finished, time.process_time())
            continue
        last = (finished, time.process_time())
        images += len(array)
        batches_counted += 1
    if first is None or last is None:
        raise RuntimeError("the stream ended before the window closed")
    return ConsumerRound(images, batches_counted, last[0] - first[0], last[1] - first[1], checksum)


def in_process_batches(
    backend: OpenCVBackend, manifest: Manifest, spec: AugmentSpec, batch_size: int, seed: int
) -> Iterator[np.ndarray]:
    """Endless batches of `manifest`, as a server producer makes them: read the files, then
    `augment_batch` into one reused output array."""
    side = spec.fixed_output_size
    out = np.empty((batch_size, *side, 3), np.uint8)
    ids = np.arange(len(manifest), dtype=np.int64)
    epoch = 0
    while True:
        order = epoch_order(ids, seed, epoch, 0, 1, shuffle=True)
        for position in range(0, len(order) - batch_size + 1, batch_size):
            sources = []
            for sample_id in order[position : position + batch_size].tolist():
                path = manifest.path(sample_id)
                with open(path, "rb") as handle:
                    sources.append(
                        SourceImage(sample_id, int(manifest.labels[sample_id]), path, handle.read())
                    )
            yield augment_batch(backend, spec, seed, epoch, sources, out=out).images
        epoch += 1


def server_batches(client: Client, job: StreamJob) -> Iterator[np.ndarray]:
    """Endless batches of one stream; the stream closes when the generator does."""
    spec = AugmentSpec.from_dict(job.spec)
    with client.stream(
        job.dataset,
        spec=spec,
        batch_size=job.batch_size,
        seed=job.seed,
        epochs=0,
        transport=job.transport,
    ) as stream:
        if stream.facts.transport != job.transport:
            raise RuntimeError(
                f"asked for {job.transport}, the server chose {stream.facts.transport}"
            )
        if stream.facts.shared:
            raise RuntimeError("the stream joined another client's producer; seeds must differ")
        for batch in stream:
            yield batch.images


# --- consumers in threads (in-process) and in processes (clients) ----------------------------


class ThreadConsumer:
    """A consumer loop on a thread of this process."""

    def __init__(self, batches: Iterator[np.ndarray], name: str) -> None:
        self._batches = batches
        self._warm = threading.Event()
        self._window: tuple[float, float] | None = None
        self._result: ConsumerRound | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = consume(self._batches, self)
        except BaseException as error:  # noqa: BLE001 - raised again in the coordinator
            self._error = error
            self._warm.set()
        finally:
            self._batches.close()

    # consumer side
    def warmed(self) -> None:
        self._warm.set()

    def window(self) -> tuple[float, float] | None:
        return self._window

    # coordinator side
    def wait_warm(self) -> None:
        if not self._warm.wait(CONSUMER_TIMEOUT_SECONDS):
            raise TimeoutError(f"{self._thread.name} did not warm up")
        if self._error is not None:
            raise RuntimeError(f"{self._thread.name} failed") from self._error

    def open_window(self, start: float, end: float) -> None:
        self._window = (start, end)

    def result(self) -> ConsumerRound:
        self._thread.join(CONSUMER_TIMEOUT_SECONDS)
        if self._thread.is_alive():
            raise TimeoutError(f"{self._thread.name} did not finish its window")
        if self._error is not None or self._result is None:
            raise RuntimeError(f"{self._thread.name} failed") from self._error
        return self._result


@dataclass(frozen=True)
class StreamJob:
    """What a client process streams: `transport` is "shared_memory" or "inband"."""

    address: str
    dataset: str
    spec: dict
    batch_size: int
    seed: int
    transport: str


class StopWorker(Exception):
    """The coordinator asked a client process to stop while it was streaming."""


class PipeSignals:
    """The worker's end of the coordinator's pipe."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._window: tuple[float, float] | None = None

    def warmed(self) -> None:
        self._connection.send(("warm",))

    def window(self) -> tuple[float, float] | None:
        if self._window is None and self._connection.poll():
            message = self._connection.recv()
            if message[0] == "stop":
                raise StopWorker
            if message[0] != "window":
                raise RuntimeError(f"expected a window message, got {message[0]!r}")
            self._window = (message[1], message[2])
        return self._window


def client_worker(connection: Connection) -> None:
    """A client process: runs one StreamJob per ("stream", job) message until ("stop",)."""
    clients: dict[str, Client] = {}
    try:
        while True:
            message = connection.recv()
            if message[0] == "stop":
                return
            job: StreamJob = message[1]
            try:
                if job.address not in clients:
                    clients[job.address] = Client(job.address)
                client = clients[job.address]
                batches = server_batches(client, job)
                try:
                    result = consume(batches, PipeSignals(connection))
                finally:
                    batches.close()
                connection.send(("done", result))
            except StopWorker:
                raise
            except Exception:  # noqa: BLE001 - the coordinator raises it with this traceback
                connection.send(("error", traceback.format_exc()))
    except (EOFError, KeyboardInterrupt, StopWorker):
        return
    finally:
        for client in clients.values():
            client.close()


class ProcessConsumer:
    """The coordinator's handle on a client process running one stream."""

    def __init__(self, connection: Connection, job: StreamJob) -> None:
        self._connection = connection
        self._job = job
        connection.send(("stream", job))

    def _receive(self, expected: str) -> tuple:
        if not self._connection.poll(CONSUMER_TIMEOUT_SECONDS):
            raise TimeoutError(f"client (seed {self._job.seed}) sent no {expected!r}")
        message = self._connection.recv()
        if message[0] == "error":
            raise RuntimeError(
                f"client (seed {self._job.seed}, {self._job.transport}) failed:\n{message[1]}"
            )
        if message[0] != expected:
            raise RuntimeError(f"expected {expected!r} from a client, got {message[0]!r}")
        return message

    def wait_warm(self) -> None:
        self._receive("warm")

    def open_window(self, start: float, end: float) -> None:
        self._connection.send(("window", start, end))

    def result(self) -> ConsumerRound:
        return self._receive("done")[1]


class ClientPool:
    """`count` client processes (spawned: no fork of a process running gRPC threads)."""

    def __init__(self, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.connections: list[Connection] = []
        self.processes = []
        for index in range(count):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=client_worker, args=(theirs,), name=f"bench-client-{index}", daemon=True
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


# --- CPU accounting --------------------------------------------------------------------------


def machine_ticks() -> tuple[int, int, int]:
    """(total, idle incl. iowait, steal) clock ticks of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as handle:
        values = [int(value) for value in handle.readline().split()[1:]]
    idle = values[3] + values[4]
    steal = values[7] if len(values) > 7 else 0
    # guest and guest_nice (fields 9, 10) are already counted in user and nice.
    return sum(values[:8]), idle, steal


THREAD_ROLE = re.compile(r"(?:[-_][a-z]?\d+|\d+)$")


def thread_seconds() -> dict[str, float]:
    """CPU seconds of this process's threads so far, summed by role: the Python thread name
    without its trailing number (`augserve-opencv`, `augserve-rpc`, ...), or `native:` and
    the OS name for threads Python did not start (gRPC's, OpenCV's own pool: `native:python`)."""
    names = {thread.native_id: thread.name for thread in threading.enumerate()}
    ticks_per_second = os.sysconf("SC_CLK_TCK")
    roles: dict[str, float] = {}
    for task in os.scandir("/proc/self/task"):
        try:
            with open(f"{task.path}/stat", encoding="ascii", errors="replace") as handle:
                text = handle.read()
        except OSError:
            continue  # the thread ended
        os_name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        seconds = (int(fields[11]) + int(fields[12])) / ticks_per_second  # utime + stime
        name = names.get(int(task.name))
        role = f"native:{os_name}" if name is None else THREAD_ROLE.sub("", name) or name
        roles[role] = roles.get(role, 0.0) + seconds
    return roles


@dataclass(frozen=True)
class WindowCpu:
    """CPU seconds over one window: this process by thread role, and the machine."""

    seconds: float
    by_role: dict[str, float]
    machine_busy_cores: float  # all processes of the machine, in cores (1 = one core's time)
    machine_steal_cores: float  # time the hypervisor gave to other guests, in cores

    @property
    def process_seconds(self) -> float:
        return sum(self.by_role.values())


CpuSample = tuple[float, dict[str, float], tuple[int, int, int]]


def cpu_sample() -> CpuSample:
    return time.monotonic(), thread_seconds(), machine_ticks()


def window_cpu(before: CpuSample, after: CpuSample) -> WindowCpu:
    (time_before, roles_before, ticks_before) = before
    (time_after, roles_after, ticks_after) = after
    total = ticks_after[0] - ticks_before[0] or 1
    idle = ticks_after[1] - ticks_before[1]
    steal = ticks_after[2] - ticks_before[2]
    by_role = {
        role: value - roles_before.get(role, 0.0)
        for role, value in roles_after.items()
        if value - roles_before.get(role, 0.0) > 0
    }
    cores = os.cpu_count() or 1
    return WindowCpu(
        time_after - time_before, by_role, cores * (total - idle) / total, cores * steal / total
    )


def busy_cores(seconds: float) -> float:
    """Cores the whole machine kept busy over the next `seconds`."""
    total_before, idle_before, _ = machine_ticks()
    time.sleep(seconds)
    total_after, idle_after, _ = machine_ticks()
    total = total_after - total_before or 1
    return (os.cpu_count() or 1) * (total - (idle_after - idle_before)) / total


class QuietGate:
    """Holds each round back, within a budget, until other users of the machine are quiet."""

    def __init__(self, budget_seconds: float) -> None:
        self.budget_left = budget_seconds
        self.waited = 0.0
        self.rounds_started_busy = 0

    def wait(self) -> None:
        began = time.monotonic()
        deadline = began + min(QUIET_WAIT_SECONDS, self.budget_left)
        while busy_cores(QUIET_SAMPLE_SECONDS) > QUIET_CORES:
            if time.monotonic() >= deadline:
                self.rounds_started_busy += 1
                break
        waited = time.monotonic() - began
        self.waited += waited
        self.budget_left = max(0.0, self.budget_left - waited)


# --- one round, one cell ---------------------------------------------------------------------


@dataclass(frozen=True)
class Round:
    """One window of one cell. `client_processes`: the consumers ran in client processes (their
    CPU is theirs), not on threads of this process (their CPU is in `cpu`)."""

    consumers: tuple[ConsumerRound, ...]
    cpu: WindowCpu
    client_processes: bool

    @property
    def images_per_second(self) -> float:
        return sum(consumer.images_per_second for consumer in self.consumers)

    @property
    def other_cores(self) -> float:
        """Cores busy with work that is not this benchmark's (other users of the machine)."""
        ours = self.cpu.process_seconds / self.cpu.seconds
        if self.client_processes:
            ours += sum(c.cpu_seconds / c.seconds for c in self.consumers if c.seconds > 0)
        return max(0.0, self.cpu.machine_busy_cores - ours)


def run_round(consumers: Sequence[ThreadConsumer | ProcessConsumer], seconds: float) -> Round:
    """Wait until every consumer is warm, open one window of `seconds` for all, collect."""
    for consumer in consumers:
        consumer.wait_warm()
    start = time.monotonic() + WINDOW_LEAD_SECONDS
    end = start + seconds
    for consumer in consumers:
        consumer.open_window(start, end)
    time.sleep(max(0.0, start - time.monotonic()))
    before = cpu_sample()
    time.sleep(max(0.0, end - time.monotonic()))
    after = cpu_sample()
    results = tuple(consumer.result() for consumer in consumers)
    client_processes = all(isinstance(consumer, ProcessConsumer) for consumer in consumers)
    return Round(results, window_cpu(before, after), client_processes)


@dataclass
class Cell:
    """One (output side, batch size, consumers, way): `images_per_second` is the mean of its
    rounds' rates; `megabytes_per_second` the pixels those images hold."""

    side: int
    batch_size: int
    consumers: int
    way: str
    rounds: list[Round] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return float(np.mean([item.images_per_second for item in self.rounds]))

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
        if self.way == IN_PROCESS:
            return None
        consumers = [consumer for item in self.rounds for consumer in item.consumers]
        return 1e3 * sum(c.cpu_seconds for c in consumers) / sum(c.images for c in consumers)

    def role_ms_per_image(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for item in self.rounds:
            for role, seconds in item.cpu.by_role.items():
                totals[role] = totals.get(role, 0.0) + seconds
        images = self._images_in_windows()
        return {role: 1e3 * seconds / images for role, seconds in sorted(totals.items())}

    @property
    def other_cores(self) -> float:
        """Mean over rounds of the cores other work on the machine took (noise)."""
        return float(np.mean([item.other_cores for item in self.rounds]))

    @property
    def steal_cores(self) -> float:
        return float(np.mean([item.cpu.machine_steal_cores for item in self.rounds]))

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
            "rounds": [
                {
                    "images_per_second": item.images_per_second,
                    "consumers": [asdict(consumer) for consumer in item.consumers],
                    "cpu": asdict(item.cpu),
                }
                for item in self.rounds
            ],
        }


class Bench:
    """The server, the in-process backend and the client processes of one run."""

    def __init__(self, dataset_path: Path, manifest: Manifest, clients: ClientPool) -> None:
        cores = os.cpu_count() or 1
        self.manifest = manifest
        self.clients = clients
        self.backend = OpenCVBackend(cores)
        self.server: AugserveServer = create_server(
            ServerConfig(
                host="127.0.0.1",
                port=0,
                backend="opencv",
                threads=cores,
                datasets={DATASET_NAME: DatasetConfig(str(dataset_path))},
                limits=Limits(),
            )
        )

    def close(self) -> None:
        self.server.stop(grace=2.0)
        self.backend.close()

    def measure(
        self, way: str, side: int, batch_size: int, consumers: int, round_index: int, seconds: float
    ) -> Round:
        seeds = [SEED + 10 * round_index + index for index in range(consumers)]
        if way == IN_PROCESS:
            spec = AugmentSpec.from_dict(spec_dict(side))
            handles = [
                ThreadConsumer(
                    in_process_batches(self.backend, self.manifest, spec, batch_size, seed),
                    f"bench-loop-{index}",
                )
                for index, seed in enumerate(seeds)
            ]
        else:
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
            row = {way: Cell(side, batch_size, consumers, way) for way in WAYS}
            for round_index in range(config.rounds):
                order = WAYS if round_index % 2 == 0 else WAYS[::-1]
                for way in order:
                    gate.wait()
                    measured = bench.measure(
                        way, side, batch_size, consumers, round_index, round_seconds
                    )
                    row[way].rounds.append(measured)
            for way in WAYS:
                cell = row[way]
                rates = ", ".join(f"{item.images_per_second:.0f}" for item in cell.rounds)
                print(
                    f"  {side}×{side} batch {batch_size:3d}, {consumers} consumer(s), {way:13} "
                    f"{cell.images_per_second:7.0f} images/s (rounds: {rates}; "
                    f"other load {cell.other_cores:.2f} cores, steal {cell.steal_cores:.2f})",
                    file=sys.stderr,
                    flush=True,
                )
                cells.append(cell)
    return cells


# --- the data set ----------------------------------------------------------------------------


def make_dataset(root: Path, count: int = DATASET_IMAGES) -> Path:
    """`count` SOURCE_SIDE² JPEGs as an ImageFolder tree under `root`: square crops of random
    position and size (30–100 % of the photo's short side) of each sample photo, one class
    folder per photo."""
    import skimage.data  # only here: client processes need not import it

    rng = np.random.default_rng(0)
    photos = [getattr(skimage.data, name)() for name in SAMPLE_PHOTOS]
    dataset = root / "images"
    for index in range(count):
        pick = index % len(photos)
        photo = photos[pick]
        if photo.ndim == 2:
            photo = np.stack([photo] * 3, axis=-1)
        photo = photo[..., :3]
        height, width = photo.shape[:2]
        crop = int(min(height, width) * rng.uniform(0.3, 1.0))
        top, left = rng.integers(0, height - crop + 1), rng.integers(0, width - crop + 1)
        window = photo[top : top + crop, left : left + crop]
        image = cv2.resize(window, (SOURCE_SIDE, SOURCE_SIDE), interpolation=cv2.INTER_AREA)
        folder = dataset / SAMPLE_PHOTOS[pick]
        folder.mkdir(parents=True, exist_ok=True)
        bgr = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR)
        if not cv2.imwrite(
            str(folder / f"{index:05d}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
        ):
            raise RuntimeError(f"could not write a JPEG under {folder}")
    return dataset


# --- reporting -------------------------------------------------------------------------------


def machine_info() -> dict[str, object]:
    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }


def library_versions() -> dict[str, str]:
    versions = {}
    for package in (
        "augserve",
        "numpy",
        "opencv-python-headless",
        "grpcio",
        "protobuf",
        "scikit-image",
    ):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    versions["cv2"] = cv2.__version__
    return versions


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="timed seconds per cell (default 4; 1 with --quick)",
    )
    parser.add_argument(
        "--json", dest="json_path", default=None, help="also write raw numbers to this file"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke run: shapes {QUICK_SHAPES}, one round, 1 s per cell",
    )
    args = parser.parse_args(argv)
    if args.quick:
        return BenchConfig(args.seconds or 1.0, QUICK_SHAPES, 1, 10.0, args.json_path)
    return BenchConfig(args.seconds or 4.0, SHAPES, ROUNDS, QUIET_BUDGET_SECONDS, args.json_path)


def _exit_on_signal(number: int, frame: object) -> None:
    raise SystemExit(128 + number)


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_args(argv)
    # SIGTERM ends a run as Ctrl-C does: the server, the client processes and the temporary
    # folder are cleaned up on the way out.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    machine = machine_info()
    versions = library_versions()
    began = time.monotonic()
    clients = ClientPool(max(CONSUMER_COUNTS))
    try:
        with tempfile.TemporaryDirectory(prefix="augserve-bench-") as folder:
            # The server's manifest cache goes to the temporary folder, not ~/.cache.
            os.environ["AUGSERVE_CACHE"] = str(Path(folder) / "cache")
            dataset_path = make_dataset(Path(folder))
            manifest = load_manifest(dataset_path)
            cells_count = len(config.shapes) * len(CONSUMER_COUNTS) * len(WAYS)
            print(
                f"Measuring {cells_count} cells of {config.seconds:g} s "
                f"({config.rounds} round(s) each)...",
                file=sys.stderr,
                flush=True,
            )
            bench = Bench(dataset_path, manifest, clients)
            gate = QuietGate(config.quiet_budget_seconds)
            try:
                cells = run_benchmark(config, bench, gate)
            finally:
                bench.close()
    finally:
        clients.close()
    elapsed = time.monotonic() - began

    print(
        f"Machine: {machine['cpu_count']} CPUs ({machine['cpu_model']}), {machine['platform']}, "
        f"Python {machine['python']}"
    )
    print("Versions: " + ", ".join(f"{name} {value}" for name, value in versions.items()))
    print(
        f"Data: {DATASET_IMAGES} JPEGs {SOURCE_SIDE}×{SOURCE_SIDE} q{JPEG_QUALITY}; spec: "
        "random_resized_crop + flip + brightness; server: OpenCV backend, "
        f"{os.cpu_count()} threads, prefetch {Limits().default_prefetch}; "
        "clients: one process each (spawn)."
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
                "side": SOURCE_SIDE,
                "jpeg_quality": JPEG_QUALITY,
            },
            "specs": {
                side: spec_dict(side) for side in sorted({side for side, _ in config.shapes})
            },
            "targets": TARGETS,
            "quiet_wait": {"seconds": gate.waited, "rounds_started_busy": gate.rounds_started_busy},
            "elapsed_seconds": elapsed,
            "cells": [cell.to_json() for cell in cells],
        }
        with open(config.json_path, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2, ensure_ascii=False)
            handle.write("\n")


if __name__ == "__main__":
    main()
