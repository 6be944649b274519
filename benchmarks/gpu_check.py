"""The checks for a lent GPU machine, in one run of about four minutes, each part's results
written to JSON as soon as it ends (what finished survives a timeout):

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py [--seconds S] [--out DIR]

Parts:
1. environment: what DALI and the CUDA driver see, versions.
2. parity: the same plans through DALI on the GPU, DALI on the CPU and OpenCV, on generated
   pictures (PNG and JPEG): identical for pixel copies, within one gray level for colour, mean
   <= 0.25 and max <= 2 for bilinear warps, mean <= 0.25 and max <= 4 for the full pipeline
   (tests/test_parity.py's tolerances); where a GPU JPEG decoder is compared with a CPU one,
   +0.5 mean and +3 max for the decoders' own differences.
3. raw: the DALI GPU backend fed bytes and plans made before (no files, headers or plans in the
   window), one batch at a time and overlapped (3 batches in flight; one pipeline per shape,
   the default, and two), 256x256 and 500x375 JPEGs to 224x224, batch 128.
4. delivered: a real server on the DALI GPU backend, one client process reading one stream over
   shared memory, then in-band; against the raw rate.
5. CUDA IPC: the GPU backend writes batches into a device ring (augserve.transport.cuda_ipc), a
   trainer process maps it by its IPC handle and reduces each batch on the GPU with torch; the
   bytes of one slot are checked against the host path. Then the transport through a real
   server: a trainer process opens with cuda_device=0 and transport auto, must be given
   CUDA IPC, checks its first batch against a shared-memory stream's byte for byte, and reads
   `stream.torch("cuda:0")` for the window.
6. OpenCV on every core: `augment_batch` in process, and a server over shared memory.
7. two trainers from one server: two experiments (augserve-train, one CNN with AdamW, one with
   SGD) in one shared group over shared memory, a short run each, at the same time.

Without a GPU every part that needs none still runs, with DALI on the CPU where the GPU would
be (parts 2-4 and 7) and part 5 recorded as skipped with the reason. Output: DIR/gpu_check.json
(DIR: --out, else $OUT, else ./gpu-check-out).
"""

from __future__ import annotations

import argparse
import ast
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# augserve from the checkout; common beside this file; the parity test's cases from tests/.
sys.path[:0] = [str(ROOT), str(HERE), str(ROOT / "tests")]

import cv2
import numpy as np

from augserve.backends.batch import augment_batch
from augserve.backends.dali import DaliBackend, HostRows, dali_available, gpu_count
from augserve.backends.opencv import OpenCVBackend
from augserve.core.images import inspect_image
from augserve.core.plan import make_plan
from augserve.core.sample import SourceImage
from augserve.core.spec import AugmentSpec
from augserve.transport.cuda_ipc import CudaIpcMapping, CudaIpcRing, cuda_ipc_unavailable
from test_parity import COMPOSED, EXACT, FULL_PIPELINE, INTERPOLATION, ROUNDING


