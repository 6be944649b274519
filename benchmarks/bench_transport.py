"""Delivered images per second through augserve's transports: a real server to clients over
shared memory and in-band gRPC (on 127.0.0.1, and over a link shaped to 10 and 1 Gbit/s between
two network namespaces), against the rate the same backend produces in process; and the
producer's own overhead against a bare decode-and-warp loop. Side by side in one run.

    python benchmarks/bench_transport.py [--seconds S] [--rounds N] [--json PATH] [--quick]
                                         [--suite all|transport|producer|compression] [--no-link]

Transport suite: ways, each for 1 and 2 concurrent consumers:
- in-process: `augment_batch` on an `OpenCVBackend` with every core, in a loop that reads the
  batch's files, checks each file's header once (a HeaderCache for the run) and writes into
  one reused output array, as a server producer does. Two consumers are two such loops on
  threads sharing the backend and the cache, as two producers share them in the server. No
  gRPC, no server: the rate the backend can produce.
- shared memory / in-band: one server (`create_server`, OpenCV backend, every core) in this
  process on 127.0.0.1; each consumer is a client in its own process (multiprocessing, spawn),
  so a client's Python work never waits for the server's GIL. Two clients use different seeds,
  so the server runs them on two producers instead of grouping them onto one.
- in-band over 10gbit / 1gbit (224×224 rows): the same server also listens on one end of a
  veth pair between two network namespaces this run creates (`ShapedLink`: addresses that
  exist only inside them, a tc token-bucket filter of the rate on both ends, MTU 1500); the
  clients are processes inside the other namespace. Needs root; without it (or with --no-link)
  these cells are skipped and the report says why. No compression in this suite.

Producer suite (224×224, batch 64, spec rotate ±20° + horizontal flip + random crop to 224 on
256×256 photographs): a bare loop (`bare_batches`: plain file reads, then `cv2.imdecode` and
one `cv2.warpAffine` per image on a pool of every core, warps drawn before the loop), the
in-process `augment_batch` loop above, and the server over shared memory, for 1 and 2
consumers. The bare loop is the pixel work alone; the gap to it is what the producer adds
(reading files safely, header checks, plans, the pool's hand-offs, the session).

Compression suite (224×224, batch 64, the transport spec, one client): in-band with each codec
at its default level (`Client.stream(compression=...)`: none, lz4, zstd) side by side, over
127.0.0.1 and over the shaped link at COMPRESSION_LINK_RATES where there is one. Besides the
rates: the compression ratio (pixel bytes over bytes sent) and the server's CPU spent encoding,
both counted by wrapping `ChunkEncoder.encode` in this process for the run (CPU by
`time.thread_time` of the sending thread, over every chunk of the round, warm-up included), and
the client's CPU per image against the uncompressed cell (decoding, less the receiving that
fewer bytes spare). Then a micro-measurement on one thread, no gRPC: MICRO_BATCHES batches of
the same augmented outputs (224×224 of the photographs below), cut into chunks as the server
cuts them, each encoded with `ChunkEncoder` and decoded into place with `ChunkDecoder` (the
server's and the client's own code) for each (codec, level) of MICRO_LEVELS: ratio, and MB/s and
ms per image of one core's CPU time for encoding and decoding ("none": the copies raw chunks
take).

Every consumer touches what it receives: it reads one byte of every 64-byte cache line of the
batch and sums them, so all of the data crosses the memory bus, as a copy would, but nothing is
written. A batch counts when its touch is done.

Data: 512 JPEGs (quality 90, 256×256) cut from scikit-image's sample photos, in an ImageFolder
tree in a temporary folder. Transport spec: `random_resized_crop` to the output size,
horizontal flip (p=0.5), brightness ±0.2. Outputs [N, H, W, 3] uint8; MB = 10⁶ bytes of pixels
delivered.

Timing. A cell is one (suite, output size, batch size, consumers, way). Its `--seconds` are
split into ROUNDS rounds, taken in turn with the other ways of its row (the order reversed every
other round). A round opens fresh streams, lets every consumer take WARMUP_BATCHES batches and
WARMUP_SECONDS, then opens one common window; each consumer's rate is the images of its
batches after the first one finished in the window, over the time from that first to its last
batch finished in the window (a consumer with fewer than MIN_COUNTED_BATCHES after the first
goes on past the window until it has them). A cell's rate is the mean over rounds of the
consumers' summed rates. The machine may be shared: before each round the run waits, within a
budget, until other users of the machine are quiet (QuietGate). The machinery (consumers,
rounds, CPU accounting, the quiet gate, the data set, the shaped link) is in common.py, shared
with bench_groups.

CPU accounting over each window: this process (the server, or the in-process loops) by thread
role from /proc/self/task, the client processes by `time.process_time`, and the whole
machine from /proc/stat. "Other load" is the machine's busy time less this run's own: work of
other users of the machine during the window, which the numbers of that cell suffered.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

# common sits beside this file: `python benchmarks/bench_transport.py` puts this folder on
# sys.path, and spawned client processes inherit it.
from common import (
    DATASET_NAME,
    JPEG_QUALITY,
    ClientPool,
    LinkUnavailable,
    ProcessConsumer,
    QuietGate,
    Round,
    RoundsSummary,
    ShapedLink,
    StreamJob,
    ThreadConsumer,
    WindowRun,
    announce,
    bare_batches,
    check_range,
    in_process_batches,
    make_dataset,
    measure_row,
    rate_bits_per_second,
    run_round,
    spec_dict,
    start_server,
    start_server_with_link,
    window_arguments,
)

from augserve.backends.opencv import OpenCVBackend
from augserve.core.images import HeaderCache
from augserve.core.spec import AugmentSpec
from augserve.data.datasets import Manifest, load_manifest
from augserve.rpc.compression import ChunkDecoder, ChunkEncoder, Compression
from augserve.rpc.messages import DEFAULT_CHUNK_BYTES
from augserve.rpc.server import AugserveServer
from augserve.streaming.limits import Limits

# (output side in pixels, images per batch), in the order they are measured.
SHAPES = ((224, 64), (224, 256), (64, 256), (64, 64))
QUICK_SHAPES = ((224, 64), (64, 256))
CONSUMER_COUNTS = (1, 2)
TRANSPORT = "transport"
PRODUCER = "producer"
COMPRESSION = "compression"
SUITES = (TRANSPORT, PRODUCER, COMPRESSION)
IN_PROCESS = "in-process"
SHARED_MEMORY = "shared_memory"
INBAND = "inband"
BARE = "bare loop"
WAYS = (IN_PROCESS, SHARED_MEMORY, INBAND)
# Rates of the shaped link (tc's units) and the output sides whose rows also run over it.
LINK_RATES = ("10gbit", "1gbit")
LINK_SIDES = (224,)
PRODUCER_WAYS = (BARE, IN_PROCESS, SHARED_MEMORY)
PRODUCER_SHAPE = (224, 64)
PRODUCER_SPEC = {
    "ops": [
        {"rotate": {"degrees": 20}},
        {"flip": {"horizontal": 0.5}},
        {"crop": {"size": 224}},
    ]
}
# Share of the baseline each way should deliver: (way, baseline way, output sides it holds for).
TARGETS = (
    (TRANSPORT, SHARED_MEMORY, IN_PROCESS, 0.95, (224, 64)),
    (TRANSPORT, INBAND, IN_PROCESS, 0.85, (224,)),
    (PRODUCER, SHARED_MEMORY, BARE, 0.90, (224,)),
)
# Compression suite: each codec at its default level, one client, over loopback and the shaped
# link at a rate a 2-core server fills without compression (1gbit) and one it cannot (200mbit).
CODEC_CHOICES = ("none", "lz4", "zstd")
COMPRESSION_SHAPE = (224, 64)
COMPRESSION_LINK_RATES = ("1gbit", "200mbit")
# The micro-measurement: (codec, level) pairs ("none": the raw copies), on this many batches.
MICRO_LEVELS = (
    ("none", 0),
    ("lz4", -8), ("lz4", 0), ("lz4", 3),
    ("zstd", -5), ("zstd", -1), ("zstd", 1), ("zstd", 3), ("zstd", 6), ("zstd", 9),
)  # fmt: skip
MICRO_BATCHES = 4
ROUNDS = 2
QUIET_BUDGET_SECONDS = 90.0
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
    "zstandard",
    "lz4",
)


def link_way(rate: str) -> str:
    return f"inband over {rate}"


def link_rate_of(way: str) -> str | None:
    """The link rate of a `link_way`, or None for the other ways."""
    prefix = link_way("")
    return way[len(prefix) :] if way.startswith(prefix) else None


def compression_way(codec: str, rate: str | None) -> str:
    """A way of the compression suite: `codec` in-band over `rate` (None: loopback)."""
    return f"{codec} over {rate or 'loopback'}"


def compression_parts(way: str) -> tuple[str, str | None]:
    """(codec, link rate or None for loopback) of a `compression_way`."""
    codec, _, where = way.partition(" over ")
    return codec, None if where == "loopback" else where


@dataclass(frozen=True)
class BenchConfig:
    """What one run measures: `seconds` per cell (split into `rounds`) for each suite of
    `suites`: the transport suite at `shapes` ((output side, batch size)), the producer suite
    at PRODUCER_SHAPE, each for CONSUMER_COUNTS; `link`: try the shaped link."""

    seconds: float = 4.0
    shapes: tuple[tuple[int, int], ...] = SHAPES
    rounds: int = ROUNDS
    quiet_budget_seconds: float = QUIET_BUDGET_SECONDS
    json_path: str | None = None
    suites: tuple[str, ...] = SUITES
    link: bool = True

    def __post_init__(self) -> None:
        check_range("seconds", self.seconds, 0.2, 600)
        check_range("rounds", self.rounds, 1, 20)
        if not self.shapes:
            raise ValueError("shapes: expected at least one (side, batch size)")
        if not self.suites or not set(self.suites) <= set(SUITES):
            raise ValueError(f"suites: expected some of {SUITES}, got {self.suites}")


# --- one cell --------------------------------------------------------------------------------


@dataclass
class Cell(RoundsSummary):
    """One (suite, output side, batch size, consumers, way): `images_per_second` is the mean of
    its rounds' rates; `megabytes_per_second` the pixels those images hold."""

    suite: str
    side: int
    batch_size: int
    consumers: int
    way: str
    rounds: list[Round] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, int, int, int, str]:
        return (self.suite, self.side, self.batch_size, self.consumers, self.way)

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
        return None if self.way in (IN_PROCESS, BARE) else self.consumer_ms_per_image

    @property
    def total_ms_per_image(self) -> float:
        """CPU of every process of the way per delivered image: this one, plus the clients'."""
        return self.process_ms_per_image + (self.client_ms_per_image or 0.0)

    def role_ms_per_image(self) -> dict[str, float]:
        images = self._images_in_windows()
        return {role: 1e3 * seconds / images for role, seconds in self.role_seconds().items()}

    def to_json(self) -> dict:
        return {
            "suite": self.suite,
            "side": self.side,
            "batch_size": self.batch_size,
            "consumers": self.consumers,
            "way": self.way,
            "link_rate": (
                compression_parts(self.way)[1]
                if self.suite == COMPRESSION
                else link_rate_of(self.way)
            ),
            "compression": compression_parts(self.way)[0] if self.suite == COMPRESSION else "none",
            "images_per_second": self.images_per_second,
            "megabytes_per_second": self.megabytes_per_second,
            "process_cpu_ms_per_image": self.process_ms_per_image,
            "client_cpu_ms_per_image": self.client_ms_per_image,
            "total_cpu_ms_per_image": self.total_ms_per_image,
            "process_cpu_ms_per_image_by_thread": self.role_ms_per_image(),
            "other_load_cores": self.other_cores,
            "steal_cores": self.steal_cores,
            "rounds": [item.to_json() for item in self.rounds],
        }


