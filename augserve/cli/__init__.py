"""The `augserve` command line."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from augserve.backends import BACKEND_CHOICES, create_backend
from augserve.backends.batch import SourceImage, augment_batch
from augserve.core.errors import AugserveError, SpecError
from augserve.core.images import inspect_image
from augserve.core.plan import MAX_SAMPLE_ID, explain_plan, make_plan
from augserve.core.spec import AugmentSpec, load_spec_file
from augserve.data.demo import DemoConfig, ensure_demo_dataset
from augserve.data.demo_scenes import ensure_demo_scenes

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
    """Augment demo images in-process, report images/s, write a grid picture and, beside it, what
    each op drew for every pictured sample (`<output>.draws.json`)."""
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
    # What each op drew for the pictured samples (the last epoch's), beside the picture.
    last_epoch = args.epochs - 1
    shown = {int(sample_id) for sample_id in batch.sample_ids}
    samples = []
    for source in sources:
        if source.sample_id in shown:
            header = inspect_image(source.data, source.source)
            size = (header.height, header.width)
            plan = make_plan(spec, args.seed, last_epoch, source.sample_id, size, header.orientation)
            samples.append(explain_plan(plan))
    draws_path = Path(args.output).with_suffix(".draws.json")
    draws_path.write_text(json.dumps(_draws_document(spec, args.seed, last_epoch, samples)) + "\n")
    if samples:
        print("\n".join(_explanation_lines(samples[0])))
    print(f"wrote {draws_path} (what each op drew, per pictured sample)")
    return 0


def _format_value(value: Any) -> str:
    """A record value for reading: floats to 6 significant digits, the rest as Python writes it."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_format_value(item) for item in value) + ")"
    return str(value)


def _explanation_lines(explanation: dict[str, Any]) -> list[str]:
    """One header line per sample (sizes as HxW), then one line per op: its name and record."""
    source_h, source_w = explanation["source_size"]
    out_h, out_w = explanation["output_size"]
    interpolation = explanation["interpolation"]
    lines = [f"sample {explanation['sample_id']}: {source_h}x{source_w} -> {out_h}x{out_w} ({interpolation})"]
    width = max((len(draw["op"]) for draw in explanation["draws"]), default=0)
    for draw in explanation["draws"]:
        fields = " ".join(f"{key}={_format_value(value)}" for key, value in draw["record"].items())
        lines.append(f"  {draw['op']:<{width}}  {fields}")
    return lines


