"""Images per second with boxes and masks against images alone, on the OpenCV and DALI CPU
backends, side by side in one run.

    python benchmarks/bench_targets.py [--seconds S] [--image-side N] [--json PATH] [--quick]

Data: the demo scenes (`augserve.data.demo_scenes`, one to three shapes per picture with their
COCO boxes and polygons and their PNG label maps) generated at N×N (default 256) in a scratch
folder, served as a COCO file and as a label-map folder.

What runs is what a server's producer does for one batch (`augserve.backends.batch`): read the
files, check headers and draw plans, read each sample's annotations (`load_targets`: boxes from
the parsed COCO file, the label map decoded from its polygons or read from its PNG), run the
backend on the images, then map boxes on the host and warp each mask with nearest sampling
(`finish_batch`) into one reused output. Rows, per backend:
- images: images and labels only;
- boxes + masks (COCO): boxes and a mask decoded from polygons per image;
- masks (label maps): a PNG label map read and decoded per image.

Each row's --seconds is split into rounds taken in turn with the other rows of its backend (the
machine may be shared); the median round's images/s and this process's CPU ms per image are
reported, with each row's ratio to the images row of the same backend.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from common import library_versions, machine_info, print_machine, read_plainly, window_arguments, write_json

from augserve.backends.batch import finish_batch, load_targets, prepare_batch, run_batch
from augserve.backends.dali import DaliBackend
from augserve.backends.opencv import OpenCVBackend
from augserve.core.images import HeaderCache
from augserve.core.policy import BadImagePolicy
from augserve.core.spec import AugmentSpec
from augserve.core.targets import TargetRequest
from augserve.data.datasets import Manifest, epoch_order, load_manifest
from augserve.data.demo_scenes import COCO_FILE, SceneConfig, generate_scenes

BATCH_SIZE = 32
SCENES = 192
ROUNDS = 4
THREADS = 2
OUTPUT_SIDE = 224
ROWS = (
    ("images", "coco", TargetRequest()),
    ("boxes + masks (COCO)", "coco", TargetRequest(boxes=True, masks=True)),
    ("masks (label maps)", "label_maps", TargetRequest(masks=True)),
)


def spec() -> AugmentSpec:
    return AugmentSpec.from_dict(
        {"ops": [{"rotate": {"degrees": 15}}, {"flip": {"horizontal": 0.5}}, {"random_resized_crop": {"size": [OUTPUT_SIDE, OUTPUT_SIDE]}}]}
    )


@dataclass
class RowResult:
    backend: str
    row: str
    images_per_second: float
    cpu_ms_per_image: float
    rounds: list[float]
    ratio_to_images: float = 0.0


def run_for(backend, manifest: Manifest, request: TargetRequest, seconds: float, out: np.ndarray, masks_out: np.ndarray) -> tuple[float, float]:
    """(images/s, CPU ms per image) of producer-style batches for `seconds`."""
    augment_spec, headers, policy = spec(), HeaderCache(), BadImagePolicy()
    order = epoch_order(np.arange(len(manifest), dtype=np.int64), 0, 0, 0, 1, shuffle=True)
    images, position = 0, 0
    started, cpu_started = time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        ids = order[position : position + BATCH_SIZE].tolist()
        position = (position + BATCH_SIZE) % (len(order) - BATCH_SIZE)
        prepared = prepare_batch(augment_spec, 0, 0, read_plainly(manifest, ids), policy, out=out, headers=headers)
        if request.any:
            load_targets(prepared, manifest.targets, request)
        batch = finish_batch(prepared, run_batch(backend, prepared), masks_out if request.masks else None)
        images += len(batch.sample_ids)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return images / wall, 1000.0 * cpu / max(images, 1)


def main(argv: list[str] | None = None) -> int:
    args = window_arguments(
        argv, __doc__.splitlines()[0], seconds=24.0, quick_seconds=4.0, quick_what="the OpenCV backend only",
        add_arguments=lambda parser: parser.add_argument("--image-side", type=int, default=256),
    )
    print_machine(machine_info(), library_versions(["numpy", "nvidia-dali-cuda130", "pycocotools"]))
    with tempfile.TemporaryDirectory(prefix="augserve-bench-targets-") as scratch:
        root = Path(scratch) / "scenes"
        generate_scenes(root, SceneConfig(images=SCENES, image_size=args.image_side))
        manifests = {"coco": load_manifest(root / COCO_FILE, use_cache=False), "label_maps": load_manifest(root, use_cache=False)}
        out = np.empty((BATCH_SIZE, OUTPUT_SIDE, OUTPUT_SIDE, 3), np.uint8)
        masks_out = np.empty((BATCH_SIZE, OUTPUT_SIDE, OUTPUT_SIDE), np.uint8)
        backends = {"opencv": lambda: OpenCVBackend(threads=THREADS)}
        if not args.quick:
            backends["dali-cpu"] = lambda: DaliBackend(device_id=None, threads=THREADS)
        rounds = 1 if args.quick else ROUNDS
        results: list[RowResult] = []
        for backend_name, make in backends.items():
            backend = make()
            try:
                for _, dataset, request in ROWS:  # warm-up: pipelines built, files in the page cache
                    run_for(backend, manifests[dataset], request, 1.0, out, masks_out)
                samples: dict[str, list[tuple[float, float]]] = {row: [] for row, _, _ in ROWS}
                for _ in range(rounds):
                    for row, dataset, request in ROWS:
                        samples[row].append(run_for(backend, manifests[dataset], request, args.seconds / rounds, out, masks_out))
            finally:
                backend.close()
            for row, _, _ in ROWS:
                rates = [rate for rate, _ in samples[row]]
                results.append(RowResult(backend_name, row, statistics.median(rates), statistics.median(cpu for _, cpu in samples[row]), rates))
            base = next(result for result in results if result.backend == backend_name and result.row == "images")
            for result in results:
                if result.backend == backend_name:
                    result.ratio_to_images = result.images_per_second / base.images_per_second
    print(f"\n{BATCH_SIZE} images per batch, {args.image_side}² JPEG scenes -> {OUTPUT_SIDE}², {THREADS} threads, median of {rounds} rounds")
    print(f"{'backend':<10} {'row':<22} {'images/s':>9} {'CPU ms/img':>11} {'vs images':>10}   rounds")
    for result in results:
        spread = " ".join(f"{rate:.0f}" for rate in result.rounds)
        print(
            f"{result.backend:<10} {result.row:<22} {result.images_per_second:9.0f} {result.cpu_ms_per_image:11.2f} "
            f"{result.ratio_to_images:10.2f}   {spread}"
        )
    if args.json_path:
        write_json(args.json_path, {"machine": machine_info(), "results": [asdict(result) for result in results]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