@dataclass(frozen=True)
class EncodeReading:
    """What the server's chunk encoders did, cumulative or over a round: pixel bytes given,
    bytes sent for them (raw where a chunk did not shrink), CPU seconds spent encoding."""

    raw_bytes: int = 0
    sent_bytes: int = 0
    cpu_seconds: float = 0.0

    def __add__(self, other: EncodeReading) -> EncodeReading:
        return EncodeReading(
            self.raw_bytes + other.raw_bytes,
            self.sent_bytes + other.sent_bytes,
            self.cpu_seconds + other.cpu_seconds,
        )

    def __sub__(self, other: EncodeReading) -> EncodeReading:
        return EncodeReading(
            self.raw_bytes - other.raw_bytes,
            self.sent_bytes - other.sent_bytes,
            self.cpu_seconds - other.cpu_seconds,
        )

    @property
    def ratio(self) -> float:
        """Pixel bytes over bytes sent (1.0 where nothing was encoded)."""
        return self.raw_bytes / self.sent_bytes if self.sent_bytes else 1.0

    def ms_per_image(self, image_bytes: int) -> float:
        return 1e3 * self.cpu_seconds * image_bytes / self.raw_bytes if self.raw_bytes else 0.0


class EncodeMeter:
    """Counts, for as long as it is entered, every `ChunkEncoder.encode` of this process (the
    in-process server's sending threads): it wraps the method and restores it on the way out.
    CPU is `time.thread_time` of the calling thread around the call."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._total = EncodeReading()
        self._original = ChunkEncoder.encode

    def reading(self) -> EncodeReading:
        with self._lock:
            return self._total

    def __enter__(self) -> EncodeMeter:
        original = self._original

        def encode(encoder: ChunkEncoder, pixels: memoryview) -> bytes | None:
            started = time.thread_time()
            encoded = original(encoder, pixels)
            spent = time.thread_time() - started
            sent = len(pixels) if encoded is None else len(encoded)
            with self._lock:
                self._total += EncodeReading(len(pixels), sent, spent)
            return encoded

        ChunkEncoder.encode = encode  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc_info: object) -> None:
        ChunkEncoder.encode = self._original  # type: ignore[method-assign]


class Bench:
    """The server, the in-process backend, the bare loop's pool and the client processes of
    one run; with a `link`, clients inside its client namespace too (`link_clients`)."""

    def __init__(
        self,
        dataset_path: Path,
        manifest: Manifest,
        clients: ClientPool,
        link: ShapedLink | None = None,
        link_clients: ClientPool | None = None,
    ) -> None:
        self.manifest = manifest
        self.clients = clients
        self.link = link
        self.link_clients = link_clients
        self.threads = os.cpu_count() or 1
        self.backend = OpenCVBackend(self.threads)
        self.bare_pool = ThreadPoolExecutor(self.threads, thread_name_prefix="bench-bare")
        # One for the run, as the server's producers share theirs.
        self.headers = HeaderCache()
        self.encode_meter = EncodeMeter()
        # The compression suite's encoder readings, per way, one per round.
        self.encoding: dict[str, list[EncodeReading]] = {}
        self.link_address: str | None = None
        if link is None:
            self.server: AugserveServer = start_server(dataset_path)
        else:
            self.server, self.link_address = start_server_with_link(dataset_path, link)

    def close(self) -> None:
        self.server.stop(grace=2.0)
        self.backend.close()
        self.bare_pool.shutdown(wait=True)

    def measure(
        self,
        suite: str,
        side: int,
        batch_size: int,
        consumers: int,
        seconds: float,
        way: str,
        round_index: int,
    ) -> Round:
        seeds = [SEED + 10 * round_index + index for index in range(consumers)]
        spec = PRODUCER_SPEC if suite == PRODUCER else spec_dict(side)
        if way in (IN_PROCESS, BARE):
            augment_spec = AugmentSpec.from_dict(spec)
            handles = [
                ThreadConsumer(
                    in_process_batches(
                        self.backend, self.manifest, augment_spec, batch_size, seed, self.headers
                    )
                    if way == IN_PROCESS
                    else bare_batches(
                        self.bare_pool, self.threads, self.manifest, augment_spec, batch_size, seed
                    ),
                    f"bench-loop-{index}",
                )
                for index, seed in enumerate(seeds)
            ]
            return run_round(handles, seconds)
        if suite == COMPRESSION:
            return self._measure_compression(spec, batch_size, seeds, seconds, way)
        rate = link_rate_of(way)
        if rate is None:
            address, transport, connections = self.server.address, way, self.clients.connections
        else:
            if self.link is None or self.link_clients is None or self.link_address is None:
                raise RuntimeError(f"{way}: this run has no shaped link")
            self.link.shape(rate)
            address, transport = self.link_address, INBAND
            connections = self.link_clients.connections
        # Different seeds: the server runs the clients on producers of their own.
        handles = [
            ProcessConsumer(
                connections[index],
                StreamJob(address, DATASET_NAME, spec, batch_size, seed, transport),
            )
            for index, seed in enumerate(seeds)
        ]
        return run_round(handles, seconds)

    def _measure_compression(
        self, spec: dict, batch_size: int, seeds: list[int], seconds: float, way: str
    ) -> Round:
        """One round of a compression way: in-band with its codec, over loopback or the link;
        the encoders' work in the round goes to `encoding`."""
        codec, rate = compression_parts(way)
        if rate is None:
            address, connections = self.server.address, self.clients.connections
        else:
            if self.link is None or self.link_clients is None or self.link_address is None:
                raise RuntimeError(f"{way}: this run has no shaped link")
            self.link.shape(rate)
            address, connections = self.link_address, self.link_clients.connections
        before = self.encode_meter.reading()
        handles = [
            ProcessConsumer(
                connections[index],
                StreamJob(address, DATASET_NAME, spec, batch_size, seed, INBAND, compression=codec),
            )
            for index, seed in enumerate(seeds)
        ]
        measured = run_round(handles, seconds)
        self.encoding.setdefault(way, []).append(self.encode_meter.reading() - before)
        return measured