def bench_backends_spec() -> dict:
    """bench_backends' SPEC, read from its source: importing it needs albumentations and
    scikit-image, which the GPU machine lacks."""
    tree = ast.parse((HERE / "bench_backends.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            getattr(target, "id", None) == "SPEC" for target in node.targets
        ):
            return ast.literal_eval(node.value)
    raise LookupError("bench_backends.py has no SPEC")


RATE_SPEC = bench_backends_spec()  # rotate, shift, flip, random_resized_crop 224, colour

# The parity test's spec and tolerances, (mean, max, fraction of differing pixels) each.
PARITY_CASES = {
    "pixel copies (flip, crop, cutout)": (
        [
            {"flip": {"horizontal": 0.5, "vertical": 0.5}},
            {"crop": {"size": [64, 64]}},
            {"cutout": {"size": [12, 12], "value": 9}},
        ],
        EXACT,
    ),
    "colour (brightness, contrast, saturation, hue)": (
        [
            {"crop": {"size": [64, 64]}},
            {"brightness": {"factor": 0.3}},
            {"contrast": {"factor": 0.3}},
            {"saturation": {"factor": 0.4}},
            {"hue": {"degrees": 30}},
        ],
        ROUNDING,
    ),
    "bilinear warps (rotate, shift, zoom, resized crop)": (
        [
            {"rotate": {"degrees": 25}},
            {"shift": {"x": 0.1, "y": 0.1}},
            {"zoom": {"range": [0.8, 1.25]}},
            {"random_resized_crop": {"size": [64, 80], "scale": [0.3, 1.0]}},
        ],
        INTERPOLATION,
    ),
    "full pipeline": (FULL_PIPELINE, COMPOSED),
    # The per-pixel stage (DALI's conditionals on the GPU): lookup tables exact, filters within
    # a level; policies after a warp may magnify a one-level warp difference (solarize,
    # posterize, equalize: tests/test_parity.py), so only their mean is bounded. On JPEG inputs
    # equalize also magnifies the GPU decoder's own differences: the PNG rows are the check.
    "lookup tables (posterize, solarize, autocontrast, equalize)": (
        [
            {"crop": {"size": [64, 64]}},
            {"posterize": {"bits": 5, "p": 0.7}},
            {"solarize": {"threshold": 160, "p": 0.5}},
            {"autocontrast": {"p": 0.5}},
            {"equalize": {"p": 0.5}},
        ],
        EXACT,
    ),
    "filters (sharpness, gaussian blur)": (
        [
            {"crop": {"size": [64, 64]}},
            {"sharpness": {"factor": [0.2, 2.5], "p": 1.0}},
            {"gaussian_blur": {"sigma": [0.3, 2.0], "p": 0.5}},
        ],
        ROUNDING,
    ),
    "policies (RandAugment, TrivialAugment, AutoAugment)": (
        [
            {"crop": {"size": [64, 64]}},
            {"rand_augment": {"num_ops": 2, "magnitude": 9}},
            {"trivial_augment_wide": {}},
            {"auto_augment": {}},
        ],
        (0.25, 255, 1.0),
    ),
}
JPEG_DECODER_ALLOWANCE = (0.5, 3)  # GPU against CPU JPEG decoders, added to a case's tolerance
RAW_BATCH = 128
RAW_IN_FLIGHT = 3
RATE_SIDES = {"256x256": (256, 256), "500x375": (500, 375)}  # (width, height)
STREAM_IMAGES = 1024
STREAM_BATCH = 128
IPC_SLOTS = 4
TRAIN_STEPS = 30


# --- pictures --------------------------------------------------------------------------------


def picture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A generated RGB uint8 picture with gradients, edges and texture (no downloads)."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack(
        [
            255 * x / max(width - 1, 1),
            255 * y / max(height - 1, 1),
            128 + 100 * np.sin(x / 5.0) * np.cos(y / 7.0),
        ],
        axis=-1,
    )
    image[(x // 16 + y // 16) % 2 == 0] *= 0.6
    for _ in range(6):
        center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(4, max(5, width // 3))), int(rng.integers(4, max(5, height // 3))))
        colour = tuple(int(value) for value in rng.integers(0, 256, 3))
        cv2.ellipse(image, center, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
    noise = cv2.GaussianBlur(rng.normal(0, 20, (height, width, 3)), (0, 0), 1.2)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def encode(image: np.ndarray, extension: str) -> bytes:
    options = [cv2.IMWRITE_JPEG_QUALITY, 90] if extension == ".jpg" else []
    ok, buffer = cv2.imencode(extension, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), options)
    if not ok:
        raise RuntimeError(f"could not encode {extension}")
    return buffer.tobytes()


def write_dataset(root: Path, count: int, size: tuple[int, int]) -> Path:
    """`count` JPEGs of `size` (width, height) in 4 class folders."""
    rng = np.random.default_rng(1)
    for index in range(count):
        folder = root / f"class{index % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index:05d}.jpg").write_bytes(encode(picture(rng, size[1], size[0]), ".jpg"))
    return root


def sources_of(encoded: list[bytes]) -> list[SourceImage]:
    return [SourceImage(index, 0, f"picture-{index}", data) for index, data in enumerate(encoded)]


# --- the parts -------------------------------------------------------------------------------


class Run:
    """The run's report: parts in order, written out after each one."""

    def __init__(self, out_dir: Path, seconds: float) -> None:
        self.out_dir = out_dir
        self.seconds = seconds
        self.started = time.monotonic()
        self.gpus = gpu_count() if dali_available() else 0
        self.device_id = 0 if self.gpus else None
        self.dali_name = "DALI on the GPU" if self.gpus else "DALI on the CPU (no GPU)"
        self.report: dict = {"mode": "gpu" if self.gpus else "cpu-only", "parts": {}}
        self.folder = Path(tempfile.mkdtemp(prefix="augserve-gpu-check-"))
        os.environ["AUGSERVE_CACHE"] = str(self.folder / "cache")

    def part(self, name: str, function: Callable[[], dict], needs: str | None = None) -> None:
        began = time.monotonic()
        print(f"[{began - self.started:6.1f} s] {name} ...", flush=True)
        if needs is not None:
            entry = {"status": "skipped", "reason": needs}
        else:
            try:
                entry = {"status": "ok", **function()}
            except Exception as error:  # a part's failure is its result; the others still run
                entry = {
                    "status": "failed",
                    "error": f"{type(error).__name__}: {error}",
                    "traceback": traceback.format_exc(),
                }
        entry["seconds"] = round(time.monotonic() - began, 2)
        self.report["parts"][name] = entry
        summary = {
            key: value
            for key, value in entry.items()
            if key in ("status", "reason", "error", "verdict", "seconds")
        }
        print(f"           {json.dumps(summary)}", flush=True)
        self.write()

    def write(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.report["elapsed_seconds"] = round(time.monotonic() - self.started, 2)
        (self.out_dir / "gpu_check.json").write_text(json.dumps(self.report, indent=2, default=str))

    def dali(self, **options) -> DaliBackend:
        return DaliBackend(self.device_id, min(8, os.cpu_count() or 1), **options)


def environment(run: Run) -> dict:
    info = {
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "dali_available": dali_available(),
        "dali_gpus": run.gpus,
        "cuda_ipc": cuda_ipc_unavailable() or "available",
    }
    try:
        import nvidia.dali

        info["dali_version"] = nvidia.dali.__version__
    except ImportError as error:
        info["dali_version"] = f"not importable: {error}"
    try:
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        info["nvidia_smi"] = f"not available: {error}"
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = (
            torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
        )
    except ImportError:
        info["torch"] = "not installed"
    for module in (
        "grpc",
        "grpc_health",
        "grpc_reflection",
        "google.protobuf",
        "prometheus_client",
        "yaml",
    ):
        try:
            __import__(module)
            info[f"module {module}"] = "ok"
        except ImportError as error:
            info[f"module {module}"] = f"missing ({error})"
    return info


def difference_stats(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(diff.mean()), int(diff.max()) if diff.size else 0


def parity(run: Run) -> dict:
    rng = np.random.default_rng(5)
    pictures = [
        picture(rng, height, width)
        for height, width in ((97, 131), (240, 180), (256, 256), (375, 500))
    ]
    inputs = {
        extension: [encode(image, extension) for image in pictures]
        for extension in (".png", ".jpg")
    }
    backends = {"opencv": OpenCVBackend(2), "dali-cpu": DaliBackend(None, 2)}
    if run.gpus:
        backends["dali-gpu"] = DaliBackend(0, 2)
    pairs = [("dali-cpu", "opencv")] + (
        [("dali-gpu", "opencv"), ("dali-gpu", "dali-cpu")] if run.gpus else []
    )
    cases = []
    try:
        for case, (ops, (mean_limit, max_limit, _)) in PARITY_CASES.items():
            spec = AugmentSpec.from_dict({"ops": ops})
            for extension, encoded in inputs.items():
                for seed in (0, 11):
                    outputs = {}
                    for name, backend in backends.items():
                        batch = augment_batch(backend, spec, seed, 0, sources_of(encoded))
                        outputs[name] = (batch.images, list(batch.sample_ids))
                    for first, second in pairs:
                        if outputs[first][1] != outputs[second][1]:
                            cases.append(
                                {
                                    "case": case,
                                    "input": extension,
                                    "seed": seed,
                                    "pair": f"{first} vs {second}",
                                    "passed": False,
                                    "note": f"kept {outputs[first][1]} vs {outputs[second][1]}",
                                }
                            )
                            continue
                        mean, largest = difference_stats(outputs[first][0], outputs[second][0])
                        limit_mean, limit_max = mean_limit, max_limit
                        if (
                            extension == ".jpg"
                            and ("dali-gpu" in (first, second))
                            and (first, second) != ("dali-gpu", "dali-gpu")
                        ):
                            limit_mean += JPEG_DECODER_ALLOWANCE[0]
                            limit_max += JPEG_DECODER_ALLOWANCE[1]
                        cases.append(
                            {
                                "case": case,
                                "input": extension,
                                "seed": seed,
                                "pair": f"{first} vs {second}",
                                "mean": round(mean, 4),
                                "max": largest,
                                "limits": [limit_mean, limit_max],
                                "passed": mean <= limit_mean and largest <= limit_max,
                            }
                        )
    finally:
        for backend in backends.values():
            backend.close()
    failed = [case for case in cases if not case["passed"]]
    return {
        "verdict": "all within tolerance"
        if not failed
        else f"{len(failed)} of {len(cases)} outside",
        "cases": cases,
    }


def raw_batches(
    spec: AugmentSpec, size: tuple[int, int], count: int
) -> list[tuple[list[bytes], list]]:
    """`count` batches of RAW_BATCH JPEGs of `size` with their epoch-0 plans."""
    rng = np.random.default_rng(2)
    unique = [encode(picture(rng, size[1], size[0]), ".jpg") for _ in range(64)]
    batches = []
    for index in range(count):
        encoded = [
            unique[(index * RAW_BATCH + offset) % len(unique)] for offset in range(RAW_BATCH)
        ]
        plans = []
        for offset, data in enumerate(encoded):
            header = inspect_image(data, "raw", 40_000_000)
            plans.append(
                make_plan(
                    spec,
                    0,
                    0,
                    index * RAW_BATCH + offset,
                    (header.height, header.width),
                    header.orientation,
                )
            )
        batches.append((encoded, plans))
    return batches


def run_into(backend: DaliBackend, out: np.ndarray, encoded: list[bytes], plans: list) -> int:
    """One batch through `backend` into `out`; the images it kept."""
    return len(backend.augment(encoded, plans, out).kept)


def cycling(batches: list, run_batch: Callable[[list[bytes], list], int]) -> Callable[[], int]:
    """A call that runs the next of `batches` (cycling) through `run_batch(encoded, plans)`."""
    counter = iter(range(10**9))

    def one() -> int:
        encoded, plans = batches[next(counter) % len(batches)]
        return run_batch(encoded, plans)

    return one


def rate(function: Callable[[], int], seconds: float) -> float:
    """Images per second of calls to `function` (each returns the images it made) over
    `seconds`, after one warm-up call."""
    function()
    images = 0
    began = time.perf_counter()
    while time.perf_counter() - began < seconds:
        images += function()
    return images / (time.perf_counter() - began)


def overlapped_rate(backend: DaliBackend, batches: list, seconds: float) -> float:
    outs = [np.empty((RAW_BATCH, 224, 224, 3), np.uint8) for _ in range(RAW_IN_FLIGHT + 1)]
    pool = ThreadPoolExecutor(RAW_IN_FLIGHT)
    pending = []
    index = 0

    def submit() -> None:
        nonlocal index
        encoded, plans = batches[index % len(batches)]
        pending.append(pool.submit(backend.augment, encoded, plans, outs[index % len(outs)]))
        index += 1

    try:
        for _ in range(RAW_IN_FLIGHT):
            submit()

        def one() -> int:
            made = len(pending.pop(0).result().kept)
            submit()
            return made

        return rate(one, seconds)
    finally:
        for future in pending:
            future.result()
        pool.shutdown()


def raw(run: Run) -> dict:
    spec = AugmentSpec.from_dict(RATE_SPEC)
    results = {}
    for name, size in RATE_SIDES.items():
        batches = raw_batches(spec, size, 4)
        serial = run.dali(prefetch_depth=1, pipelines_per_shape=1)
        overlapped = {
            "overlapped": run.dali(),
            "overlapped, 2 pipelines per shape": run.dali(pipelines_per_shape=2),
        }
        out = np.empty((RAW_BATCH, 224, 224, 3), np.uint8)
        try:
            one_serial = cycling(batches, partial(run_into, serial, out))
            results[name] = {"one batch at a time": round(rate(one_serial, run.seconds))}
            for way, backend in overlapped.items():
                results[name][way] = round(overlapped_rate(backend, batches, run.seconds))
                results[name][f"{way}: cache"] = asdict(backend.cache_stats())
        finally:
            for backend in (serial, *overlapped.values()):
                backend.close()
    return {
        "backend": run.dali_name,
        "batch": RAW_BATCH,
        "images_per_second": results,
        # GPU outputs went straight from the device into the caller's host array (one copy).
        "gpu_outputs_copied_straight_to_host": HostRows.direct_from_device if run.gpus else "n/a",
    }


def stream_rate(
    address: str, transport: str, seconds: float, spec: dict, batch: int, seed: int
) -> dict:
    """One client process reading one stream (common's machinery: warm-up, one window)."""
    from common import ClientPool, ProcessConsumer, StreamJob, run_round

    pool = ClientPool(1, "gpu-check-client")
    try:
        measured = run_round(
            [
                ProcessConsumer(
                    pool.connections[0], StreamJob(address, "bench", spec, batch, seed, transport)
                )
            ],
            seconds,
        )
    finally:
        pool.close()
    return {
        "images_per_second": round(measured.images_per_second),
        "other_cores": round(measured.other_cores, 2),
    }


def served(backend, dataset: Path):
    from augserve.rpc.server import DatasetConfig, ServerConfig, create_server

    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        backend=backend.name if backend.name == "opencv" else "dali-cpu",
        threads=os.cpu_count(),
        datasets={"bench": DatasetConfig(str(dataset))},
    )
    return create_server(config, backend)


def delivered(run: Run, dataset: Path) -> dict:
    server = served(run.dali(), dataset)
    try:
        results = {
            transport: stream_rate(
                server.address, transport, run.seconds, RATE_SPEC, STREAM_BATCH, 3 + index
            )
            for index, transport in enumerate(("shared_memory", "inband"))
        }
        results["pipeline cache"] = asdict(server.backend.cache_stats())
    finally:
        server.stop(grace=2.0)
    return {
        "backend": run.dali_name,
        "batch": STREAM_BATCH,
        "input": "256x256 JPEG",
        "delivered": results,
    }


def ipc_trainer(handle, shape, connection) -> None:
    """The trainer's side: map the ring, reduce each announced slot on the GPU, acknowledge."""
    import torch

    mapping = CudaIpcMapping(handle)
    try:
        while True:
            message = connection.recv()
            if message is None:
                break
            slot, count = message
            images = torch.as_tensor(
                mapping.slot(slot, (count, *shape[1:])), device=f"cuda:{mapping.device}"
            )
            total = int(images.sum(dtype=torch.int64).item())  # every byte read on the GPU
            connection.send((slot, total))
    finally:
        mapping.close()


def cuda_ipc(run: Run) -> dict:
    spec = AugmentSpec.from_dict(RATE_SPEC)
    batches = raw_batches(spec, (256, 256), 4)
    shape = (RAW_BATCH, 224, 224, 3)
    backend = run.dali()
    ring = CudaIpcRing(IPC_SLOTS, int(np.prod(shape)))
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    trainer = context.Process(target=ipc_trainer, args=(ring.handle, shape, theirs), daemon=True)
    trainer.start()
    try:
        # The same batch through the host path and through the ring: the trainer's bytes must match.
        encoded, plans = batches[0]
        host = backend.augment(encoded, plans).images
        backend.augment_to_device(encoded, plans, ring.slot_pointer(0))
        mapping_check = np.empty(shape, np.uint8)
        with ring.driver.context(ring.device):
            ring.driver.to_host(mapping_check, ring.slot_pointer(0))
        identical = mapping_check.tobytes() == host.tobytes()
        ours.send((0, RAW_BATCH))
        _, trainer_sum = ours.recv()
        sums_match = trainer_sum == int(host.sum(dtype=np.int64))
        free = list(range(IPC_SLOTS))
        in_trainer = 0
        images = 0
        index = 0
        began = time.perf_counter()
        while time.perf_counter() - began < run.seconds:
            while not free:
                slot, _ = ours.recv()
                free.append(slot)
                in_trainer -= 1
                images += RAW_BATCH
            slot = free.pop(0)
            encoded, plans = batches[index % len(batches)]
            backend.augment_to_device(encoded, plans, ring.slot_pointer(slot))
            ours.send((slot, RAW_BATCH))
            in_trainer += 1
            index += 1
        while in_trainer:
            ours.recv()
            in_trainer -= 1
            images += RAW_BATCH
        seconds = time.perf_counter() - began
        return {
            "slot_bytes_equal_host_path": identical,
            "trainer_sum_matches": sums_match,
            "images_per_second": round(images / seconds),
            "verdict": "bytes identical" if identical and sums_match else "bytes differ",
        }
    finally:
        ours.send(None)
        trainer.join(30)
        ring.close()
        backend.close()


def served_ipc_trainer(address: str, seconds: float, connection) -> None:
    """A trainer process on the server's GPU: what auto chose, the first batch against shared
    memory's, and the rate of normalized float batches on cuda:0."""
    import torch

    from augserve.client import Client

    spec = AugmentSpec.from_dict(RATE_SPEC)
    options = dict(spec=spec, batch_size=STREAM_BATCH, seed=11, epochs=0)
    with Client(address, timeout=120) as client:
        with client.stream("bench", transport="shared_memory", **options) as stream:
            host_first = np.array(next(iter(stream)).images)
        with client.stream("bench", cuda_device="cuda:0", **options) as stream:
            transport = stream.facts.transport
            batches = iter(stream)
            first = next(batches)
            identical = first.images.to_host().tobytes() == host_first.tobytes()
            tensors = stream.torch("cuda:0")
            images, began = 0, time.perf_counter()
            while time.perf_counter() - began < seconds:
                pixels, _ = next(tensors)
                images += len(pixels)
            torch.cuda.synchronize()
            rate = images / (time.perf_counter() - began)
    connection.send({"transport": transport, "first_batch_equals_shared_memory": identical, "images_per_second": round(rate)})


def served_cuda_ipc(run: Run, dataset: Path) -> dict:
    """CUDA IPC as the server's transport: chosen by auto for a trainer on the same GPU."""
    from augserve.rpc.server import DatasetConfig, ServerConfig, create_server

    config = ServerConfig(host="127.0.0.1", port=0, backend="dali", threads=min(8, os.cpu_count() or 1), datasets={"bench": DatasetConfig(str(dataset))})
    server = create_server(config, run.dali())
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    trainer = context.Process(target=served_ipc_trainer, args=(server.address, run.seconds, theirs), daemon=True)
    trainer.start()
    try:
        if not ours.poll(120 + run.seconds):
            raise TimeoutError("the trainer process sent nothing within its time")
        result = ours.recv()
    finally:
        trainer.join(30)
        server.stop(grace=2.0)
    ok = result["transport"] == "cuda_ipc" and result["first_batch_equals_shared_memory"]
    return {**result, "batch": STREAM_BATCH, "verdict": "auto chose CUDA IPC, bytes identical" if ok else "not as expected"}


def opencv_all_cores(run: Run, dataset: Path) -> dict:
    spec = AugmentSpec.from_dict(RATE_SPEC)
    batches = raw_batches(spec, (256, 256), 2)
    threads = os.cpu_count() or 1
    backend = OpenCVBackend(threads)
    out = np.empty((RAW_BATCH, 224, 224, 3), np.uint8)
    try:
        one = cycling(
            batches,
            lambda encoded, _: len(
                augment_batch(backend, spec, 0, 0, sources_of(encoded), out=out).sample_ids
            ),
        )
        in_process = round(rate(one, run.seconds))
    finally:
        backend.close()
    server = served(OpenCVBackend(threads), dataset)
    try:
        shared = stream_rate(
            server.address, "shared_memory", run.seconds, RATE_SPEC, STREAM_BATCH, 9
        )
    finally:
        server.stop(grace=2.0)
    return {"threads": threads, "in_process_images_per_second": in_process, "shared_memory": shared}


def two_trainers(run: Run) -> dict:
    from augserve.data.demo import DemoConfig, ensure_demo_dataset

    demo = ensure_demo_dataset(DemoConfig(images_per_class=100), root=run.folder / "demo")
    server = served(run.dali(), demo)
    device = "cuda" if run.gpus else "cpu"
    try:
        experiments = {
            "cnn-adamw": ["--optimizer", "adamw", "--lr", "0.002"],
            "cnn-sgd": ["--optimizer", "momentum", "--lr", "0.05"],
        }
        processes = {}
        began = time.monotonic()
        for name, options in experiments.items():
            command = [
                sys.executable,
                "-m",
                "trainer",
                "--endpoint",
                server.address,
                "--dataset",
                "bench",
                "--model",
                "cnn",
                "--image-size",
                "64",
                "--horizontal-flip",
                "--rotation-range",
                "10",
                "--batch-size",
                "64",
                "--epochs",
                "1",
                "--steps-per-epoch",
                str(TRAIN_STEPS),
                "--transport",
                "shared_memory",
                "--device",
                device,
                "--no-progress",
                "--no-validate",
                "--set",
                "data.group_size=2",
                "--output",
                str(run.folder / name),
                *options,
            ]
            processes[name] = subprocess.Popen(
                command,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        results = {}
        for name, process in processes.items():
            output, _ = process.communicate(timeout=240)
            metrics = sorted((run.folder / name).glob("metrics*"))
            results[name] = {
                "returncode": process.returncode,
                "last_lines": output.strip().splitlines()[-4:],
                "metrics_files": [path.name for path in metrics],
            }
        info = server.manager.snapshot()
        results["wall_seconds"] = round(time.monotonic() - began, 1)
        results["batches_produced"] = info.counters.batches_produced
        results["batches_delivered"] = info.counters.batches_delivered
        ok = all(entry["returncode"] == 0 for key, entry in results.items() if key in experiments)
        shared = info.counters.batches_delivered / max(info.counters.batches_produced, 1)
        results["verdict"] = (
            f"both trained; {shared:.2f} deliveries per batch made (2.00: every batch shared)"
            if ok
            else "a trainer failed"
        )
        return {"device": device, "backend": run.dali_name, **results}
    finally:
        server.stop(grace=2.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="seconds per rate measurement (default 4 with a GPU, 2 without)",
    )
    parser.add_argument(
        "--out", default=None, help="folder for gpu_check.json (default $OUT, else ./gpu-check-out)"
    )
    args = parser.parse_args(argv)
    out_dir = Path(args.out or os.environ.get("OUT") or "gpu-check-out")
    run = Run(out_dir, 0.0)
    run.seconds = args.seconds or (4.0 if run.gpus else 2.0)
    print(
        f"gpu_check: {run.report['mode']} ({run.dali_name}); writing {out_dir / 'gpu_check.json'}",
        flush=True,
    )
    dataset = write_dataset(run.folder / "rates", STREAM_IMAGES if run.gpus else 256, (256, 256))
    run.part("environment", lambda: environment(run))
    run.part("parity", lambda: parity(run))
    run.part("raw", lambda: raw(run))
    run.part("delivered", lambda: delivered(run, dataset))
    reason = cuda_ipc_unavailable()
    run.part(
        "cuda_ipc",
        lambda: cuda_ipc(run),
        needs=None
        if reason is None and run.gpus
        else f"no GPU here ({reason or 'DALI sees none'})",
    )
    run.part(
        "served_cuda_ipc",
        lambda: served_cuda_ipc(run, dataset),
        needs=None if reason is None and run.gpus else f"no GPU here ({reason or 'DALI sees none'})",
    )
    run.part("opencv_all_cores", lambda: opencv_all_cores(run, dataset))
    run.part("two_trainers", lambda: two_trainers(run))
    run.write()
    print(f"gpu_check: done in {time.monotonic() - run.started:.0f} s", flush=True)
    failed = [name for name, part in run.report["parts"].items() if part["status"] == "failed"]
    if failed:
        print(f"gpu_check: failed parts: {', '.join(failed)}", flush=True)


if __name__ == "__main__":
    main()
