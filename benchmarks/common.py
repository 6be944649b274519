"""What the benchmarks share: the sample-photo data set, the machine and version report, and the
machinery that measures consumers of batches in common windows (bench_transport and
bench_groups).

The scripts run as `python benchmarks/NAME.py`, which puts this folder on sys.path; spawned
client processes inherit it and import this module as `common`, so the jobs and the worker they
receive are defined here, not in a script's `__main__`.

A round, as `run_round` takes it: every consumer takes WARMUP_BATCHES batches and
WARMUP_SECONDS, then one common window opens; a consumer's rate is the images of its batches
after the first one finished in the window, over the time from that first to its last batch
finished in the window (a consumer with fewer than MIN_COUNTED_BATCHES after the first goes on
past the window until it has them). Every consumer touches what it receives: one byte of every
64-byte cache line, summed, so all of the batch crosses the memory bus but nothing is written.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import multiprocessing
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from augserve.backends.batch import SourceImage, augment_batch
from augserve.backends.opencv import DECODE_FLAGS, OpenCVBackend, run_samples
from augserve.client import Client
from augserve.core.images import HeaderCache
from augserve.core.plan import make_plan
from augserve.core.spec import AugmentSpec
from augserve.data.datasets import Manifest, epoch_order, load_manifest
from augserve.rpc.server import AugserveServer, DatasetConfig, ServerConfig, create_server
from augserve.streaming.limits import Limits

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
JPEG_QUALITY = 90
DATASET_NAME = "bench"
WARMUP_BATCHES = 2
MIN_COUNTED_BATCHES = 2
WARMUP_SECONDS = 0.5
# Gap between the last consumer reporting warm and the window opening.
WINDOW_LEAD_SECONDS = 0.05
# A consumer that takes this long for warm-up or one window is reported as failed.
CONSUMER_TIMEOUT_SECONDS = 120.0
CACHE_LINE_BYTES = 64
# Before each round, wait until the machine's busy time (all of it someone else's: between
# rounds a run is idle) is at most QUIET_CORES over a QUIET_SAMPLE_SECONDS sample, for at most
# QUIET_WAIT_SECONDS per round and the run's budget in all.
QUIET_CORES = 0.25
QUIET_SAMPLE_SECONDS = 0.25
QUIET_WAIT_SECONDS = 10.0


def spec_dict(side: int) -> dict:
    """The spec of bench_transport and bench_groups for `side`×`side` outputs, as
    `AugmentSpec.from_dict` takes it."""
    return {
        "ops": [
            {"random_resized_crop": {"size": side}},
            {"flip": {"horizontal": 0.5}},
            {"brightness": {"factor": 0.2}},
        ]
    }


def check_range(name: str, value: float, low: float, high: float) -> None:
    """Raise ValueError naming `name` unless low <= value <= high."""
    if not low <= value <= high:
        kind = "an integer" if isinstance(low, int) and isinstance(high, int) else "a number"
        raise ValueError(f"{name}: expected {kind} in [{low}, {high}], got {value}")


# --- the data set ----------------------------------------------------------------------------


def make_dataset(root: Path, count: int, sides: tuple[int, int] = (256, 256)) -> Path:
    """`count` JPEGs (quality JPEG_QUALITY) as an ImageFolder tree under `root`, one class folder
    per sample photo. Each image's width and height are drawn from [sides[0], sides[1]] pixels
    (both sides[0] when the two are equal); its pixels are a window of that aspect, 50–100 % of
    the largest that fits, at a random place in its photo, resized."""
    import skimage.data  # only here: client processes need not import it

    low, high = sides
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
        height, width = (int(side) for side in rng.integers(low, high + 1, size=2))
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


# --- the machine, versions, arguments, output ------------------------------------------------


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


def library_versions(packages: Sequence[str]) -> dict[str, str]:
    """Installed versions of `packages` (distribution names), then OpenCV's own as `cv2`."""
    versions = {}
    for package in packages:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    versions["cv2"] = cv2.__version__
    return versions