Row = tuple[str, int, int, int, tuple[str, ...]]  # suite, side, batch size, consumers, ways


def rows_of(config: BenchConfig, has_link: bool) -> list[Row]:
    """(suite, side, batch size, consumers, ways) of every row, in the order measured."""
    rows = []
    if TRANSPORT in config.suites:
        for side, batch_size in config.shapes:
            ways = WAYS
            if has_link and side in LINK_SIDES:
                ways = WAYS + tuple(link_way(rate) for rate in LINK_RATES)
            rows += [
                (TRANSPORT, side, batch_size, consumers, ways) for consumers in CONSUMER_COUNTS
            ]
    if PRODUCER in config.suites:
        side, batch_size = PRODUCER_SHAPE
        rows += [
            (PRODUCER, side, batch_size, consumers, PRODUCER_WAYS) for consumers in CONSUMER_COUNTS
        ]
    if COMPRESSION in config.suites:
        side, batch_size = COMPRESSION_SHAPE
        for rate in (None, *(COMPRESSION_LINK_RATES if has_link else ())):
            ways = tuple(compression_way(codec, rate) for codec in CODEC_CHOICES)
            rows.append((COMPRESSION, side, batch_size, 1, ways))
    return rows


def run_benchmark(config: BenchConfig, bench: Bench, gate: QuietGate) -> list[Cell]:
    """Every cell; within a row (suite, shape, consumers) the ways take turns round by round."""
    cells: list[Cell] = []
    round_seconds = config.seconds / config.rounds
    for suite, side, batch_size, consumers, ways in rows_of(config, bench.link is not None):
        measure = partial(bench.measure, suite, side, batch_size, consumers, round_seconds)
        measured = measure_row(ways, config.rounds, gate, measure)
        for way in ways:
            cell = Cell(suite, side, batch_size, consumers, way, measured[way])
            print(
                f"  {suite:9} {side}×{side} batch {batch_size:3d}, {consumers} consumer(s), "
                f"{way:18} {cell.images_per_second:7.0f} images/s (rounds: {cell.rounds_text()}; "
                f"other load {cell.other_cores:.2f} cores, steal {cell.steal_cores:.2f})",
                file=sys.stderr,
                flush=True,
            )
            cells.append(cell)
    return cells


