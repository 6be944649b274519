"""Images per second of one augmentation on this machine: augserve's OpenCV and DALI CPU
backends against an albumentations Compose of the same ops, side by side in one run.

    python benchmarks/bench_backends.py [--seconds S] [--batch-size B] [--json PATH]

Pipeline: rotate ±20°, shift ±0.1, horizontal flip (p=0.5), random_resized_crop to 224×224,
brightness/contrast/saturation ±0.2. Inputs: scikit-image sample photos resized to 256×256 and
500×375 (width×height), JPEG quality 90, kept both as bytes and as decoded RGB arrays.

Modes, each at 1 thread and at `os.cpu_count()` threads:
- decode excluded: augment already-decoded [H, W, 3] uint8 RGB arrays. augserve's OpenCV
  backend's `apply_plan` (its `augment_into` after `decode_stored`) runs on them. DALI's
  pipeline starts at the decoder: n/a.
- decode included: from JPEG bytes. augserve runs through `augment_batch`, so the header check
  (`inspect_image`) and plan drawing count; albumentations runs `cv2.imdecode` + `cvtColor`.

augserve's plan drawing (`make_plan`) counts in both modes, as albumentations' parameter
drawing does. Each cell's `--seconds` is split into rounds taken in turn with the other
contenders of its column, and the median round is reported (the machine may be shared).

OpenCV's own thread pool is set to one thread for the whole run (`cv2.setNumThreads(1)`, as
the OpenCV backend also sets it): every contender then gets its parallelism only from running
images on `threads` worker threads, and a "1 thread" cell really uses one core for the pixel
work. augserve and albumentations split a batch over their threads alike, as the OpenCV backend
does (`run_samples`: one task per thread, each taking the batch's next image).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

# albumentations checks PyPI for a newer release on import; a benchmark must not touch the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A
import cv2
import numpy as np
import skimage.data

# common sits beside this file: `python benchmarks/bench_backends.py` puts this folder on
# sys.path.
from common import (
    JPEG_QUALITY,
    SAMPLE_PHOTOS,
    check_range,
    library_versions,
    machine_info,
    print_machine,
    write_json,
)

from augserve.backends.batch import SourceImage, augment_batch
from augserve.backends.dali import DaliBackend, dali_available
from augserve.backends.opencv import OpenCVBackend, apply_plan, decode_stored, run_samples
from augserve.core.plan import make_plan
from augserve.core.spec import AugmentSpec

SPEC = {
    "ops": [
        {"rotate": {"degrees": 20}},
        {"shift": {"x": 0.1, "y": 0.1}},
        {"flip": {"horizontal": 0.5}},
        {"random_resized_crop": {"size": 224}},
        {"brightness": {"factor": 0.2}},
        {"contrast": {"factor": 0.2}},
        {"saturation": {"factor": 0.2}},
    ]
}
OUTPUT_SIZE = 224
# Input sets: name -> (width, height), as cv2.resize takes it.
INPUT_SIZES = {"256×256": (256, 256), "500×375": (500, 375)}
SEED = 0
VERSIONED_PACKAGES = (
    "augserve",
    "numpy",
    "opencv-python-headless",
    "albumentations",
    "scikit-image",
)

OPENCV = "augserve opencv"
DALI_CPU = "augserve dali-cpu"
ALBUMENTATIONS = "albumentations"
DECODE_EXCLUDED = "decode excluded"
DECODE_INCLUDED = "decode included"
ROWS = (
    (OPENCV, DECODE_EXCLUDED),
    (OPENCV, DECODE_INCLUDED),
    (DALI_CPU, DECODE_EXCLUDED),
    (DALI_CPU, DECODE_INCLUDED),
    (ALBUMENTATIONS, DECODE_EXCLUDED),
    (ALBUMENTATIONS, DECODE_INCLUDED),
)
ROW_NOTES = {
    (OPENCV, DECODE_EXCLUDED): "apply_plan, plans drawn",
    (OPENCV, DECODE_INCLUDED): "augment_batch",
    (DALI_CPU, DECODE_EXCLUDED): "n/a: pipeline decodes",
    (DALI_CPU, DECODE_INCLUDED): "augment_batch",
    (ALBUMENTATIONS, DECODE_EXCLUDED): "Compose on arrays",
    (ALBUMENTATIONS, DECODE_INCLUDED): "imdecode + cvtColor",
}
TARGET_RATIO = 2.0
# Each cell's time is split into this many rounds, interleaved with the other contenders.
ROUNDS = 3

# Runs one batch (its index selects the plans' epoch) and returns how many images it produced.
BatchRunner = Callable[[int], int]


@dataclass(frozen=True)
class BenchConfig:
    """What one run measures: `seconds` of timed batches per cell (in ROUNDS interleaved
    rounds) after one warm-up batch, at each of `thread_counts`."""

    seconds: float = 3.0
    batch_size: int = 32
    thread_counts: tuple[int, ...] = (1, 2)
    json_path: str | None = None

    def __post_init__(self) -> None:
        check_range("seconds", self.seconds, 0.1, 600)
        check_range("batch_size", self.batch_size, 1, 256)
        if not self.thread_counts or min(self.thread_counts) < 1:
            raise ValueError(f"thread_counts: expected positive counts, got {self.thread_counts}")


@dataclass(frozen=True)
class ImageSet:
    """One input set, as a batch: `encoded[i]` is JPEG bytes, `decoded[i]` what augserve's
    `decode_stored` makes of them ([H, W, 3] uint8 RGB), so both modes see the same pixels."""

    name: str
    encoded: tuple[bytes, ...]
    decoded: tuple[np.ndarray, ...]
    sources: tuple[SourceImage, ...]


@dataclass(frozen=True)
class Cell:
    """One measurement: `images_per_second` is the median of `round_rates`, None where the
    contender cannot run the mode; `images` and `seconds` are the totals over the rounds."""

    backend: str
    mode: str
    input_set: str
    threads: int
    images_per_second: float | None
    images: int = 0
    seconds: float = 0.0
    round_rates: tuple[float, ...] = ()


# --- inputs ----------------------------------------------------------------------------------


def make_image_sets(batch_size: int) -> list[ImageSet]:
    """Each input size as a batch of `batch_size` images cycling through the sample photos."""
    photos = [getattr(skimage.data, name)() for name in SAMPLE_PHOTOS]
    image_sets = []
    for set_name, (width, height) in INPUT_SIZES.items():
        encoded_photos = []
        for photo in photos:
            resized = cv2.resize(photo, (width, height), interpolation=cv2.INTER_AREA)
            bgr = cv2.cvtColor(resized, cv2.COLOR_RGB2BGR)
            ok, buffer = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            if not ok:
                raise RuntimeError(f"could not encode a {set_name} JPEG")
            encoded_photos.append(buffer.tobytes())
        decoded_photos = [decode_stored(data) for data in encoded_photos]
        picks = [index % len(photos) for index in range(batch_size)]
        names = [f"{SAMPLE_PHOTOS[pick]}_{set_name}.jpg" for pick in picks]
        image_sets.append(
            ImageSet(
                name=set_name,
                encoded=tuple(encoded_photos[pick] for pick in picks),
                decoded=tuple(decoded_photos[pick] for pick in picks),
                sources=tuple(
                    SourceImage(sample_id, 0, names[sample_id], encoded_photos[pick])
                    for sample_id, pick in enumerate(picks)
                ),
            )
        )
    return image_sets


# --- contenders ------------------------------------------------------------------------------


def check_no_failures(failures: dict[int, str]) -> None:
    """Every image of a timed batch must succeed: a failed one would count without its work."""
    if failures:
        raise RuntimeError(f"{len(failures)} images of a batch failed: {failures}")


def build_albumentations() -> A.Compose:
    """The spec's ops in albumentations. Affine and ColorJitter default to p=0.5; augserve
    always applies its rotate, shift and colour ops, so both get p=1."""
    return A.Compose(
        [
            A.Affine(rotate=(-20, 20), translate_percent=(-0.1, 0.1), p=1.0),
            A.HorizontalFlip(p=0.5),
            A.RandomResizedCrop(size=(OUTPUT_SIZE, OUTPUT_SIZE), p=1.0),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.0, p=1.0),
        ]
    )


class AlbumentationsPool:
    """Runs the albumentations Compose over images on `threads` worker threads, one Compose per
    thread: a Compose keeps its random generators on itself, and sharing one across threads
    would make them race."""

    def __init__(self, threads: int) -> None:
        self._threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="bench-albumentations")
        self._local = threading.local()

    def _compose(self) -> A.Compose:
        compose = getattr(self._local, "compose", None)
        if compose is None:
            compose = self._local.compose = build_albumentations()
        return compose

    def augment(self, images: Sequence[np.ndarray], decode: bool) -> np.ndarray:
        """`images` are [H, W, 3] uint8 RGB arrays, or JPEG bytes when `decode`.
        Returns [N, 224, 224, 3] uint8 RGB, the batch form augserve returns."""
        out = np.empty((len(images), OUTPUT_SIZE, OUTPUT_SIZE, 3), np.uint8)

        def run(index: int) -> None:
            image = images[index]
            if decode:
                image = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR)
                image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
            out[index] = self._compose()(image=image)["image"]

        check_no_failures(run_samples(self._pool, self._threads, len(images), run))
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def apply_plan_runner(
    pool: ThreadPoolExecutor, threads: int, spec: AugmentSpec, image_set: ImageSet
) -> BatchRunner:
    """Decode excluded for augserve OpenCV: plans drawn in the caller, then `apply_plan` on the
    pool, split as `augment_batch` + `OpenCVBackend.augment` split it (`run_samples`)."""

    def run(batch_index: int) -> int:
        plans = [
            make_plan(spec, SEED, batch_index, source.sample_id, image.shape[:2])
            for source, image in zip(image_set.sources, image_set.decoded, strict=True)
        ]
        out = np.empty((len(plans), OUTPUT_SIZE, OUTPUT_SIZE, 3), np.uint8)

        def run_one(index: int) -> None:
            apply_plan(image_set.decoded[index], plans[index], out[index])

        check_no_failures(run_samples(pool, threads, len(plans), run_one))
        return len(out)

    return run


def augserve_runner(
    backend: OpenCVBackend | DaliBackend, spec: AugmentSpec, image_set: ImageSet
) -> BatchRunner:
    """Decode included for an augserve backend; the batch index is the epoch, so every batch
    draws new plans."""

    def run(batch_index: int) -> int:
        return len(augment_batch(backend, spec, SEED, batch_index, image_set.sources).images)

    return run


def albumentations_runner(
    pool: AlbumentationsPool, image_set: ImageSet, decode: bool
) -> BatchRunner:
    """Either mode for albumentations; the batch index is unused (the Composes draw their own
    parameters on every call)."""
    images = image_set.encoded if decode else image_set.decoded

    def run(batch_index: int) -> int:
        return len(pool.augment(images, decode))

    return run


# --- measuring -------------------------------------------------------------------------------


def measure(runner: BatchRunner, seconds: float, first_batch_index: int) -> tuple[int, float, int]:
    """Run whole batches for at least `seconds`: (images, elapsed seconds, next batch index)."""
    images = 0
    batch_index = first_batch_index
    start = time.perf_counter()
    while True:
        images += runner(batch_index)
        batch_index += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return images, elapsed, batch_index


def measure_group(
    runners: dict[tuple[str, str], BatchRunner | None], input_set: str, threads: int, seconds: float
) -> list[Cell]:
    """One cell per runner: a warm-up batch each (it also builds DALI pipelines and per-thread
    Composes), then ROUNDS rounds of `seconds / ROUNDS` per runner, taken in turn, so load that
    comes and goes on a shared machine hits every contender alike. A cell's rate is the median
    of its rounds."""
    live = {key: runner for key, runner in runners.items() if runner is not None}
    for runner in live.values():
        runner(0)
    next_batch = dict.fromkeys(live, 1)
    rounds: dict[tuple[str, str], list[tuple[int, float]]] = {key: [] for key in live}
    for _ in range(ROUNDS):
        for key, runner in live.items():
            images, elapsed, next_batch[key] = measure(runner, seconds / ROUNDS, next_batch[key])
            rounds[key].append((images, elapsed))
    cells = []
    for backend_name, mode in runners:
        if (backend_name, mode) not in live:
            cells.append(Cell(backend_name, mode, input_set, threads, None))
            continue
        measured = rounds[(backend_name, mode)]
        rates = tuple(images / elapsed for images, elapsed in measured)
        cell = Cell(
            backend_name,
            mode,
            input_set,
            threads,
            float(np.median(rates)),
            sum(images for images, _ in measured),
            sum(elapsed for _, elapsed in measured),
            rates,
        )
        round_text = ", ".join(f"{rate:.0f}" for rate in rates)
        print(
            f"  {input_set} {threads} thread(s) {backend_name:18} {mode:16} "
            f"{cell.images_per_second:8.0f} images/s (rounds: {round_text})",
            file=sys.stderr,
            flush=True,
        )
        cells.append(cell)
    return cells


def run_benchmark(config: BenchConfig) -> list[Cell]:
    """Every cell, grouped by input set and thread count (see `measure_group`)."""
    spec = AugmentSpec.from_dict(SPEC)
    image_sets = make_image_sets(config.batch_size)
    has_dali = dali_available()
    cells: list[Cell] = []
    for image_set in image_sets:
        for threads in config.thread_counts:
            apply_plan_pool = ThreadPoolExecutor(threads, thread_name_prefix="bench-apply-plan")
            albumentations_pool = AlbumentationsPool(threads)
            opencv_backend = OpenCVBackend(threads)
            dali_backend = (
                DaliBackend(None, threads=threads, max_batch_size=config.batch_size)
                if has_dali
                else None
            )
            runners: dict[tuple[str, str], BatchRunner | None] = {
                (OPENCV, DECODE_EXCLUDED): apply_plan_runner(
                    apply_plan_pool, threads, spec, image_set
                ),
                (OPENCV, DECODE_INCLUDED): augserve_runner(opencv_backend, spec, image_set),
                (DALI_CPU, DECODE_EXCLUDED): None,
                (DALI_CPU, DECODE_INCLUDED): (
                    augserve_runner(dali_backend, spec, image_set) if dali_backend else None
                ),
                (ALBUMENTATIONS, DECODE_EXCLUDED): (
                    albumentations_runner(albumentations_pool, image_set, decode=False)
                ),
                (ALBUMENTATIONS, DECODE_INCLUDED): (
                    albumentations_runner(albumentations_pool, image_set, decode=True)
                ),
            }
            try:
                cells.extend(measure_group(runners, image_set.name, threads, config.seconds))
            finally:
                apply_plan_pool.shutdown(wait=True)
                albumentations_pool.close()
                opencv_backend.close()
                if dali_backend is not None:
                    dali_backend.close()
    return cells


def plan_draws_per_second(seconds: float) -> float:
    """`make_plan` alone for a 500×375 image: per-sample Python work in every augserve cell."""
    spec = AugmentSpec.from_dict(SPEC)
    count = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        make_plan(spec, SEED, 0, count, (375, 500))
        count += 1
    return count / (time.perf_counter() - start)


# --- reporting -------------------------------------------------------------------------------


def versions_with_dali() -> dict[str, str]:
    versions = library_versions(VERSIONED_PACKAGES)
    if dali_available():
        import nvidia.dali

        versions["nvidia-dali"] = nvidia.dali.__version__
    else:
        versions["nvidia-dali"] = "not installed"
    return versions


def markdown_tables(cells: Sequence[Cell], thread_counts: Sequence[int]) -> str:
    """Images/s per row (backend × mode) and column (input set × threads), then the same cells
    as ratios to albumentations in the same mode."""
    lookup = {(c.backend, c.mode, c.input_set, c.threads): c.images_per_second for c in cells}
    columns = [(name, threads) for name in INPUT_SIZES for threads in thread_counts]
    header = (
        "| backend | mode | "
        + " | ".join(
            f"{name}, {threads} thread{'s' if threads > 1 else ''}" for name, threads in columns
        )
        + " |"
    )
    rule = "|---|---|" + "---:|" * len(columns)

    def rate_text(value: float | None) -> str:
        return "n/a" if value is None else f"{value:,.0f}"

    def ratio_text(value: float | None, baseline: float | None) -> str:
        return "n/a" if value is None or not baseline else f"{value / baseline:.2f}×"

    rates = [header, rule]
    ratios = [header, rule]
    for backend_name, mode in ROWS:
        label = f"| {backend_name} | {mode} ({ROW_NOTES[(backend_name, mode)]}) | "
        values = [lookup.get((backend_name, mode, name, threads)) for name, threads in columns]
        baselines = [lookup.get((ALBUMENTATIONS, mode, name, threads)) for name, threads in columns]
        rates.append(label + " | ".join(rate_text(v) for v in values) + " |")
        pairs = zip(values, baselines, strict=True)
        ratio_cells = [ratio_text(value, baseline) for value, baseline in pairs]
        ratios.append(label + " | ".join(ratio_cells) + " |")
    return (
        "Images per second (224×224 outputs):\n\n"
        + "\n".join(rates)
        + "\n\nRatio to albumentations in the same mode:\n\n"
        + "\n".join(ratios)
    )


def target_summary(cells: Sequence[Cell]) -> tuple[float | None, str]:
    """The smallest decode-excluded OpenCV / albumentations ratio over all columns, in words."""
    lookup = {(c.backend, c.mode, c.input_set, c.threads): c.images_per_second for c in cells}
    ratios = []
    for cell in cells:
        if (cell.backend, cell.mode) != (OPENCV, DECODE_EXCLUDED) or cell.images_per_second is None:
            continue
        baseline = lookup.get((ALBUMENTATIONS, DECODE_EXCLUDED, cell.input_set, cell.threads))
        if baseline:
            ratios.append(cell.images_per_second / baseline)
    if not ratios:
        return None, "Target (OpenCV backend ≥ 2× albumentations, decode excluded): not measured."
    low, high = min(ratios), max(ratios)
    verdict = "met in every column" if low >= TARGET_RATIO else "NOT met in every column"
    return low, (
        f"Target (OpenCV backend ≥ {TARGET_RATIO:.0f}× albumentations, decode excluded): "
        f"measured {low:.2f}× to {high:.2f}×, {verdict}."
    )


def parse_args(argv: Sequence[str] | None = None) -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="timed seconds per cell (default 3)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    parser.add_argument(
        "--json", dest="json_path", default=None, help="also write raw numbers to this file"
    )
    args = parser.parse_args(argv)
    all_threads = os.cpu_count() or 1
    thread_counts = (1,) if all_threads == 1 else (1, all_threads)
    return BenchConfig(args.seconds, args.batch_size, thread_counts, args.json_path)


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_args(argv)
    cv2.setNumThreads(1)  # see the module docstring: parallelism comes from worker threads only
    machine = machine_info()
    versions = versions_with_dali()
    timed_cells = len(INPUT_SIZES) * len(config.thread_counts) * (len(ROWS) - 1)
    print(
        f"Measuring {timed_cells} cells of {config.seconds:g} s each "
        "(DALI decode-excluded is n/a)...",
        file=sys.stderr,
        flush=True,
    )
    cells = run_benchmark(config)
    plans_per_second = plan_draws_per_second(min(config.seconds, 1.0))
    lowest_ratio, target_line = target_summary(cells)

    print_machine(machine, versions)
    print(
        f"Batch size {config.batch_size}; {config.seconds:g} s per cell after one warm-up batch, "
        f"as {ROUNDS} interleaved rounds, median reported; cv2.setNumThreads(1); "
        f"threads = {', '.join(map(str, config.thread_counts))}."
    )
    print()
    print(markdown_tables(cells, config.thread_counts))
    print()
    print(target_line)
    print(
        f"make_plan alone: {plans_per_second:,.0f} plans/s on one thread "
        "(counted in every augserve cell)."
    )

    if config.json_path:
        write_json(
            config.json_path,
            {
                "machine": machine,
                "versions": versions,
                "config": asdict(config),
                "spec": SPEC,
                "cells": [asdict(cell) for cell in cells],
                "plan_draws_per_second": plans_per_second,
                "target_ratio": TARGET_RATIO,
                "lowest_decode_excluded_ratio": lowest_ratio,
            },
        )


if __name__ == "__main__":
    main()
