"""The DALI backend as a pipeline, on DALI's CPU mode against real servers: read-ahead and
concurrent pipelines give byte-identical streams, each failure class keeps its own status
(an undecodable image names its file; DALI missing, a pipeline that will not build, CUDA errors
and running out of memory are UNAVAILABLE backend failures that health reports), `auto` falls
back to OpenCV with its reason, and the pipeline cache stays within its bounds. Every test
checks a control stream byte for byte against batches made one at a time in this process.
Faults are injected only where DALI is imported or a pipeline is built."""

from __future__ import annotations

import logging
import multiprocessing
import shutil
import struct
import sys
import threading
import zlib
from collections import deque
from collections.abc import Callable
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from augserve.backends import dali
from augserve.backends.batch import augment_batch
from augserve.backends.dali import (
    Build,
    DaliBackend,
    PipelinePool,
    PipelineShape,
    PoolEntry,
    Use,
    Wait,
)
from augserve.backends.opencv import OpenCVBackend
from augserve.backends.select import create_backend
from augserve.client import AugserveClientError, Client, Reconnect
from augserve.core.errors import BackendError, SpecError
from augserve.core.plan import make_plan
from augserve.core.spec import AugmentSpec
from augserve.data.datasets import load_manifest
from augserve.data.demo import DemoConfig, ensure_demo_dataset
from augserve.data.reading import read_sources
from augserve.rpc.server import DatasetConfig, ServerConfig, create_server
from augserve.transport.cuda_ipc import (
    CudaDriver,
    CudaIpcMapping,
    CudaIpcRing,
    cuda_ipc_unavailable,
)
from helpers import spec_of
from servers import running_server, scrape, wait_until

SPEC = spec_of(
    {"rotate": {"degrees": 20}},
    {"flip": {}},
    {"random_resized_crop": {"size": 32}},
    {"brightness": {"factor": 0.3}},
)
BATCH = 6
BAD_FILE = "circle/zz_undecodable.png"
NO_RECONNECT = Reconnect(attempts=0)


def spec_filled(value: int) -> AugmentSpec:
    """SPEC with a constant fill of `value`: a pipeline shape of its own."""
    return AugmentSpec.from_dict({**SPEC.to_dict(), "fill_value": value})


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> Path:
    """40 real JPEGs, 8 per class."""
    return ensure_demo_dataset(
        DemoConfig(images_per_class=8, image_size=48), root=tmp_path_factory.mktemp("dali-data")
    )


def undecodable_png() -> bytes:
    """A 48x48 PNG with a valid header and CRCs whose compressed rows are damaged: it passes
    the header check, and only the decoder finds it broken."""
    image = np.random.default_rng(0).integers(0, 256, (48, 48, 3), np.uint8)
    data = bytearray(cv2.imencode(".png", image)[1].tobytes())
    start = data.find(b"IDAT")
    length = struct.unpack(">I", data[start - 4 : start])[0]
    for index in range(start + 24, start + 4 + length - 4, 7):
        data[index] ^= 0x5A
    data[start + 4 + length : start + 8 + length] = struct.pack(
        ">I", zlib.crc32(bytes(data[start : start + 4 + length]))
    )
    return bytes(data)