# --- the codecs alone ------------------------------------------------------------------------


@dataclass(frozen=True)
class CodecMicro:
    """One (codec, level) on one thread: `raw_bytes` of augmented pixels in `images` images,
    `sent_bytes` once encoded (raw chunks that did not shrink count as they are), and the least
    CPU seconds of MICRO_PASSES passes encoding all of them and decoding all of them."""

    codec: str
    level: int
    images: int
    raw_bytes: int
    sent_bytes: int
    encode_seconds: float
    decode_seconds: float

    @property
    def ratio(self) -> float:
        return self.raw_bytes / self.sent_bytes

    def megabytes_per_second(self, seconds: float) -> float:
        return self.raw_bytes / seconds / 1e6 if seconds > 0 else float("inf")

    def ms_per_image(self, seconds: float) -> float:
        return 1e3 * seconds / self.images

    def to_json(self) -> dict:
        return {
            **asdict(self),
            "ratio": self.ratio,
            "encode_megabytes_per_second": self.megabytes_per_second(self.encode_seconds),
            "decode_megabytes_per_second": self.megabytes_per_second(self.decode_seconds),
            "encode_ms_per_image": self.ms_per_image(self.encode_seconds),
            "decode_ms_per_image": self.ms_per_image(self.decode_seconds),
        }