def _draws_document(spec: AugmentSpec, seed: int, epoch: int, samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {"spec": spec.to_dict(), "seed": seed, "epoch": epoch, "samples": samples}


def explain_command(args: argparse.Namespace) -> int:
    """Print what each op of the spec draws for the given samples of one image size."""
    spec = load_spec_file(args.spec) if args.spec else AugmentSpec.from_dict(DEFAULT_PREVIEW_SPEC)
    sample_ids = [sample_id for group in args.samples for sample_id in group]
    samples = [
        explain_plan(make_plan(spec, args.seed, args.epoch, sample_id, args.size, args.orientation))
        for sample_id in sample_ids
    ]
    if args.json:
        document = _draws_document(spec, args.seed, args.epoch, samples)
        print(json.dumps({**document, "orientation": args.orientation}))
        return 0
    print(f"seed {args.seed}, epoch {args.epoch}, EXIF orientation {args.orientation}")
    for explanation in samples:
        print("\n".join(_explanation_lines(explanation)))
    return 0


def _image_size(text: str) -> tuple[int, int]:
    """HxW in pixels, e.g. 375x500."""
    height, separator, width = text.lower().partition("x")
    if not separator or not height.isdigit() or not width.isdigit() or int(height) < 1 or int(width) < 1:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH in pixels, e.g. 375x500, got {text!r}")
    return int(height), int(width)


def _sample_ids(text: str) -> list[int]:
    """A sample id N or an inclusive range N-M."""
    first, separator, last = text.partition("-")
    if not first.isdigit() or (separator and not last.isdigit()):
        raise argparse.ArgumentTypeError(f"expected a sample id N or a range N-M, got {text!r}")
    ids = list(range(int(first), int(last or first) + 1))
    if not ids or ids[-1] > MAX_SAMPLE_ID:
        raise argparse.ArgumentTypeError(f"{text!r} is empty or past the largest sample id {MAX_SAMPLE_ID}")
    return ids


def _dataset_entry(text: str) -> tuple[str, str]:
    name, separator, path = text.partition("=")
    if not separator or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


# Short flags beside the generated ones (`--limits.max-sessions`), kept from before those.
SERVE_ALIASES = {
    "--max-sessions": "limits.max_sessions",
    "--max-batch-size": "limits.max_batch_size",
    "--max-prefetch": "limits.max_prefetch",
    "--max-buffer-bytes": "limits.max_buffer_bytes",
    "--group-window": "limits.group_window",
    "--stall-seconds": "limits.stall_seconds",
    "--decoded-cache-bytes": "limits.decoded_cache_bytes",
}
SERVE_FIELD_CHANGES = {
    "port": {"default": 50051},  # the command's; ServerConfig's own 0 suits tests
    # Limits is a plain dataclass: what its flags' help says.
    "limits.stall_seconds": {"description": "a member that consumes nothing this long (not paused) leaves its group"},
    "limits.decoded_cache_bytes": {"description": "decoded images kept for later epochs and experiments (0: off)"},
}


@functools.cache
def serve_flags() -> Any:
    """The flags of every ServerConfig field (imported when needed: the server's modules)."""
    from augserve.core.config import ConfigFlags
    from augserve.rpc.server import ServerConfig

    return ConfigFlags(ServerConfig, SERVE_ALIASES, SERVE_FIELD_CHANGES)


def _server_config(args: argparse.Namespace) -> Any:
    """ServerConfig from an optional YAML file, then command-line flags, then --set, over it."""
    from augserve.core.config import read_config_file
    from augserve.rpc.server import ServerConfig

    flags = serve_flags()
    settings = {"port": flags.fields["port"].default, **read_config_file(args.config)}
    flags.apply(settings, args)
    datasets = settings.get("datasets") or {}
    if not isinstance(datasets, dict):
        raise SpecError("config.datasets", f"expected a mapping of names to datasets, got {datasets!r}")
    for name, path in args.dataset or []:
        datasets[name] = {"path": path, "validation_fraction": args.validation_fraction, "split_seed": args.split_seed}
    if args.demo:
        datasets.setdefault("demo", {"path": str(ensure_demo_dataset(DemoConfig())), "validation_fraction": args.validation_fraction or 0.2})
        datasets.setdefault("scenes", {"path": str(ensure_demo_scenes()), "validation_fraction": args.validation_fraction or 0.2})
    settings["datasets"] = datasets
    flags.apply_assignments(settings, args.set)
    return ServerConfig.from_dict(settings)


def serve_command(args: argparse.Namespace) -> int:
    from augserve.rpc.server import serve

    serve(_server_config(args), port_file=args.port_file)
    return 0


def index_command(args: argparse.Namespace) -> int:
    from augserve.data.datasets import load_manifest

    manifest = load_manifest(args.path, threads=args.threads or 8)
    size = manifest.uniform_size()
    print(
        f"{args.path}: {len(manifest)} images, {len(manifest.classes)} classes, "
        f"{'all ' + str(size[0]) + 'x' + str(size[1]) if size else 'sizes vary'}, "
        f"{int((manifest.heights == 0).sum())} unreadable headers"
    )
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

    explain_parser = commands.add_parser("explain", help="print what each op of a spec draws for given samples")
    explain_parser.add_argument("--spec", help="spec file (.yaml or .json); default: preview's spec")
    explain_parser.add_argument("--size", type=_image_size, required=True, metavar="HxW",
                                help="source image size in pixels as stored, e.g. 375x500")
    explain_parser.add_argument("--samples", type=_sample_ids, nargs="+", default=[[0]], metavar="ID",
                                help="sample ids and inclusive ranges, e.g. 0 5 10-12 (default 0)")
    explain_parser.add_argument("--seed", type=int, default=0)
    explain_parser.add_argument("--epoch", type=int, default=0)
    explain_parser.add_argument("--orientation", type=int, choices=range(1, 9), default=1, metavar="1..8",
                                help="EXIF orientation of the source (default 1: upright)")
    explain_parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    explain_parser.set_defaults(handler=explain_command)

    serve_parser = commands.add_parser("serve", help="run the augmentation server")
    serve_parser.add_argument("--config", help="YAML file: host, port, backend, threads, datasets, limits, ...")
    serve_parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                              help="override any field, e.g. limits.max_sessions=8 (YAML value)")
    serve_parser.add_argument("--port-file", help="write the bound port to this file once serving")
    serve_parser.add_argument("--dataset", action="append", type=_dataset_entry, metavar="NAME=PATH",
                              help="serve an ImageFolder tree or CSV list under NAME (repeatable)")
    serve_parser.add_argument("--demo", action="store_true", help="also serve the built-in demo datasets: 'demo' (classes) and 'scenes' (label maps, for segmentation)")
    serve_parser.add_argument("--validation-fraction", type=float, default=0.0,
                              help="fraction of each class of --dataset held out as the validation split (default 0)")
    serve_parser.add_argument("--split-seed", type=int, default=0)
    serve_flags().add_to(serve_parser)
    serve_parser.set_defaults(handler=serve_command)

    index_parser = commands.add_parser("index", help="build (and cache) a dataset's manifest ahead of serving")
    index_parser.add_argument("path", help="ImageFolder root or CSV file list")
    index_parser.add_argument("--threads", type=int)
    index_parser.set_defaults(handler=index_command)
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