def print_machine(machine: dict[str, object], versions: dict[str, str]) -> None:
    print(
        f"Machine: {machine['cpu_count']} CPUs ({machine['cpu_model']}), {machine['platform']}, "
        f"Python {machine['python']}"
    )
    print("Versions: " + ", ".join(f"{name} {value}" for name, value in versions.items()))


def window_arguments(
    argv: Sequence[str] | None,
    description: str,
    seconds: float,
    quick_seconds: float,
    quick_what: str,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """--seconds (default `seconds`, or `quick_seconds` with --quick), --json and --quick (a
    smoke run: `quick_what`, one round) of a window benchmark; `add_arguments` adds a script's
    own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help=(
            f"timed seconds per cell, split into rounds (default {seconds:g}; "
            f"{quick_seconds:g} with --quick)"
        ),
    )
    parser.add_argument(
        "--json", dest="json_path", default=None, help="also write raw numbers to this file"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke run: {quick_what}, one round, {quick_seconds:g} s per cell",
    )
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = quick_seconds if args.quick else seconds
    return args


def write_json(path: str, report: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def exit_on_signal(number: int, frame: object) -> None:
    """A SIGTERM handler that ends a run as Ctrl-C does, so `finally` blocks clean up."""
    raise SystemExit(128 + number)


# --- the server ------------------------------------------------------------------------------


def server_config(dataset_path: Path) -> ServerConfig:
    """127.0.0.1 (a free port), the OpenCV backend on every core, `dataset_path` served as
    DATASET_NAME."""
    return ServerConfig(
        host="127.0.0.1",
        port=0,
        backend="opencv",
        threads=os.cpu_count() or 1,
        datasets={DATASET_NAME: DatasetConfig(str(dataset_path))},
        limits=Limits(),
    )


def start_server(dataset_path: Path) -> AugserveServer:
    """A server of `server_config(dataset_path)`, started."""
    return create_server(server_config(dataset_path))


def start_server_with_link(dataset_path: Path, link: ShapedLink) -> tuple[AugserveServer, str]:
    """A server of `server_config(dataset_path)` that also listens on the server end of `link`
    (gRPC binds when the port is added, so the socket is made inside the link's server
    namespace); the server and that address."""
    server = AugserveServer(server_config(dataset_path))
    with in_network_namespace(link.server_namespace):
        port = server.grpc_server.add_insecure_port(f"{LINK_SERVER_ADDRESS}:0")
    if port == 0:
        server.stop(grace=0)
        raise OSError(f"cannot bind {LINK_SERVER_ADDRESS} in {link.server_namespace}")
    return server.start(), f"{LINK_SERVER_ADDRESS}:{port}"


# --- a shaped link between two network namespaces ---------------------------------------------

CLONE_NEWNET = 0x40000000  # setns(2): the descriptor names a network namespace
# Addresses of the two ends; they exist only inside the link's own namespaces.
LINK_SERVER_ADDRESS = "10.213.0.1"
LINK_CLIENT_ADDRESS = "10.213.0.2"
LINK_PREFIX_LENGTH = 30
# tc's token-bucket filter: a bucket of 4 ms at the rate (at least 64 KiB) and a queue of 50 ms.
LINK_BURST_SECONDS = 0.004
LINK_LATENCY = "50ms"
IP_TIMEOUT_SECONDS = 10.0


class LinkUnavailable(Exception):
    """The shaped link could not be set up here; the text says why."""


def _join_namespace(descriptor: int) -> None:
    """setns(2) the calling thread into the network namespace `descriptor` names."""
    if hasattr(os, "setns"):  # Python 3.12 and later
        os.setns(descriptor, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(descriptor, CLONE_NEWNET) != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"setns: {os.strerror(number)}")


def enter_network_namespace(name: str) -> None:
    """Move the calling thread into the namespace `ip netns` calls `name`; threads it starts
    afterwards, and sockets it makes, are there too."""
    descriptor = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _join_namespace(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def in_network_namespace(name: str) -> Iterator[None]:
    """The calling thread in namespace `name` for the block, then back in its own; sockets
    made in the block stay in `name`."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        enter_network_namespace(name)
        try:
            yield
        finally:
            _join_namespace(own)
    finally:
        os.close(own)


def _ip(*arguments: str) -> None:
    """Run iproute2's `ip` (or `tc` when the first argument is "tc"); CalledProcessError with
    its stderr when it fails."""
    command = list(arguments) if arguments[0] == "tc" else ["ip", *arguments]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=IP_TIMEOUT_SECONDS)