MICRO_PASSES = 3


def _least_cpu(work: Callable[[], object]) -> float:
    """The least `time.thread_time` seconds of MICRO_PASSES runs of `work`."""
    spent = []
    for _ in range(MICRO_PASSES):
        started = time.thread_time()
        work()
        spent.append(time.thread_time() - started)
    return min(spent)


def _codec_functions(
    codec: str, level: int
) -> tuple[Callable[[np.ndarray], bytes | None], Callable[[bytes, memoryview], None]]:
    """(encode one chunk, decode one frame into a view) as the server and the client do it;
    "none": the server's copy into a message and the client's copy out of it."""
    if codec == "none":

        def copy_into(frame: bytes, out: memoryview) -> None:
            out[:] = frame

        return (lambda chunk: chunk.tobytes()), copy_into
    encoder = ChunkEncoder(Compression(codec, level))
    decoder = ChunkDecoder()

    def decode_into(frame: bytes, out: memoryview) -> None:
        decoder.decode_into(encoder.wire, frame, out)

    return (lambda chunk: encoder.encode(memoryview(chunk))), decode_into


def codec_micro(bench: Bench, levels: Sequence[tuple[str, int]] = MICRO_LEVELS) -> list[CodecMicro]:
    """MICRO_BATCHES batches of the compression suite's outputs (made in process, as the server
    makes them), cut into chunks of DEFAULT_CHUNK_BYTES as the server cuts them, encoded with
    `ChunkEncoder` and decoded into place with `ChunkDecoder` for each of `levels`; every
    decoded chunk is checked against its pixels (outside the timing)."""
    side, batch_size = COMPRESSION_SHAPE
    spec = AugmentSpec.from_dict(spec_dict(side))
    batches = in_process_batches(
        bench.backend, bench.manifest, spec, batch_size, SEED, bench.headers
    )
    try:
        flats = [next(batches).reshape(-1).copy() for _ in range(MICRO_BATCHES)]
    finally:
        batches.close()
    chunks = [
        flat[offset : offset + DEFAULT_CHUNK_BYTES]
        for flat in flats
        for offset in range(0, flat.size, DEFAULT_CHUNK_BYTES)
    ]
    view = memoryview(np.empty(DEFAULT_CHUNK_BYTES, np.uint8))
    results = []
    for codec, level in levels:
        encode, decode_into = _codec_functions(codec, level)
        frames = [encode(chunk) for chunk in chunks]  # None: the chunk goes raw

        def decode_all(
            frames: list[bytes | None] = frames,
            decode_into: Callable[[bytes, memoryview], None] = decode_into,
        ) -> None:
            for chunk, frame in zip(chunks, frames):
                if frame is None:
                    view[: chunk.size] = chunk  # raw in a compressed session: one copy
                else:
                    decode_into(frame, view[: chunk.size])

        for chunk, frame in zip(chunks, frames):
            if frame is not None:
                decode_into(frame, view[: chunk.size])
                if view[: chunk.size] != memoryview(chunk):
                    raise RuntimeError(f"{codec} level {level}: a chunk decoded wrong")
        results.append(
            CodecMicro(
                codec,
                level,
                MICRO_BATCHES * batch_size,
                sum(chunk.size for chunk in chunks),
                sum(
                    chunk.size if frame is None else len(frame)
                    for chunk, frame in zip(chunks, frames)
                ),
                _least_cpu(lambda encode=encode: [encode(chunk) for chunk in chunks]),
                _least_cpu(decode_all),
            )
        )
        print(
            f"  codec {codec:4} level {level:3d}: ratio {results[-1].ratio:.3f}",
            file=sys.stderr,
            flush=True,
        )
    return results


# --- reporting -------------------------------------------------------------------------------


def _ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.0%}" if baseline else "n/a"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def table_head(*columns: str, left: Sequence[int] = (0,)) -> list[str]:
    """A markdown table's first two lines: `columns`, then their alignment (the columns at the
    indices `left` to the left, the others to the right)."""
    lefts = {index % len(columns) for index in left}
    aligns = ("---" if index in lefts else "---:" for index in range(len(columns)))
    return ["| " + " | ".join(columns) + " |", "|" + "|".join(aligns) + "|"]


def _row_keys(cells: Sequence[Cell], suite: str) -> list[tuple[int, int, int]]:
    return sorted(
        {(c.side, c.batch_size, c.consumers) for c in cells if c.suite == suite},
        key=lambda row: (-row[0], row[1], row[2]),
    )