@pytest.fixture(scope="module")
def bad_root(dataset_root, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dali-bad") / "images"
    shutil.copytree(dataset_root, root)
    (root / BAD_FILE).write_bytes(undecodable_png())
    return root


class Reference:
    """What each sample must be: its batch made alone in this process, one batch at a time, on
    a DALI CPU backend of its own (a sample's pixels depend only on seed, epoch and id)."""

    def __init__(self, root: Path) -> None:
        self.manifest = load_manifest(root, use_cache=False)
        self.backend = DaliBackend(None, 1, prefetch_depth=1, pipelines_per_shape=1)

    def images(self, spec: AugmentSpec, seed: int, epoch: int, sample_ids) -> np.ndarray:
        sources = read_sources(self.manifest, [int(sample_id) for sample_id in sample_ids])
        batch = augment_batch(self.backend, spec, seed, epoch, sources)
        assert list(batch.sample_ids) == [int(sample_id) for sample_id in sample_ids], batch.skipped
        return batch.images

    def check(
        self, batches: list[tuple[int, np.ndarray, np.ndarray]], spec: AugmentSpec, seed: int
    ) -> None:
        """Every (epoch, sample ids, images) byte for byte."""
        assert batches
        for epoch, sample_ids, images in batches:
            assert images.tobytes() == self.images(spec, seed, epoch, sample_ids).tobytes(), (
                epoch,
                sample_ids,
            )

    def close(self) -> None:
        self.backend.close()


@pytest.fixture(scope="module")
def reference(dataset_root):
    made = Reference(dataset_root)
    yield made
    made.close()


@pytest.fixture(scope="module")
def bad_reference(bad_root):
    made = Reference(bad_root)
    yield made
    made.close()


def take(stream, limit: int | None = None) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(epoch, sample ids, a copy of the images) of the stream's batches, at most `limit`."""
    taken = []
    for batch in stream:
        taken.append((batch.epoch, batch.sample_ids.copy(), batch.images.copy()))
        if limit is not None and len(taken) == limit:
            break
    return taken


def health_of(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            .status
        )


SERVING, NOT_SERVING = (
    health_pb2.HealthCheckResponse.SERVING,
    health_pb2.HealthCheckResponse.NOT_SERVING,
)


def dali_server(root: Path, backend: DaliBackend | None = None, **limits):
    """A real server on a DALI CPU backend (its own, unless given)."""
    if backend is None:
        return running_server({"shapes": DatasetConfig(str(root))}, backend="dali-cpu", **limits)
    from contextlib import contextmanager

    @contextmanager
    def started():
        server = create_server(
            ServerConfig(
                backend="dali-cpu", threads=2, datasets={"shapes": DatasetConfig(str(root))},
                metrics_port=0,
            ),
            backend,
        )
        try:
            yield server
        finally:
            server.stop(grace=2.0)

    return started()


# --- overlap keeps the determinism contract ------------------------------------------------


def test_streams_with_read_ahead_and_concurrent_pipelines_are_byte_identical(
    dataset_root, reference
):
    """Two streams at once (two producers sharing the backend), two epochs each, on a server
    whose producers read two batches ahead into prefetching, concurrent pipelines and on one
    that runs one batch at a time: the same batches
    in the same order, byte for byte, each equal to the batch made alone in this process. With
    read-ahead the backend ran batches concurrently (overlap happened, and changed nothing)."""
    results: dict[int, dict[int, list]] = {}
    peaks = {}
    for read_ahead in (0, 2):
        if read_ahead:
            backend = DaliBackend(None, 2, read_ahead_batches=read_ahead)
        else:
            backend = DaliBackend(
                None,
                2,
                prefetch_depth=1,
                pipelines_per_shape=1,
                read_ahead_batches=0,
                concurrent_batches=1,
            )
        with dali_server(dataset_root, backend) as server:
            made = results[read_ahead] = {}

            def pull(seed: int, made: dict = made, address: str = server.address) -> None:
                with (
                    Client(address, timeout=120) as client,
                    client.stream(
                        "shapes",
                        spec=SPEC,
                        batch_size=BATCH,
                        seed=seed,
                        epochs=2,
                        transport="shared_memory",
                    ) as stream,
                ):
                    made[seed] = take(stream)

            threads = [threading.Thread(target=pull, args=(seed,)) for seed in (1, 2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=300)
            stats = server.backend.cache_stats()
            assert stats.backend_failures == 0
            peaks[read_ahead] = stats.peak_concurrent_batches
    assert peaks[2] >= 2, peaks
    for seed in (1, 2):
        serial, overlapped = results[0][seed], results[2][seed]
        assert [(epoch, ids.tolist()) for epoch, ids, _ in overlapped] == [
            (epoch, ids.tolist()) for epoch, ids, _ in serial
        ]
        assert all(a.tobytes() == b.tobytes() for (_, _, a), (_, _, b) in zip(overlapped, serial))
        assert sum(len(ids) for _, ids, _ in overlapped) == 80
        reference.check(overlapped, SPEC, seed)


def test_read_ahead_on_opencv_is_byte_identical(dataset_root):
    """The producer's read-ahead is any backend's (OpenCV asks for none by default): OpenCV
    streams read two batches ahead equal OpenCV batches made one at a time."""
    manifest = load_manifest(dataset_root, use_cache=False)
    backend = OpenCVBackend(1)
    served = OpenCVBackend(2)
    served.read_ahead_batches = 2
    try:
        with (
            create_server(
                ServerConfig(threads=2, datasets={"shapes": DatasetConfig(str(dataset_root))}),
                served,
            ) as server,
            Client(server.address, timeout=60) as client,
            client.stream(
                "shapes", spec=SPEC, batch_size=BATCH, seed=4, epochs=2, transport="inband"
            ) as stream,
        ):
            batches = take(stream)
        for epoch, ids, images in batches:
            expected = augment_batch(
                backend, SPEC, 4, epoch, read_sources(manifest, ids.tolist())
            ).images
            assert images.tobytes() == expected.tobytes()
    finally:
        backend.close()


def test_outputs_are_written_into_the_callers_array(dataset_root):
    manifest = load_manifest(dataset_root, use_cache=False)
    backend = DaliBackend(None, 1)
    try:
        out = np.zeros((4, 32, 32, 3), np.uint8)
        batch = augment_batch(backend, SPEC, 0, 0, read_sources(manifest, [0, 1, 2, 3]), out=out)
        assert np.shares_memory(batch.images, out) and out.any()
    finally:
        backend.close()


# --- an undecodable image is the image's failure -------------------------------------------


def test_an_undecodable_image_is_skipped_naming_the_file(bad_root, bad_reference):
    """The damaged PNG passes the header check and fails in DALI's decoder: it is skipped with
    its name and DALI's reason; no backend failure, health stays SERVING, and every batch
    (including the one it was in) equals the reference."""
    with (
        dali_server(bad_root) as server,
        Client(server.address, timeout=120, reconnect=NO_RECONNECT) as client,
    ):
        with client.stream(
            "shapes", spec=SPEC, batch_size=BATCH, seed=3, epochs=1, transport="shared_memory"
        ) as stream:
            batches, skipped = [], []
            for batch in stream:
                batches.append((batch.epoch, batch.sample_ids.copy(), batch.images.copy()))
                skipped += batch.skipped
        assert (
            len(skipped) == 1
            and skipped[0].startswith(BAD_FILE)
            and "could not be decoded by DALI" in skipped[0]
        ), skipped
        assert sum(len(ids) for _, ids, _ in batches) == 40
        assert server.backend.cache_stats().backend_failures == 0
        assert health_of(server.address) == SERVING
    bad_reference.check(batches, SPEC, 3)


def test_an_undecodable_image_fails_a_fail_policy_stream_and_not_the_server(
    bad_root, bad_reference
):
    """Under on_bad_image="fail" the stream ends DATA_LOSS naming the file; a control stream
    on the same server afterwards is whole and byte-identical."""
    with (
        dali_server(bad_root) as server,
        Client(server.address, timeout=120, reconnect=NO_RECONNECT) as client,
    ):
        with (
            pytest.raises(AugserveClientError) as failed,
            client.stream(
                "shapes", spec=SPEC, batch_size=BATCH, seed=3, epochs=1, on_bad_image="fail"
            ) as stream,
        ):
            take(stream)
        assert (
            failed.value.code == grpc.StatusCode.DATA_LOSS and BAD_FILE in failed.value.message
        ), failed.value
        assert health_of(server.address) == SERVING
        with client.stream("shapes", spec=SPEC, batch_size=BATCH, seed=5, epochs=1) as stream:
            control = take(stream)
    assert sum(len(ids) for _, ids, _ in control) == 40
    bad_reference.check(control, SPEC, 5)


# --- backend failures: UNAVAILABLE, health, and recovery -----------------------------------


def expect_backend_failure(address: str, spec: AugmentSpec, cause: str) -> AugserveClientError:
    with Client(address, timeout=120, reconnect=NO_RECONNECT) as client:
        with pytest.raises(AugserveClientError) as failed:
            with client.stream("shapes", spec=spec, batch_size=BATCH, seed=11, epochs=1) as stream:
                take(stream)
    error = failed.value
    assert error.code == grpc.StatusCode.UNAVAILABLE, error
    assert f"backend failure ({cause})" in error.message, error.message
    return error


def fails_then_recovers(
    address: str, failing: AugmentSpec, cause: str, heal: Callable[[], None], reference: Reference
) -> str:
    """A stream of `failing` ends UNAVAILABLE naming `cause` and health is NOT_SERVING; after
    `heal()` a control stream of SPEC is whole and byte-identical, and health SERVING. The
    failed stream's message."""
    error = expect_backend_failure(address, failing, cause)
    with Client(address, timeout=30) as client:
        # The failed stream's producer may still have batches in the works: let them end first.
        assert wait_until(lambda: client.server_info().producers == 0, timeout=60)
    assert health_of(address) == NOT_SERVING
    heal()
    control_stream(address, SPEC, reference)
    assert health_of(address) == SERVING
    return error.message


def control_stream(address: str, spec: AugmentSpec, reference: Reference, seed: int = 7) -> None:
    with Client(address, timeout=120, reconnect=NO_RECONNECT) as client:
        with client.stream("shapes", spec=spec, batch_size=BATCH, seed=seed, epochs=1) as stream:
            batches = take(stream)
    assert sum(len(ids) for _, ids, _ in batches) == 40
    reference.check(batches, spec, seed)


def test_dali_that_does_not_import_is_unavailable_and_health_says_so(
    dataset_root, reference, monkeypatch
):
    """With `nvidia.dali` made unimportable, the next pipeline build fails: the stream ends
    UNAVAILABLE naming the import error, health is NOT_SERVING, and no image is called bad. Once
    DALI imports again a control stream is byte-identical and health is SERVING."""
    with dali_server(dataset_root) as server:
        monkeypatch.setitem(sys.modules, "nvidia.dali", None)
        message = fails_then_recovers(
            server.address, SPEC, dali.DALI_UNAVAILABLE, monkeypatch.undo, reference
        )
        assert "nvidia.dali" in message
        stats = server.backend.cache_stats()
        assert stats.backend_failures >= 1 and stats.build_failures >= 1


def test_a_pipeline_that_does_not_build_is_unavailable(dataset_root, reference, monkeypatch):
    """A build that raises (as DALI does for an operator it lacks) ends the stream UNAVAILABLE
    with cause "pipeline build"; streams of shapes already built go on byte-identically."""
    real_build = dali.build_pipeline
    with dali_server(dataset_root) as server:
        control_stream(server.address, SPEC, reference, seed=8)  # builds SPEC's pipeline

        def refuse(shape, *arguments):
            if shape.fill_value == 9:
                raise RuntimeError(
                    '[/opt/dali/dali/pipeline/operator/op_spec.h:100] Assert on "schema" failed: operator not found'
                )
            return real_build(shape, *arguments)

        monkeypatch.setattr(dali, "build_pipeline", refuse)
        message = fails_then_recovers(
            server.address, spec_filled(9), dali.PIPELINE_BUILD, lambda: None, reference
        )
        assert "operator not found" in message
        assert server.backend.cache_stats().build_failures >= 1


class FaultyPipeline:
    """A real built pipeline whose outputs() raises DALI-worded `message` for the batches
    `fails(encoded samples)` picks."""

    def __init__(self, pipe, message: str, fails: Callable[[list[np.ndarray]], bool]) -> None:
        self._pipe = pipe
        self._message = message
        self._fails = fails
        self._fed: deque[list[np.ndarray]] = deque()

    def feed_input(self, name, values):
        if name == "encoded":
            self._fed.append(values)
        self._pipe.feed_input(name, values)

    def schedule_run(self):
        self._pipe.schedule_run()

    def outputs(self):
        outputs = self._pipe.outputs()
        if self._fails(self._fed.popleft()):
            raise RuntimeError(
                f"Critical error in pipeline:\nError in thread 0: {self._message}\nCurrent pipeline object is no longer valid."
            )
        return outputs


def inject(monkeypatch, message: str, fails: Callable[[list[np.ndarray]], bool]) -> None:
    real_build = dali.build_pipeline
    monkeypatch.setattr(
        dali,
        "build_pipeline",
        lambda *arguments: FaultyPipeline(real_build(*arguments), message, fails),
    )


def test_a_decoder_that_fails_every_jpeg_is_a_backend_failure_not_bad_images(
    dataset_root, reference, monkeypatch
):
    """Was: with DALI unable to decode, every sample was reported "could not be decoded" and
    the stream yielded nothing. A decoder failing on every JPEG fails on the known-good JPEG
    too: UNAVAILABLE, naming it, and no image is skipped. A control stream after the fault is
    gone is byte-identical."""
    broken = threading.Event()
    broken.set()
    is_jpeg = lambda encoded: (
        broken.is_set() and any(bytes(sample[:2]) == b"\xff\xd8" for sample in encoded)
    )
    inject(
        monkeypatch,
        "[/opt/dali/dali/operators/imgcodec/image_decoder.h:800] Failed to decode sample #0",
        is_jpeg,
    )
    with dali_server(dataset_root) as server:
        message = fails_then_recovers(
            server.address, SPEC, dali.KNOWN_GOOD_FAILED, broken.clear, reference
        )
        assert "Failed to decode" in message


@pytest.mark.parametrize(
    "message, cause",
    [
        ("CUDA error: out of memory (cudaErrorMemoryAllocation)", dali.OUT_OF_MEMORY),
        (
            "CUDA error: an illegal memory access was encountered (cudaErrorIllegalAddress)",
            dali.CUDA_ERROR,
        ),
    ],
)
def test_cuda_errors_and_out_of_memory_end_the_stream_unavailable_and_it_resumes(
    dataset_root, reference, monkeypatch, message, cause
):
    """Pipelines whose runs fail with CUDA's words: a stream without reconnects ends UNAVAILABLE
    naming the cause and health turns NOT_SERVING; a stream with reconnects that was running
    when the fault came resumes from its token once the fault is gone (here: once it has
    reconnected), and all it delivered, before and after, is byte-identical and covers each of
    its three epochs once."""
    armed = threading.Event()
    inject(monkeypatch, message, lambda encoded: armed.is_set())
    with dali_server(dataset_root) as server:
        with (
            Client(
                server.address,
                timeout=120,
                reconnect=Reconnect(attempts=20, first_delay=0.2, max_delay=0.5),
            ) as client,
            client.stream(
                "shapes", spec=SPEC, batch_size=BATCH, seed=7, epochs=3, prefetch=1
            ) as resumed,
        ):
            batches = iter(resumed)
            delivered = take(batches, 2)
            armed.set()
            expect_backend_failure(server.address, SPEC, cause)
            assert health_of(server.address) == NOT_SERVING

            def heal() -> None:
                wait_until(lambda: resumed.reconnects >= 1, timeout=60)
                armed.clear()

            healer = threading.Thread(target=heal)
            healer.start()
            delivered += take(batches)
            healer.join()
            assert resumed.reconnects >= 1
        assert health_of(server.address) == SERVING
        assert server.backend.cache_stats().backend_failures >= 1
    for epoch in range(3):
        ids = sorted(
            sample_id
            for batch_epoch, sample_ids, _ in delivered
            if batch_epoch == epoch
            for sample_id in sample_ids
        )
        assert ids == list(range(40)), epoch
    reference.check(delivered, SPEC, 7)


# --- choosing a backend ----------------------------------------------------------------------


def test_auto_falls_back_to_opencv_with_the_reason_logged(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="augserve.backends.select")
    with monkeypatch.context() as patched:
        patched.setitem(sys.modules, "nvidia.dali", None)
        backend = create_backend("auto", threads=1)
        assert backend.name == "opencv"
        backend.close()
        assert "chose opencv (DALI is not installed)" in caplog.text
        with pytest.raises(
            BackendError, match=r"backend failure \(DALI not importable\): .*nvidia\.dali"
        ):
            create_backend("dali-cpu", threads=1)
    caplog.clear()
    # A GPU that DALI says it sees but cannot use: the self-test's build fails for real here.
    monkeypatch.setattr("augserve.backends.select.gpu_count", lambda: 1)
    backend = create_backend("auto", threads=1)
    assert backend.name == "opencv"
    backend.close()
    assert "chose opencv (DALI failed on GPU 0: backend failure (pipeline build)" in caplog.text, (
        caplog.text
    )


# --- the pipeline cache ----------------------------------------------------------------------


def test_the_pipeline_cache_is_bounded_and_evicts_the_least_recently_used(
    dataset_root, reference, caplog
):
    """A server whose backend caches at most two pipelines, serving streams of three shapes in
    turn and then the first again: never more than two pipelines, the idle least recently used
    one evicted (and logged) each time, and every stream, the rebuilt one included, byte-identical."""
    caplog.set_level(logging.INFO, logger="augserve.backends.dali")
    backend = DaliBackend(None, 2, max_pipelines=2, pipelines_per_shape=1)
    specs = [spec_filled(value) for value in (0, 60, 120, 0)]
    with dali_server(dataset_root, backend) as server:
        counts = []
        for spec in specs:
            control_stream(server.address, spec, reference)
            stats = backend.cache_stats()
            counts.append((stats.pipelines, stats.builds, stats.evictions))
        metrics = scrape(server.metrics.port)
    assert counts == [(1, 1, 0), (2, 2, 0), (2, 3, 1), (2, 4, 2)], counts
    assert metrics["augserve_pipeline_evictions_total"] == 2, metrics
    assert metrics["augserve_pipeline_builds_total"] == 4
    assert metrics["augserve_pipeline_pipelines"] == 2 and metrics["augserve_pipeline_max_pipelines"] == 2
    assert "augserve_pipeline_device_bytes" not in metrics  # not measured on the CPU
    assert caplog.text.count("DALI pipeline cache: evicted the linear, fill constant") == 2, (
        caplog.text
    )
    assert "fill constant 0," in caplog.text.split("evicted the")[1]


def test_output_sizes_and_erase_values_make_no_new_pipelines(dataset_root):
    """Output sizes and erase fill values are per-sample inputs: batches of three output sizes
    and two erase values run on one pipeline, each equal to its batch on a fresh backend."""
    manifest = load_manifest(dataset_root, use_cache=False)
    shared = DaliBackend(None, 1)
    try:
        for size, value in ((24, 10), (32, 200), (40, 10)):
            spec = spec_of(
                {"rotate": {"degrees": 10}},
                {"random_resized_crop": {"size": size}},
                {"cutout": {"size": [6, 6], "value": value}},
            )
            sources = read_sources(manifest, list(range(5)))
            fresh = DaliBackend(None, 1)
            try:
                expected = augment_batch(fresh, spec, 1, 0, sources).images
            finally:
                fresh.close()
            assert augment_batch(shared, spec, 1, 0, sources).images.tobytes() == expected.tobytes()
        assert shared.cache_stats().builds == 1
    finally:
        shared.close()


def test_pipelines_are_built_for_a_bounded_number_of_erasing_ops(dataset_root):
    manifest = load_manifest(dataset_root, use_cache=False)
    spec = spec_of(
        {"resize": {"size": 32}}, *[{"cutout": {"size": [4, 4]}}] * (dali.MAX_ERASE_OPS + 1)
    )
    backend = DaliBackend(None, 1)
    try:
        with pytest.raises(SpecError, match=f"spec.ops: {dali.MAX_ERASE_OPS + 1} erasing ops"):
            augment_batch(backend, spec, 0, 0, read_sources(manifest, [0]))
        assert backend.cache_stats().builds == 0
    finally:
        backend.close()


SHAPE_A = PipelineShape("linear", "constant", 0, True, 0)
SHAPE_B = PipelineShape("linear", "constant", 7, True, 0)
SHAPE_C = PipelineShape("nearest", "nearest", 0, False, 1)


class TestPipelinePool:
    """The cache's decisions, without threads or DALI."""

    pool = PipelinePool(prefetch_depth=2, per_shape=2, max_pipelines=3)

    def test_fills_one_pipelines_prefetch_before_building_another(self):
        entries = [PoolEntry(0, SHAPE_A, load=1)]
        assert self.pool.choose(entries, SHAPE_A) == Use(0)
        entries[0].load = 2
        assert self.pool.choose(entries, SHAPE_A) == Build(())

    def test_queues_on_the_least_busy_once_a_shape_has_its_pipelines(self):
        entries = [PoolEntry(0, SHAPE_A, load=2), PoolEntry(1, SHAPE_A, load=3)]
        assert self.pool.choose(entries, SHAPE_A) == Use(0)

    def test_evicts_the_least_recently_used_idle_pipeline_when_full(self):
        entries = [
            PoolEntry(0, SHAPE_A, last_used=5.0),
            PoolEntry(1, SHAPE_B, last_used=1.0),
            PoolEntry(2, SHAPE_B, load=1, last_used=0.0),
        ]
        assert self.pool.choose(entries, SHAPE_C) == Build((1,))

    def test_waits_when_full_and_nothing_is_idle(self):
        entries = [
            PoolEntry(index, SHAPE_A if index < 2 else SHAPE_B, load=1) for index in range(3)
        ]
        assert self.pool.choose(entries, SHAPE_C) == Wait()

    def test_device_memory_budget_evicts_idle_pipelines_oldest_first(self):
        pool = PipelinePool(max_pipelines=4, max_device_bytes=100)
        entries = [
            PoolEntry(0, SHAPE_A, last_used=1.0, device_bytes=60),
            PoolEntry(1, SHAPE_B, load=1, last_used=0.0, device_bytes=60),
            PoolEntry(2, SHAPE_C, last_used=2.0, device_bytes=60),
        ]
        assert pool.over_budget(entries, keep=2) == (0,)
        assert PipelinePool().over_budget(entries, keep=2) == ()

    def test_refuses_bounds_below_one(self):
        with pytest.raises(ValueError, match="max_pipelines"):
            PipelinePool(max_pipelines=0)


# --- CUDA IPC --------------------------------------------------------------------------------

def read_slot(handle, slot: int, shape, connection, library: str | None = None) -> None:
    """The trainer's side, in a process of its own: map the ring, send back one slot's bytes."""
    mapping = CudaIpcMapping(handle, None if library is None else CudaDriver(library))
    try:
        connection.send(mapping.read(slot, np.empty(shape, np.uint8)).tobytes())
    finally:
        mapping.close()


def bytes_from_another_process(handle, slot: int, shape, library: str | None = None) -> bytes:
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    reader = context.Process(target=read_slot, args=(handle, slot, shape, child, library))
    reader.start()
    try:
        return parent.recv()
    finally:
        reader.join(60)


def test_cuda_ipc_slots_reach_another_process_through_the_driver_calls(fake_driver):
    """The ring's handle, sent to another process, maps the same memory there: a batch written
    into slot 1 is read back byte for byte, slot 0 untouched (on a stand-in driver)."""
    driver = CudaDriver(fake_driver)
    shape = (2, 8, 8, 3)
    ring = CudaIpcRing(2, int(np.prod(shape)), driver=driver)
    try:
        batch = np.random.default_rng(3).integers(0, 256, shape, np.uint8)
        ring.write(1, batch)
        assert bytes_from_another_process(ring.handle, 1, shape, fake_driver) == batch.tobytes()
        assert bytes_from_another_process(ring.handle, 0, shape, fake_driver) == bytes(batch.nbytes)
        mapping = CudaIpcMapping(
            ring.handle, driver
        )  # (the real driver opens it in other processes only)
        view = mapping.slot(1, shape)
        assert view.__cuda_array_interface__ == {
            "shape": shape,
            "typestr": "|u1",
            "data": (mapping.base + ring.slot_bytes, False),
            "version": 3,
            "strides": None,
        }
        mapping.close()
        with pytest.raises(IndexError):
            ring.slot_pointer(2)
    finally:
        ring.close()


@pytest.mark.skipif(
    cuda_ipc_unavailable() is not None, reason=f"CUDA IPC: {cuda_ipc_unavailable()}"
)
def test_a_trainer_process_reads_a_cuda_ipc_slot_the_dali_gpu_backend_wrote(dataset_root):
    """The GPU backend writes a batch into slot 1 of a device ring; another process maps the
    ring by its IPC handle and reads exactly what the backend writes to host memory."""
    manifest = load_manifest(dataset_root, use_cache=False)
    sources = read_sources(manifest, list(range(8)))
    shape = (8, 32, 32, 3)
    backend = DaliBackend(0, 2)
    ring = CudaIpcRing(2, int(np.prod(shape)))
    try:
        expected = augment_batch(backend, SPEC, 2, 0, sources).images
        plans = [make_plan(SPEC, 2, 0, source.sample_id, (48, 48)) for source in sources]
        result = backend.augment_to_device(
            [source.data for source in sources], plans, ring.slot_pointer(1)
        )
        assert result.kept == list(range(8)) and result.images is None
        assert bytes_from_another_process(ring.handle, 1, shape) == expected.tobytes()
    finally:
        ring.close()
        backend.close()
