"""Images per second of RandAugment(2, 9) on augserve's OpenCV and DALI CPU backends, beside
the plain pipeline and beside torchvision's RandAugment done with PIL, on the same photographs
and the same threads.

    python benchmarks/bench_policies.py [--seconds S] [--batch-size B] [--threads 1 2] [--json PATH]

Inputs: the scikit-image sample photos (common.SAMPLE_PHOTOS) resized to 256×256, JPEG quality
90; a batch of B images cycling through them. Every contender goes from JPEG bytes to
[224, 224, 3] uint8 RGB (decode included).

Pipelines:
- plain: random_resized_crop to 224 (scale [0.08, 1]), horizontal flip (p 0.5);
- randaugment: plain, then RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=31).

Contenders, each on T worker threads (one task per thread taking the batch's next image, as the
OpenCV backend runs a batch; OpenCV's own thread pool is off for the whole run):
- augserve OpenCV: `augment_batch` (header check, plan drawing, decode, one warp, one colour
  matrix, the pixel steps);
- augserve DALI CPU: `augment_batch` on `DaliBackend(device_id=None, threads=T)` (DALI's
  CPU mode exists for parity tests: the GPU is its target);
- PIL: what a torchvision pipeline does with PIL images: `Image.open` + convert("RGB"),
  RandomResizedCrop's window (torchvision's get_params) resized with PIL's bilinear filter, the
  flip, and RandAugment as torchvision's `_apply_op` runs it on PIL images (each sub-op on its
  own: ShearX/Y and TranslateX/Y by `Image.transform` with torchvision's affine data, Rotate by
  `Image.rotate`, NEAREST as torchvision's default; ImageEnhance for Brightness, Color, Contrast,
  Sharpness; ImageOps for Posterize, Solarize, AutoContrast, Equalize). torchvision itself has no
  build here for the CPU torch (0.28's wheel needs the CUDA torch's operators), so this stands in
  for it: the same kernels torchvision calls for PIL inputs, without its Python dispatch.

Each cell's `--seconds` is split into rounds taken in turn with the other contenders of its
thread count, and the median round is reported (the machine may be shared), in images per
second of wall time and in milliseconds of this process's CPU time per image (every thread of
it, DALI's included): the second is what other load on a shared machine disturbs least.
"""

from __future__ import annotations

import argparse
import io
import itertools
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import skimage.data
from common import (
    JPEG_QUALITY,
    SAMPLE_PHOTOS,
    library_versions,
    machine_info,
    print_machine,
    write_json,
)
from PIL import Image, ImageEnhance, ImageOps

from augserve.backends.batch import SourceImage, augment_batch
from augserve.backends.dali import DaliBackend, dali_available
from augserve.backends.opencv import OpenCVBackend
from augserve.core.ops.policies import RAND_AUGMENT_SPACE, magnitudes_of
from augserve.core.spec import AugmentSpec

SIDE = 256
OUTPUT = 224
NUM_OPS, MAGNITUDE, BINS = 2, 9, 31
PLAIN_OPS = [{"random_resized_crop": {"size": OUTPUT}}, {"flip": {"horizontal": 0.5}}]
SPECS = {
    "plain": {"ops": PLAIN_OPS},
    "randaugment": {
        "ops": PLAIN_OPS + [{"rand_augment": {"num_ops": NUM_OPS, "magnitude": MAGNITUDE, "bins": BINS}}]
    },
}
ROUNDS = 3
VERSIONED_PACKAGES = ("numpy", "opencv-python-headless", "pillow", "nvidia-dali-cuda130")


@dataclass
class Cell:
    contender: str
    pipeline: str
    threads: int
    images_per_second: float
    cpu_ms_per_image: float
    rounds: list[float]