def transport_tables(cells: Sequence[Cell]) -> str:
    """Rates per row (shape × consumers) and way with ratios to in-process; then CPU; then the
    shaped link's rows."""
    lookup = {cell.key: cell for cell in cells}
    rates = table_head(
        "output", "batch", "clients", "in-process img/s", "MB/s", "shared memory img/s", "MB/s",
        "shm / in-process", "in-band img/s", "MB/s", "in-band / in-process",
    )  # fmt: skip
    cpu = table_head(
        "output", "batch", "clients", "in-process", "shm: server", "shm: client",
        "in-band: server", "in-band: server rpc threads", "in-band: client",
        "other load, cores (in-process, shm, in-band)",
        left=(0, -1),
    )  # fmt: skip
    links = table_head(
        "output", "batch", "clients", "link", "in-process img/s", "in-band img/s", "MB/s",
        "share of the line rate", "in-band / in-process", "server CPU ms / img",
        "client CPU ms / img", "other load, cores",
        left=(0, 3),
    )  # fmt: skip
    for side, batch_size, consumers in _row_keys(cells, TRANSPORT):
        local, shared, inband = (
            lookup[(TRANSPORT, side, batch_size, consumers, way)] for way in WAYS
        )
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
            f"| {_ms(shared.client_ms_per_image)} | {inband.process_ms_per_image:.3f} "
            f"| {rpc_ms:.3f} | {_ms(inband.client_ms_per_image)} | {other} |"
        )
        link_keys = [(TRANSPORT, side, batch_size, consumers, link_way(r)) for r in LINK_RATES]
        over_link = [lookup[key] for key in link_keys if key in lookup]
        for cell in [inband, *over_link] if over_link else []:
            rate = link_rate_of(cell.way)
            line_share = (
                f"{cell.megabytes_per_second * 8e6 / rate_bits_per_second(rate):.0%}"
                if rate
                else "n/a"
            )
            links.append(
                f"| {side}×{side} | {batch_size} | {consumers} | {rate or 'loopback'} "
                f"| {base:,.0f} | {cell.images_per_second:,.0f} "
                f"| {cell.megabytes_per_second:,.0f} | {line_share} "
                f"| {_ratio(cell.images_per_second, base)} | {cell.process_ms_per_image:.3f} "
                f"| {_ms(cell.client_ms_per_image)} | {cell.other_cores:.2f} |"
            )
    text = (
        "Delivered images/s and MB/s (10⁶ bytes of pixels), sum over clients:\n\n"
        + "\n".join(rates)
        + "\n\nCPU ms per delivered image (1 ms = one core busy for 1 ms; server: this whole "
        "process; other load: cores busy with work not of this run, mean over rounds):\n\n"
        + "\n".join(cpu)
    )
    if len(links) > 2:
        text += (
            "\n\nIn-band over loopback and over the shaped link (veth between two namespaces, "
            "token-bucket filter on both ends); share of the line rate: pixels delivered "
            "against the link's rate:\n\n" + "\n".join(links)
        )
    return text


def producer_table(cells: Sequence[Cell]) -> str:
    lookup = {cell.key: cell for cell in cells}
    lines = table_head(
        "clients", "bare loop img/s", "in-process img/s", "in-process / bare",
        "shared memory img/s", "shm / bare", "CPU ms / img: bare", "in-process", "shm: server",
        "shm: client", "other load, cores (bare, in-process, shm)",
        left=(-1,),
    )  # fmt: skip
    for side, batch_size, consumers in _row_keys(cells, PRODUCER):
        bare, local, shared = (
            lookup[(PRODUCER, side, batch_size, consumers, way)] for way in PRODUCER_WAYS
        )
        base = bare.images_per_second
        other = ", ".join(f"{c.other_cores:.2f}" for c in (bare, local, shared))
        lines.append(
            f"| {consumers} | {base:,.0f} | {local.images_per_second:,.0f} "
            f"| {_ratio(local.images_per_second, base)} | {shared.images_per_second:,.0f} "
            f"| {_ratio(shared.images_per_second, base)} | {bare.process_ms_per_image:.3f} "
            f"| {local.process_ms_per_image:.3f} | {shared.process_ms_per_image:.3f} "
            f"| {_ms(shared.client_ms_per_image)} | {other} |"
        )
    side, batch_size = PRODUCER_SHAPE
    return (
        f"Producer overhead ({side}×{side}, batch {batch_size}, rotate + flip + crop; "
        "images/s summed over consumers):\n\n" + "\n".join(lines)
    )


def cost_table(cells: Sequence[Cell]) -> str:
    """Each target's way against its baseline by CPU per image as well as by rate."""
    lookup = {cell.key: cell for cell in cells}
    lines = table_head(
        "suite", "output", "batch", "clients", "way", "baseline", "CPU ms / img, way",
        "CPU ms / img, baseline", "share by CPU", "share by rate",
        left=(0, 4, 5),
    )  # fmt: skip
    for suite, way, baseline, _, sides in TARGETS:
        for cell in cells:
            if cell.suite != suite or cell.way != baseline or cell.side not in sides:
                continue
            other = lookup[(suite, cell.side, cell.batch_size, cell.consumers, way)]
            lines.append(
                f"| {suite} | {cell.side}×{cell.side} | {cell.batch_size} | {cell.consumers} "
                f"| {way} | {baseline} | {other.total_ms_per_image:.3f} "
                f"| {cell.total_ms_per_image:.3f} "
                f"| {_ratio(cell.total_ms_per_image, other.total_ms_per_image)} "
                f"| {_ratio(other.images_per_second, cell.images_per_second)} |"
            )
    return (
        "Against the baseline by CPU per image (every process of the way: server and clients): "
        "the share of the baseline's rate a way reaches where CPU bounds both and every core "
        "is busy; it leaves out cores a way leaves idle, so it is an upper bound there:\n\n"
        + "\n".join(lines)
    )


