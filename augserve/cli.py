"""The `augserve` command line."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

from augserve.backends import BACKEND_CHOICES, create_backend
from augserve.demo import DemoConfig, ensure_demo_dataset
from augserve.errors import AugserveError
from augserve.produce import SourceImage, augment_batch
from augserve.spec import AugmentSpec, load_spec_file

DEFAULT_PREVIEW_SPEC = {
    "ops": [
        {"rotate": {"degrees": 20}},
        {"shift": {"x": 0.1, "y": 0.1}},
        {"flip": {"horizontal": 0.5}},
        {"random_resized_crop": {"size": 64, "scale": [0.5, 1.0]}},
        {"brightness": {"factor": 0.2}},
        {"contrast": {"factor": 0.2}},
        {"saturation": {"factor": 0.3}},
        {"hue": {"degrees": 10}},
    ]
}


def preview(args: argparse.Namespace) -> int:
    """Augment demo images in-process, report images/s and write a grid picture."""
    from PIL import Image

    spec = load_spec_file(args.spec) if args.spec else AugmentSpec.from_dict(DEFAULT_PREVIEW_SPEC)
    root = ensure_demo_dataset(DemoConfig())
    paths = sorted(root.glob("*/*.jpg"))[:: max(1, 1000 // args.images)][: args.images]
    sources = [SourceImage(i, 0, str(path), path.read_bytes()) for i, path in enumerate(paths)]
    backend = create_backend(args.backend, args.threads)
    try:
        augment_batch(backend, spec, args.seed, 0, sources)  # warm-up (DALI builds its pipeline)
        started = time.perf_counter()
        for epoch in range(args.epochs):
            batch = augment_batch(backend, spec, args.seed, epoch, sources)
        elapsed = time.perf_counter() - started
    finally:
        backend.close()
    rate = len(sources) * args.epochs / elapsed
    print(f"backend {backend.name}: {rate:.0f} images/s over {len(sources) * args.epochs} images (decode included)")
    columns = 8
    rows = int(np.ceil(len(batch.images) / columns))
    height, width = batch.images.shape[1:3]
    grid = np.zeros((rows * height, columns * width, 3), np.uint8)
    for index, image in enumerate(batch.images):
        row, column = divmod(index, columns)
        grid[row * height : (row + 1) * height, column * width : (column + 1) * width] = image
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(args.output)
    print(f"wrote {args.output} ({len(batch.images)} augmented images of {root})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="augserve", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    preview_parser = commands.add_parser("preview", help="augment demo images in-process and save a grid")
    preview_parser.add_argument("--spec", help="spec file (.yaml or .json); default: a typical training spec")
    preview_parser.add_argument("--backend", choices=BACKEND_CHOICES, default="auto")
    preview_parser.add_argument("--threads", type=int, default=None, help="worker threads (default: all cores)")
    preview_parser.add_argument("--images", type=int, default=64)
    preview_parser.add_argument("--epochs", type=int, default=3)
    preview_parser.add_argument("--seed", type=int, default=0)
    preview_parser.add_argument("--output", default="runs/preview.png")
    preview_parser.set_defaults(handler=preview)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except AugserveError as error:
        print(f"augserve: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