def rate_bits_per_second(rate: str) -> float:
    """Bits per second of a rate in tc's units ("10gbit", "500mbit")."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for unit, factor in units.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * factor
    raise ValueError(f"rate {rate!r}: expected a number and kbit, mbit or gbit")


class ShapedLink:
    """Two network namespaces of this run (the server's end and the clients' end) joined by a
    veth pair made inside them, with addresses LINK_SERVER_ADDRESS and LINK_CLIENT_ADDRESS that
    exist only there. `shape(rate)` puts a token-bucket filter of `rate` ("10gbit", tc's units)
    on both ends, `shape(None)` takes it off; `close()` deletes both namespaces and with them the
    pair. Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2; `LinkUnavailable` says why
    when it cannot be made."""

    def __init__(self, tag: str) -> None:
        """`tag` (at most 12 letters or digits, e.g. the process id) names both namespaces and
        both ends."""
        self.server_namespace = f"augbench-{tag}-server"
        self.client_namespace = f"augbench-{tag}-client"
        # Interface names have at most 15 characters.
        self._server_device = f"ab{tag}s"
        self._client_device = f"ab{tag}c"
        self.rate: str | None = None
        self._made: list[str] = []
        try:
            for namespace in (self.server_namespace, self.client_namespace):
                _ip("netns", "add", namespace)
                self._made.append(namespace)
            _ip(
                "link", "add", self._server_device, "netns", self.server_namespace, "type", "veth",
                "peer", "name", self._client_device, "netns", self.client_namespace,
            )  # fmt: skip
            for namespace, device, address in self._ends():
                prefixed = f"{address}/{LINK_PREFIX_LENGTH}"
                _ip("-n", namespace, "addr", "add", prefixed, "dev", device)
                _ip("-n", namespace, "link", "set", device, "up")
                _ip("-n", namespace, "link", "set", "lo", "up")
        except subprocess.CalledProcessError as error:
            self.close()
            command = " ".join(error.cmd)
            raise LinkUnavailable(f"`{command}` failed: {error.stderr.strip()}") from None
        except (OSError, subprocess.TimeoutExpired) as error:  # no `ip`, or it hung
            self.close()
            raise LinkUnavailable(str(error)) from None

    def _ends(self) -> tuple[tuple[str, str, str], ...]:
        return (
            (self.server_namespace, self._server_device, LINK_SERVER_ADDRESS),
            (self.client_namespace, self._client_device, LINK_CLIENT_ADDRESS),
        )

    def shape(self, rate: str | None) -> None:
        if rate == self.rate:
            return
        for namespace, device, _ in self._ends():
            if rate is None:
                _ip("tc", "-n", namespace, "qdisc", "del", "dev", device, "root")
                continue
            burst = max(64 << 10, int(rate_bits_per_second(rate) / 8 * LINK_BURST_SECONDS))
            _ip(
                "tc", "-n", namespace, "qdisc", "replace", "dev", device, "root", "tbf",
                "rate", rate, "burst", str(burst), "latency", LINK_LATENCY,
            )  # fmt: skip
        self.rate = rate

    def close(self) -> None:
        for namespace in reversed(self._made):
            # Whatever fails here, the other namespace still goes.
            subprocess.run(
                ["ip", "netns", "del", namespace],
                check=False,
                capture_output=True,
                timeout=IP_TIMEOUT_SECONDS,
            )
        self._made.clear()


@dataclass(frozen=True)
class ServerCounters:
    """A server's counters at one moment (cumulative since it started), or the change over a
    window."""

    batches_produced: int
    batches_delivered: int
    images_delivered: int

    def __sub__(self, other: ServerCounters) -> ServerCounters:
        return ServerCounters(
            self.batches_produced - other.batches_produced,
            self.batches_delivered - other.batches_delivered,
            self.images_delivered - other.images_delivered,
        )


def server_counters(server: AugserveServer) -> ServerCounters:
    counted = server.manager.counters.snapshot()
    return ServerCounters(counted.batches_produced, counted.batches_delivered, counted.images_delivered)


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


def read_plainly(manifest: Manifest, sample_ids: Sequence[int]) -> list[SourceImage]:
    """The samples' files read with a plain open and read, each with its identity (byte size,
    modification time in ns): the least a loader of files does."""
    sources = []
    for sample_id in sample_ids:
        path = manifest.path(sample_id)
        with open(path, "rb") as handle:
            status = os.fstat(handle.fileno())
            identity = (status.st_size, status.st_mtime_ns)
            data = handle.read()
        label = int(manifest.labels[sample_id])
        sources.append(SourceImage(sample_id, label, path, data, identity))
    return sources


def in_process_batches(
    backend: OpenCVBackend,
    manifest: Manifest,
    spec: AugmentSpec,
    batch_size: int,
    seed: int,
    headers: HeaderCache,
) -> Iterator[np.ndarray]:
    """Endless batches of `manifest`, as a server producer makes them: read the files, then
    `augment_batch` into one reused output array, checking each file's header once (`headers`,
    keyed by the file's size and modification time, as the server's producers share one)."""
    side = spec.fixed_output_size
    out = np.empty((batch_size, *side, 3), np.uint8)
    ids = np.arange(len(manifest), dtype=np.int64)
    epoch = 0
    while True:
        order = epoch_order(ids, seed, epoch, 0, 1, shuffle=True)
        for position in range(0, len(order) - batch_size + 1, batch_size):
            sources = read_plainly(manifest, order[position : position + batch_size].tolist())
            yield augment_batch(
                backend, spec, seed, epoch, sources, out=out, headers=headers
            ).images
        epoch += 1


def bare_batches(
    pool: ThreadPoolExecutor,
    threads: int,
    manifest: Manifest,
    spec: AugmentSpec,
    batch_size: int,
    seed: int,
) -> Iterator[np.ndarray]:
    """Endless batches of `manifest` made with the least a producer does: read the batch's
    files (`read_plainly`), then `cv2.imdecode` (the backend's flags) and one `cv2.warpAffine`
    per image into one reused output array, as `threads` tasks on `pool` that each take the next
    image until none is left (`run_samples`, as the OpenCV backend runs a batch).

    No header checks, no plans, no bad-image handling: each sample's warp is its plan's for
    epoch 0, drawn before the first batch, so the pixel work is that of `augment_batch` for the
    same spec (which must have no colour or erasing ops)."""
    side = spec.fixed_output_size
    out = np.empty((batch_size, *side, 3), np.uint8)
    ids = np.arange(len(manifest), dtype=np.int64)
    warps = {}
    for source in read_plainly(manifest, ids.tolist()):
        image = cv2.imdecode(np.frombuffer(source.data, np.uint8), cv2.IMREAD_COLOR_RGB)
        plan = make_plan(spec, seed, 0, source.sample_id, image.shape[:2])
        if plan.color is not None or plan.erase_steps or plan.pixel_steps:
            raise ValueError("bare_batches runs warps only: the spec has colour, pixel or erasing ops")
        warps[source.sample_id] = plan.warp
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    size = (side[1], side[0])  # (width, height), as OpenCV takes it

    def work(sources: list[SourceImage], index: int) -> None:
        source = sources[index]
        image = cv2.imdecode(np.frombuffer(source.data, np.uint8), DECODE_FLAGS)
        cv2.warpAffine(image, warps[source.sample_id], size, dst=out[index], flags=flags)

    epoch = 0
    while True:
        order = epoch_order(ids, seed, epoch, 0, 1, shuffle=True)
        for position in range(0, len(order) - batch_size + 1, batch_size):
            sources = read_plainly(manifest, order[position : position + batch_size].tolist())
            failures = run_samples(pool, threads, len(sources), partial(work, sources))
            if failures:
                raise RuntimeError(f"the bare loop failed on {failures}")
            yield out
        epoch += 1


# --- jobs for client processes ---------------------------------------------------------------


class WorkerResources:
    """What a client process keeps from one job to the next: a Client per server address, a
    Manifest per data set folder, the header checks of the files its own loaders read."""

    def __init__(self) -> None:
        self._clients: dict[str, Client] = {}
        self._manifests: dict[str, Manifest] = {}
        self.headers = HeaderCache()

    def client(self, address: str) -> Client:
        if address not in self._clients:
            self._clients[address] = Client(address)
        return self._clients[address]

    def manifest(self, dataset_path: str) -> Manifest:
        if dataset_path not in self._manifests:
            self._manifests[dataset_path] = load_manifest(dataset_path, use_cache=False)
        return self._manifests[dataset_path]

    def close(self) -> None:
        for client in self._clients.values():
            client.close()


@dataclass(frozen=True)
class StreamJob:
    """One stream from a server for one round. `transport` is "shared_memory" or "inband";
    `group_size`, `group_policy`, `compression` and `decode_group_size` go to `Client.stream`
    as they are;
    `expect_shared`: whether the server must call the stream shared (the round fails otherwise:
    with it False, streams meant to run apart must differ in seed or ask for
    `group_policy="alone"`)."""

    address: str
    dataset: str
    spec: dict
    batch_size: int
    seed: int
    transport: str
    group_size: int = 0
    group_policy: str = "lockstep"
    expect_shared: bool = False
    compression: str = "none"
    decode_group_size: int = 0

    @property
    def label(self) -> str:
        codec = "" if self.compression == "none" else f" {self.compression}"
        return f"seed {self.seed}, {self.transport}{codec}"

    def batches(self, resources: WorkerResources) -> Iterator[np.ndarray]:
        """Endless batches of the stream; the stream closes when the generator does."""
        with resources.client(self.address).stream(
            self.dataset,
            spec=AugmentSpec.from_dict(self.spec),
            batch_size=self.batch_size,
            seed=self.seed,
            epochs=0,
            transport=self.transport,
            group_size=self.group_size,
            group_policy=self.group_policy,
            compression=self.compression,
            decode_group_size=self.decode_group_size,
        ) as stream:
            if stream.facts.transport != self.transport:
                raise RuntimeError(
                    f"asked for {self.transport}, the server chose {stream.facts.transport}"
                )
            if stream.facts.shared != self.expect_shared:
                raise RuntimeError(
                    f"the server says shared={stream.facts.shared}, expected {self.expect_shared}"
                )
            for batch in stream:
                yield batch.images


@dataclass(frozen=True)
class LoaderJob:
    """One round of an experiment that augments its own data, no server: `in_process_batches`
    on an OpenCVBackend of the process's own with every core."""

    dataset_path: str
    spec: dict
    batch_size: int
    seed: int

    @property
    def label(self) -> str:
        return f"seed {self.seed}, own loader"

    def batches(self, resources: WorkerResources) -> Iterator[np.ndarray]:
        backend = OpenCVBackend(os.cpu_count() or 1)
        try:
            yield from in_process_batches(
                backend,
                resources.manifest(self.dataset_path),
                AugmentSpec.from_dict(self.spec),
                self.batch_size,
                self.seed,
                resources.headers,
            )
        finally:
            backend.close()


Job = StreamJob | LoaderJob


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


def client_worker(connection: Connection, network_namespace: str | None = None) -> None:
    """A client process: runs one Job per ("stream", job) message until ("stop",), in
    `network_namespace` when one is named (entered before any socket is made)."""
    if network_namespace is not None:
        enter_network_namespace(network_namespace)
    resources = WorkerResources()
    try:
        while True:
            message = connection.recv()
            if message[0] == "stop":
                return
            job: Job = message[1]
            try:
                batches = job.batches(resources)
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
        resources.close()


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


class ProcessConsumer:
    """The coordinator's handle on a client process running one job."""

    def __init__(self, connection: Connection, job: Job) -> None:
        self._connection = connection
        self._job = job
        connection.send(("stream", job))

    def _receive(self, expected: str) -> tuple:
        if not self._connection.poll(CONSUMER_TIMEOUT_SECONDS):
            raise TimeoutError(f"client ({self._job.label}) sent no {expected!r}")
        message = self._connection.recv()
        if message[0] == "error":
            raise RuntimeError(f"client ({self._job.label}) failed:\n{message[1]}")
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
    """`count` client processes running `client_worker` (spawned: no fork of a process running
    gRPC threads), named `name`-0, `name`-1, ..., in `network_namespace` when one is named."""

    def __init__(
        self, count: int, name: str = "bench-client", network_namespace: str | None = None
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self.connections: list[Connection] = []
        self.processes = []
        for index in range(count):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=client_worker,
                args=(theirs, network_namespace),
                name=f"{name}-{index}",
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


# --- rounds and cells ------------------------------------------------------------------------


@dataclass(frozen=True)
class Round:
    """One window of one cell. `client_processes`: the consumers ran in client processes (their
    CPU is theirs), not on threads of this process (their CPU is in `cpu`). `counters`: the
    server's counters over the window, where the round read them."""

    consumers: tuple[ConsumerRound, ...]
    cpu: WindowCpu
    client_processes: bool
    counters: ServerCounters | None = None

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

    def to_json(self) -> dict:
        report: dict[str, object] = {"images_per_second": self.images_per_second}
        if self.counters is not None:
            report["counters"] = asdict(self.counters)
        report["consumers"] = [asdict(consumer) for consumer in self.consumers]
        report["cpu"] = asdict(self.cpu)
        return report


class Consumer(Protocol):
    """The coordinator's side of a consumer (ThreadConsumer, ProcessConsumer)."""

    def wait_warm(self) -> None: ...

    def open_window(self, start: float, end: float) -> None: ...

    def result(self) -> ConsumerRound: ...


def run_round(
    consumers: Sequence[Consumer],
    seconds: float,
    read_counters: Callable[[], ServerCounters] | None = None,
) -> Round:
    """Wait until every consumer is warm, open one window of `seconds` for all, collect.
    `read_counters`, if given, is read beside the CPU samples at the window's edges."""
    for consumer in consumers:
        consumer.wait_warm()
    start = time.monotonic() + WINDOW_LEAD_SECONDS
    end = start + seconds
    for consumer in consumers:
        consumer.open_window(start, end)
    time.sleep(max(0.0, start - time.monotonic()))
    before = cpu_sample()
    counters_before = read_counters() if read_counters else None
    time.sleep(max(0.0, end - time.monotonic()))
    after = cpu_sample()
    counters_after = read_counters() if read_counters else None
    results = tuple(consumer.result() for consumer in consumers)
    client_processes = all(isinstance(consumer, ProcessConsumer) for consumer in consumers)
    counters = (
        counters_after - counters_before
        if counters_after is not None and counters_before is not None
        else None
    )
    return Round(results, window_cpu(before, after), client_processes, counters)


def measure_row(
    ways: Sequence[str], rounds: int, gate: QuietGate, measure: Callable[[str, int], Round]
) -> dict[str, list[Round]]:
    """`rounds` rounds of each of `ways` (one row of a table), taken in turn, the order reversed
    every other round, each after `gate`: load that comes and goes hits every way alike.
    `measure(way, round_index)` runs one round."""
    measured: dict[str, list[Round]] = {way: [] for way in ways}
    for round_index in range(rounds):
        for way in ways if round_index % 2 == 0 else ways[::-1]:
            gate.wait()
            measured[way].append(measure(way, round_index))
    return measured


class RoundsSummary:
    """What a cell's rounds add up to; mixed into a cell dataclass that holds `rounds`."""

    rounds: list[Round]

    @property
    def images_per_second(self) -> float:
        """Mean over rounds of the consumers' summed images/s."""
        return float(np.mean([item.images_per_second for item in self.rounds]))

    @property
    def other_cores(self) -> float:
        """Mean over rounds of the cores other users of the machine took (noise)."""
        return float(np.mean([item.other_cores for item in self.rounds]))

    @property
    def steal_cores(self) -> float:
        return float(np.mean([item.cpu.machine_steal_cores for item in self.rounds]))

    @property
    def consumer_ms_per_image(self) -> float:
        """The consumers' own processes' CPU per image they took (meaningful where they ran in
        client processes)."""
        consumers = [consumer for item in self.rounds for consumer in item.consumers]
        return 1e3 * sum(c.cpu_seconds for c in consumers) / sum(c.images for c in consumers)

    def role_seconds(self) -> dict[str, float]:
        """This process's CPU seconds in the windows by thread role, sorted by role."""
        totals: dict[str, float] = {}
        for item in self.rounds:
            for role, seconds in item.cpu.by_role.items():
                totals[role] = totals.get(role, 0.0) + seconds
        return dict(sorted(totals.items()))

    def rounds_text(self) -> str:
        """The rounds' rates for a progress line: "812, 790"."""
        return ", ".join(f"{item.images_per_second:.0f}" for item in self.rounds)


def announce(cells: int, seconds: float, rounds: int) -> None:
    print(
        f"Measuring {cells} cells of {seconds:g} s ({rounds} round(s) each)...",
        file=sys.stderr,
        flush=True,
    )


class WindowConfig(Protocol):
    """What `WindowRun.publish` reads of a script's configuration (a dataclass)."""

    seconds: float
    rounds: int
    json_path: str | None


class WindowRun:
    """One run of a window benchmark, as a context: SIGTERM ends it as Ctrl-C does, `clients`
    client processes, a temporary `folder` for the data set and the server's manifest cache,
    the quiet gate; on the way out the folder and the processes go, whatever happened. Then it
    prints and writes the report's head and tail."""

    def __init__(
        self,
        packages: Sequence[str],
        clients: int,
        client_name: str,
        folder_prefix: str,
        quiet_budget_seconds: float,
    ) -> None:
        self.machine = machine_info()
        self.versions = library_versions(packages)
        self.gate = QuietGate(quiet_budget_seconds)
        self._client_count = clients
        self._client_name = client_name
        self._folder_prefix = folder_prefix
        self._stack = contextlib.ExitStack()
        self._began = 0.0
        self.elapsed = 0.0

    def __enter__(self) -> WindowRun:
        signal.signal(signal.SIGTERM, exit_on_signal)
        self._began = time.monotonic()
        with contextlib.ExitStack() as stack:
            self.clients = ClientPool(self._client_count, self._client_name)
            stack.callback(self.clients.close)
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix=self._folder_prefix))
            self.folder = Path(folder)
            # The server's manifest cache goes to the temporary folder, not ~/.cache.
            os.environ["AUGSERVE_CACHE"] = str(self.folder / "cache")
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()
        self.elapsed = time.monotonic() - self._began

    def publish(
        self,
        config: WindowConfig,
        setup: str,
        tables: str,
        targets: Sequence[str],
        details: dict,
        cells: list[dict],
    ) -> None:
        """Print the report (machine, versions, `setup`, timing, `tables`, `targets`) and, where
        `config.json_path` names a file, write it as JSON: machine, versions, `config`, the
        script's `details`, the quiet gate's waiting, the run's duration, `cells`."""
        print_machine(self.machine, self.versions)
        print(setup)
        print(
            f"{config.seconds:g} s per cell as {config.rounds} round(s), ways interleaved; "
            f"run took {self.elapsed:.0f} s, of which {self.gate.waited:.0f} s waiting for other "
            f"load to pass ({self.gate.rounds_started_busy} round(s) started with the machine "
            "busy)."
        )
        print()
        print(tables)
        print()
        for line in targets:
            print(line)
        if config.json_path:
            report = {
                "machine": self.machine,
                "versions": self.versions,
                "config": asdict(config),
                **details,
                "quiet_wait": {
                    "seconds": self.gate.waited,
                    "rounds_started_busy": self.gate.rounds_started_busy,
                },
                "elapsed_seconds": self.elapsed,
                "cells": cells,
            }
            write_json(config.json_path, report)