def compression_tables(
    cells: Sequence[Cell], encoding: dict[str, list[EncodeReading]], micro: Sequence[CodecMicro]
) -> str:
    """The compression suite's cells, each against the uncompressed cell of its link; then the
    codecs alone."""
    lookup = {cell.key: cell for cell in cells}
    side, batch_size = COMPRESSION_SHAPE
    image_bytes = side * side * 3
    lines = table_head(
        "link", "codec", "img/s", "vs none", "pixel MB/s", "sent MB/s", "ratio",
        "server encode ms / img", "server CPU ms / img", "server rpc threads ms / img",
        "client CPU ms / img", "client minus none", "other load, cores",
        left=(0, 1),
    )  # fmt: skip
    for cell in cells:
        if cell.suite != COMPRESSION:
            continue
        codec, rate = compression_parts(cell.way)
        none = lookup[
            (COMPRESSION, side, batch_size, cell.consumers, compression_way("none", rate))
        ]
        reading = sum(encoding.get(cell.way, []), EncodeReading())
        client = cell.client_ms_per_image or 0.0
        lines.append(
            f"| {rate or 'loopback'} | {codec} | {cell.images_per_second:,.0f} "
            f"| {_ratio(cell.images_per_second, none.images_per_second)} "
            f"| {cell.megabytes_per_second:,.1f} "
            f"| {cell.megabytes_per_second / reading.ratio:,.1f} | {reading.ratio:.3f} "
            f"| {reading.ms_per_image(image_bytes):.3f} | {cell.process_ms_per_image:.3f} "
            f"| {cell.role_ms_per_image().get('augserve-rpc', 0.0):.3f} | {client:.3f} "
            f"| {client - (none.client_ms_per_image or 0.0):+.3f} | {cell.other_cores:.2f} |"
        )
    text = (
        f"In-band with and without compression ({side}×{side}, batch {batch_size}, one client; "
        "ratio: pixel bytes over bytes sent; server encode: CPU in `ChunkEncoder.encode` per "
        "image; client minus none: the client's CPU per image less the uncompressed cell's):\n\n"
        + "\n".join(lines)
    )
    if micro:
        rows = table_head(
            "codec", "level", "ratio", "sent / pixels", "encode MB/s", "decode MB/s",
            "encode ms / img", "decode ms / img",
            left=(0,),
        )  # fmt: skip
        for item in micro:
            rows.append(
                f"| {item.codec} | {item.level} | {item.ratio:.3f} | {1 / item.ratio:.1%} "
                f"| {item.megabytes_per_second(item.encode_seconds):,.0f} "
                f"| {item.megabytes_per_second(item.decode_seconds):,.0f} "
                f"| {item.ms_per_image(item.encode_seconds):.3f} "
                f"| {item.ms_per_image(item.decode_seconds):.3f} |"
            )
        images = micro[0].images
        text += (
            f"\n\nThe codecs alone, one thread ({images} augmented {side}×{side} outputs in "
            f"chunks of {DEFAULT_CHUNK_BYTES:,} bytes; MB/s of pixels per core of CPU time, the "
            f"least of {MICRO_PASSES} passes; decode: into place, as the client does):\n\n"
            + "\n".join(rows)
        )
    return text


def markdown_tables(
    cells: Sequence[Cell],
    encoding: dict[str, list[EncodeReading]] | None = None,
    micro: Sequence[CodecMicro] = (),
) -> str:
    parts = []
    if any(cell.suite == TRANSPORT for cell in cells):
        parts.append(transport_tables(cells))
    if any(cell.suite == PRODUCER for cell in cells):
        parts.append(producer_table(cells))
    if any(cell.suite == COMPRESSION for cell in cells):
        parts.append(compression_tables(cells, encoding or {}, micro))
    if any(cell.suite in (TRANSPORT, PRODUCER) for cell in cells):
        parts.append(cost_table(cells))
    return "\n\n".join(parts)


def target_summary(cells: Sequence[Cell]) -> list[str]:
    lookup = {cell.key: cell.images_per_second for cell in cells}
    costs = {cell.key: cell.total_ms_per_image for cell in cells}
    lines = []
    for suite, way, baseline, target, sides in TARGETS:
        ratios = [
            lookup[(suite, c.side, c.batch_size, c.consumers, way)] / c.images_per_second
            for c in cells
            if c.suite == suite and c.way == baseline and c.side in sides and c.images_per_second
        ]
        if not ratios:
            continue
        met = sum(ratio >= target for ratio in ratios)
        by_cpu = [
            c.total_ms_per_image / costs[(suite, c.side, c.batch_size, c.consumers, way)]
            for c in cells
            if c.suite == suite and c.way == baseline and c.side in sides
        ]
        where = ", ".join(f"{side}×{side}" for side in sides)
        lines.append(
            f"Target ({suite}, {where}) {way} ≥ {target:.0%} of {baseline}: "
            f"{min(ratios):.0%} to {max(ratios):.0%}, met in {met} of {len(ratios)} rows "
            f"(by CPU per image: {min(by_cpu):.0%} to {max(by_cpu):.0%})."
        )
    return lines


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--suite",
        choices=("all", *SUITES),
        default="all",
        help="which tables to measure (default: all)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"rounds per cell (default {ROUNDS}; 1 with --quick)",
    )
    parser.add_argument(
        "--no-link",
        dest="link",
        action="store_false",
        help="skip the in-band cells over the shaped link (they need root)",
    )