def make_batch(batch_size: int) -> list[bytes]:
    encoded = []
    for name in SAMPLE_PHOTOS:
        photo = cv2.resize(getattr(skimage.data, name)(), (SIDE, SIDE), interpolation=cv2.INTER_AREA)
        if photo.ndim == 2:
            photo = np.repeat(photo[..., None], 3, axis=2)
        ok, buffer = cv2.imencode(".jpg", cv2.cvtColor(photo, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        assert ok
        encoded.append(buffer.tobytes())
    return [encoded[index % len(encoded)] for index in range(batch_size)]


# --- the PIL contender: torchvision's RandAugment on PIL images ---------------------------------


def _random_resized_crop_box(rng: random.Random, width: int, height: int) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params (scale [0.08, 1], ratio [3/4, 4/3]) as a PIL box."""
    area = width * height
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            return left, top, left + w, top + h
    return 0, 0, width, height


def _pil_affine(picture: Image.Image, data: tuple[float, ...]) -> Image.Image:
    return picture.transform(picture.size, Image.Transform.AFFINE, data, Image.Resampling.NEAREST)


PIL_SUB_OPS: dict[str, Callable[[Image.Image, float], Image.Image]] = {
    "Identity": lambda picture, m: picture,
    "ShearX": lambda picture, m: _pil_affine(picture, (1, m, 0, 0, 1, 0)),
    "ShearY": lambda picture, m: _pil_affine(picture, (1, 0, 0, m, 1, 0)),
    "TranslateX": lambda picture, m: _pil_affine(picture, (1, 0, -int(m), 0, 1, 0)),
    "TranslateY": lambda picture, m: _pil_affine(picture, (1, 0, 0, 0, 1, -int(m))),
    "Rotate": lambda picture, m: picture.rotate(m, Image.Resampling.NEAREST),
    "Brightness": lambda picture, m: ImageEnhance.Brightness(picture).enhance(1 + m),
    "Color": lambda picture, m: ImageEnhance.Color(picture).enhance(1 + m),
    "Contrast": lambda picture, m: ImageEnhance.Contrast(picture).enhance(1 + m),
    "Sharpness": lambda picture, m: ImageEnhance.Sharpness(picture).enhance(1 + m),
    "Posterize": lambda picture, m: ImageOps.posterize(picture, int(m)),
    "Solarize": lambda picture, m: ImageOps.solarize(picture, m),
    "AutoContrast": lambda picture, m: ImageOps.autocontrast(picture),
    "Equalize": lambda picture, m: ImageOps.equalize(picture),
}


def pil_rand_augment(picture: Image.Image, rng: random.Random) -> Image.Image:
    """torchvision's RandAugment(2, 9, 31).forward on a PIL image: sub-op and sign drawn per op."""
    names = list(RAND_AUGMENT_SPACE)
    size = (picture.height, picture.width)
    for _ in range(NUM_OPS):
        name = names[rng.randrange(len(names))]
        table = magnitudes_of(RAND_AUGMENT_SPACE, name, BINS, size)
        magnitude = 0.0 if table is None else table[MAGNITUDE]
        if RAND_AUGMENT_SPACE[name].signed and rng.random() < 0.5:
            magnitude = -magnitude
        picture = PIL_SUB_OPS[name](picture, magnitude)
    return picture


def pil_sample(data: bytes, pipeline: str, seed: int, out: np.ndarray) -> None:
    rng = random.Random(seed)
    picture = Image.open(io.BytesIO(data)).convert("RGB")
    box = _random_resized_crop_box(rng, picture.width, picture.height)
    picture = picture.resize((OUTPUT, OUTPUT), Image.Resampling.BILINEAR, box=box)
    if rng.random() < 0.5:
        picture = ImageOps.mirror(picture)
    if pipeline == "randaugment":
        picture = pil_rand_augment(picture, rng)
    out[...] = np.asarray(picture)


class PilRunner:
    """One batch at a time on `threads` worker threads, each taking the next image."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="bench-pil")

    def run(self, encoded: Sequence[bytes], pipeline: str, batch_index: int, out: np.ndarray) -> None:
        take = itertools.count().__next__
        base = batch_index * len(encoded)

        def work() -> None:
            index = take()
            while index < len(encoded):
                pil_sample(encoded[index], pipeline, base + index, out[index])
                index = take()

        wait([self.pool.submit(work) for _ in range(self.threads)])

    def close(self) -> None:
        self.pool.shutdown()


# --- measuring ---------------------------------------------------------------------------------


BatchRun = Callable[[int], None]  # batch index -> one batch done


def augserve_run(backend, encoded: Sequence[bytes], pipeline: str, out: np.ndarray) -> BatchRun:
    spec = AugmentSpec.from_dict(SPECS[pipeline])
    sources = [SourceImage(index, 0, f"image-{index}", data) for index, data in enumerate(encoded)]

    def run(batch_index: int) -> None:
        batch = augment_batch(backend, spec, 0, batch_index, sources, out=out)
        if batch.skipped:
            raise RuntimeError(f"images failed: {batch.skipped}")

    return run


def timed_round(run: BatchRun, seconds: float, batch_size: int, first_batch: int) -> tuple[float, float, int]:
    """(images per second, CPU milliseconds per image) over whole batches for at least
    `seconds`, and the next batch index."""
    run(first_batch)  # warm: pipelines built, caches filled
    started, cpu_started, batches = time.perf_counter(), time.process_time(), 0
    while True:
        run(first_batch + 1 + batches)
        batches += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            images = batches * batch_size
            cpu_ms = 1000 * (time.process_time() - cpu_started) / images
            return images / elapsed, cpu_ms, first_batch + 2 + batches


def measure(
    contenders: dict[str, BatchRun], seconds: float, batch_size: int
) -> dict[str, list[tuple[float, float]]]:
    rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    batch_index = 0
    for _ in range(ROUNDS):
        for name, run in contenders.items():
            rate, cpu_ms, batch_index = timed_round(run, seconds / ROUNDS, batch_size, batch_index)
            rounds[name].append((rate, cpu_ms))
    return rounds


def run_benchmark(seconds: float, batch_size: int, thread_counts: Sequence[int]) -> list[Cell]:
    encoded = make_batch(batch_size)
    out = np.empty((batch_size, OUTPUT, OUTPUT, 3), np.uint8)
    cells = []
    for threads in thread_counts:
        opencv = OpenCVBackend(threads=threads)
        dali = DaliBackend(device_id=None, threads=threads) if dali_available() else None
        pil = PilRunner(threads)
        try:
            contenders: dict[tuple[str, str], BatchRun] = {}
            for pipeline in SPECS:
                contenders[("augserve OpenCV", pipeline)] = augserve_run(opencv, encoded, pipeline, out)
                if dali is not None:
                    contenders[("augserve DALI CPU", pipeline)] = augserve_run(dali, encoded, pipeline, out)
                contenders[("PIL (torchvision's kernels)", pipeline)] = (
                    lambda batch_index, pipeline=pipeline, pil=pil: pil.run(encoded, pipeline, batch_index, out)
                )
            rates = measure(
                {f"{contender}|{pipeline}": run for (contender, pipeline), run in contenders.items()},
                seconds,
                batch_size,
            )
            for key, values in rates.items():
                contender, pipeline = key.split("|")
                rate = statistics.median(value[0] for value in values)
                cpu_ms = statistics.median(value[1] for value in values)
                cells.append(Cell(contender, pipeline, threads, rate, cpu_ms, [value[0] for value in values]))
                print(
                    f"  {threads} thread(s) {contender:28} {pipeline:12} {rate:8.0f} images/s "
                    f"{cpu_ms:6.2f} CPU ms/image (rounds {', '.join(f'{value[0]:.0f}' for value in values)})",
                    flush=True,
                )
        finally:
            opencv.close()
            pil.close()
            if dali is not None:
                dali.close()
    return cells


def markdown_table(cells: Sequence[Cell], thread_counts: Sequence[int]) -> str:
    """Images/s per cell, and CPU ms per image; RandAugment ÷ plain in images/s."""
    by_key = {(cell.contender, cell.pipeline, cell.threads): cell for cell in cells}
    contenders = list(dict.fromkeys(cell.contender for cell in cells))
    columns = [(threads, pipeline) for threads in thread_counts for pipeline in SPECS]
    header = "| contender | " + " | ".join(
        f"{pipeline}, {threads} thread{'s' if threads > 1 else ''}" for threads, pipeline in columns
    ) + " | RandAugment ÷ plain |"
    lines = [
        "images/s (CPU ms per image):",
        "",
        header,
        "|---|" + "---:|" * len(columns) + "---|",
    ]
    for contender in contenders:
        values = [by_key[(contender, pipeline, threads)] for threads, pipeline in columns]
        ratios = [
            by_key[(contender, "randaugment", threads)].images_per_second
            / by_key[(contender, "plain", threads)].images_per_second
            for threads in thread_counts
        ]
        lines.append(
            f"| {contender} | "
            + " | ".join(f"{cell.images_per_second:,.0f} ({cell.cpu_ms_per_image:.2f})" for cell in values)
            + " | " + " / ".join(f"{ratio:.2f}" for ratio in ratios) + " |"
        )
    pil = "PIL (torchvision's kernels)"
    lines.append("")
    for threads in thread_counts:
        ours, theirs = by_key[("augserve OpenCV", "randaugment", threads)], by_key[(pil, "randaugment", threads)]
        lines.append(
            f"augserve OpenCV ÷ PIL on RandAugment, {threads} thread(s): "
            f"{ours.images_per_second / theirs.images_per_second:.2f}× images/s, "
            f"{theirs.cpu_ms_per_image / ours.cpu_ms_per_image:.2f}× less CPU per image"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per cell, in 3 rounds (default 6)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--json", dest="json_path", default=None, help="also write the raw numbers here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cv2.setNumThreads(1)
    thread_counts = sorted(set(args.threads))
    machine, versions = machine_info(), library_versions(VERSIONED_PACKAGES)
    print_machine(machine, versions)
    print(f"{len(SAMPLE_PHOTOS)} photos at {SIDE}×{SIDE} JPEG q{JPEG_QUALITY}, batches of {args.batch_size}, "
          f"{args.seconds:g} s per cell in {ROUNDS} rounds")
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    cells = run_benchmark(args.seconds, args.batch_size, thread_counts)
    load_after = os.getloadavg()[0]
    print()
    print(markdown_table(cells, thread_counts))
    # The run's own threads count in the load average too (up to the largest thread count).
    print(f"\n({time.perf_counter() - started:.0f} s; 1-minute load average {load_before:.1f} before, {load_after:.1f} after)")
    if args.json_path:
        write_json(
            args.json_path,
            {
                "machine": machine,
                "versions": versions,
                "load_average": [load_before, load_after],
                "cells": [asdict(cell) for cell in cells],
            },
        )


if __name__ == "__main__":
    sys.exit(main())