def parse_args(argv: Sequence[str] | None = None) -> BenchConfig:
    args = window_arguments(
        argv, __doc__.split("\n\n")[0], 4.0, 1.0, f"shapes {QUICK_SHAPES}", _add_arguments
    )
    suites = SUITES if args.suite == "all" else (args.suite,)
    if args.quick:
        rounds = args.rounds or 1
        return BenchConfig(
            args.seconds, QUICK_SHAPES, rounds, 10.0, args.json_path, suites, args.link
        )
    rounds = args.rounds or ROUNDS
    return BenchConfig(
        args.seconds, SHAPES, rounds, QUIET_BUDGET_SECONDS, args.json_path, suites, args.link
    )


def open_link(
    config: BenchConfig, stack: contextlib.ExitStack
) -> tuple[ShapedLink | None, ClientPool | None, str]:
    """The shaped link and its client processes (closed by `stack`), or None and why not."""
    if not config.link or not {TRANSPORT, COMPRESSION} & set(config.suites):
        return None, None, "not asked for"
    if os.geteuid() != 0:
        return None, None, "needs root (network namespaces, tc)"
    try:
        link = ShapedLink(str(os.getpid()))
    except LinkUnavailable as error:
        return None, None, str(error)
    stack.callback(link.close)
    clients = ClientPool(max(CONSUMER_COUNTS), "bench-link-client", link.client_namespace)
    stack.callback(clients.close)
    return link, clients, f"namespaces {link.server_namespace} and {link.client_namespace}"


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_args(argv)
    run = WindowRun(
        VERSIONED_PACKAGES,
        max(CONSUMER_COUNTS),
        "bench-client",
        "augserve-bench-",
        config.quiet_budget_seconds,
    )
    with run, contextlib.ExitStack() as stack:
        link, link_clients, link_note = open_link(config, stack)
        print(f"Shaped link: {'on' if link else 'skipped'} ({link_note})", file=sys.stderr)
        dataset_path = make_dataset(run.folder, DATASET_IMAGES, (SOURCE_SIDE, SOURCE_SIDE))
        manifest = load_manifest(dataset_path)
        rows = rows_of(config, link is not None)
        announce(sum(len(ways) for *_, ways in rows), config.seconds, config.rounds)
        bench = Bench(dataset_path, manifest, run.clients, link, link_clients)
        micro: list[CodecMicro] = []
        try:
            with bench.encode_meter:
                cells = run_benchmark(config, bench, run.gate)
            if COMPRESSION in config.suites:
                print("Codecs alone, one thread...", file=sys.stderr, flush=True)
                micro = codec_micro(bench)
        finally:
            bench.close()

    link_rates = [
        *(LINK_RATES if link and TRANSPORT in config.suites else ()),
        *(COMPRESSION_LINK_RATES if link and COMPRESSION in config.suites else ()),
    ]
    details = {
        "dataset": {
            "images": DATASET_IMAGES,
            "side": SOURCE_SIDE,
            "jpeg_quality": JPEG_QUALITY,
        },
        "specs": {
            **{side: spec_dict(side) for side in sorted({side for side, _ in config.shapes})},
            PRODUCER: PRODUCER_SPEC,
        },
        "link": {"rates": link_rates, "note": link_note},
        "compression": {
            "codecs": CODEC_CHOICES,
            "shape": COMPRESSION_SHAPE,
            "link_rates": COMPRESSION_LINK_RATES if link and COMPRESSION in config.suites else [],
            "encoding": {
                way: [asdict(reading) for reading in readings]
                for way, readings in bench.encoding.items()
            },
            "micro": [item.to_json() for item in micro],
        },
        "targets": [
            {"suite": suite, "way": way, "baseline": baseline, "share": share, "sides": sides}
            for suite, way, baseline, share, sides in TARGETS
        ],
    }
    run.publish(
        config,
        (
            f"Data: {DATASET_IMAGES} JPEGs {SOURCE_SIDE}×{SOURCE_SIDE} q{JPEG_QUALITY}; transport "
            "spec: random_resized_crop + flip + brightness; producer spec: rotate + flip + crop; "
            f"server: OpenCV backend, {os.cpu_count()} threads, prefetch "
            f"{Limits().default_prefetch}; clients: one process each (spawn); shaped link: "
            f"{', '.join(link_rates) if link else 'skipped'} ({link_note}); compression only in "
            f"the compression suite ({', '.join(CODEC_CHOICES)} at their default levels)."
        ),
        markdown_tables(cells, bench.encoding, micro),
        target_summary(cells),
        details,
        [cell.to_json() for cell in cells],
    )


if __name__ == "__main__":
    main()
