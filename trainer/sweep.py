"""`augserve-sweep`: many trainer configs as concurrent processes against one augserve server.

    augserve-sweep --config configs/demo_sweep.yaml --serve-demo     # the main job
    augserve-sweep --config sweep.yaml --endpoint 10.0.0.5:50051 --concurrency 4

A sweep file holds `base` (a training config, as for augserve-train) and the runs: `runs` (a
list of explicit overrides), `grid` (every combination of the listed values) and/or `random`
(`samples` draws from `space`, seeded). Overrides are dotted fields, e.g.
`optimizer.learning_rate`. Each run writes its own folder; the sweep prints a leaderboard and
writes leaderboard.csv, summary.json and validation plots (PNG) into the sweep's output.

Runs with the same stream (dataset, spec, seed, batch size) share one production on the
server; runs on the same dataset order (dataset, seed, batch size) with different specs share
reading and decoding; runs that validate alike read one shared validation stream each epoch.
When every run starts at once the sweep tells the server how many to expect of each.
"""

from __future__ import annotations

import argparse
import copy
import csv
import itertools
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from augserve.core.config import set_dotted
from augserve.core.errors import AugserveError, SpecError
from augserve.core.yamlio import load_yaml
from trainer.cli import FLAGS
from trainer.progress import ProgressBoard, RunLine
from trainer.run_config import TrainConfig

log = logging.getLogger("sweep")
SWEEP_KEYS = ("base", "runs", "grid", "random", "optuna", "concurrency", "output")


@dataclass(frozen=True)
class RunPlan:
    name: str
    config: TrainConfig


@dataclass
class RunResult:
    name: str
    folder: Path
    returncode: int
    seconds: float
    epochs: list[dict[str, str]]

    @property
    def final(self) -> dict[str, str]:
        return self.epochs[-1] if self.epochs else {}

    def number(self, key: str) -> float:
        try:
            return float(self.final.get(key, "nan"))
        except ValueError:
            return math.nan


def _override_name(overrides: dict[str, Any]) -> str:
    parts = [f"{key.split('.')[-1]}={value}" for key, value in overrides.items() if key != "name"]
    return overrides.get("name") or ",".join(parts) or "base"


def _draw(space: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """One random point: a list is a choice; {uniform: [a, b]} or {log_uniform: [a, b]} a range."""
    point = {}
    for key, choice in space.items():
        if isinstance(choice, list):
            point[key] = choice[int(rng.integers(len(choice)))]
        elif isinstance(choice, dict) and len(choice) == 1 and next(iter(choice)) in ("uniform", "log_uniform"):
            kind, (low, high) = next(iter(choice.items()))
            if kind == "uniform":
                point[key] = float(rng.uniform(low, high))
            else:
                point[key] = float(math.exp(rng.uniform(math.log(low), math.log(high))))
        else:
            raise SpecError(f"random.space.{key}", "expected a list of choices or {uniform|log_uniform: [low, high]}")
    return point


def plan_runs(sweep: dict[str, Any], overrides: dict[str, Any]) -> list[RunPlan]:
    """Every run of a sweep file, validated; `overrides` (from the command line) apply to all."""
    for key in sweep:
        if key not in SWEEP_KEYS:
            raise SpecError(str(key), f"unknown sweep key; known: {list(SWEEP_KEYS)}")
    points: list[dict[str, Any]] = [dict(entry) for entry in sweep.get("runs") or []]
    grid = sweep.get("grid") or {}
    if grid:
        keys = list(grid)
        points += [dict(zip(keys, values)) for values in itertools.product(*(grid[key] for key in keys))]
    if sweep.get("random"):
        random = sweep["random"]
        rng = np.random.default_rng(random.get("seed", 0))
        points += [_draw(random.get("space") or {}, rng) for _ in range(int(random.get("samples", 1)))]
    if not points:
        points = [{}]
    plans = []
    names = Counter()
    for index, point in enumerate(points):
        data = copy.deepcopy(sweep.get("base") or {})
        for dotted, value in {**point, **overrides}.items():
            if dotted != "name":
                set_dotted(data, dotted, value)
        name = _override_name(point)
        names[name] += 1
        if names[name] > 1:
            name = f"{name}-{names[name]}"
        try:
            plans.append(RunPlan(name, TrainConfig.from_dict(data)))
        except SpecError as error:
            raise SpecError(f"runs[{index}].{error.field}", error.message) from None
    return plans


def _stream_key(config: TrainConfig) -> tuple:
    data = config.data
    return (data.dataset, json.dumps(data.spec, sort_keys=True), data.spec_file, data.image_size, data.seed, data.batch_size)


def _order_key(config: TrainConfig) -> tuple:
    """Runs whose training streams hold the same images in the same order, whatever the spec."""
    data = config.data
    return (data.dataset, data.seed, data.batch_size)


def _validation_key(config: TrainConfig) -> tuple | None:
    """Runs whose validation streams are the same (None: the run does not validate)."""
    data = config.data
    if not data.validate:
        return None
    return (data.dataset, data.augment_spec().fixed_output_size, data.image_size, data.eval_batch_size)


def _folder_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=," else "_" for c in name)[:100]


def run_sweep(
    plans: list[RunPlan],
    output: Path,
    concurrency: int,
    endpoints: list[str] | None = None,
    on_finish: Callable[[str, int], None] | None = None,
) -> list[RunResult]:
    """Train every plan as its own process, `concurrency` at a time; `on_finish(name, exit
    code)` is told as each ends."""
    output.mkdir(parents=True, exist_ok=True)
    starts_together = concurrency >= len(plans)
    same_stream = Counter(_stream_key(plan.config) for plan in plans)
    same_order = Counter(_order_key(plan.config) for plan in plans)
    validating_alike: dict[tuple, list[int]] = {}
    for plan in plans:
        key = _validation_key(plan.config)
        if key is not None:
            validating_alike.setdefault(key, []).append(plan.config.data.epochs)

    def run_one(plan: RunPlan) -> RunResult:
        folder = output / _folder_name(plan.name)
        folder.mkdir(parents=True, exist_ok=True)
        config = plan.config.replace("run", output=str(folder), name=plan.name, progress=False)
        if endpoints:
            config = config.replace("data", endpoints=tuple(endpoints))
        if starts_together:
            validation_key = _validation_key(plan.config)
            config = config.replace(
                "data",
                group_size=same_stream[_stream_key(plan.config)],
                decode_group_size=same_order[_order_key(plan.config)],
                eval_group_epochs=tuple(validating_alike.get(validation_key, ())) if validation_key else (),
            )
        (folder / "config-in.yaml").write_text(config.to_yaml())
        started = time.monotonic()
        with open(folder / "train.log", "wb") as log_file:
            code = subprocess.call(
                [sys.executable, "-m", "trainer", "--config", str(folder / "config-in.yaml")],
                stdout=log_file, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        epochs = []
        if (folder / "epochs.csv").exists():
            with open(folder / "epochs.csv", newline="") as handle:
                epochs = list(csv.DictReader(handle))
        result = RunResult(plan.name, folder, code, time.monotonic() - started, epochs)
        log.info("run %s finished (exit %d) in %.0f s", plan.name, code, result.seconds)
        if on_finish is not None:
            on_finish(plan.name, code)
        return result

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(run_one, plans))


def ranking_metric(results: list[RunResult]) -> str:
    """What ranks the runs: validation mIoU where runs segment, else validation accuracy."""
    return "val_miou" if any(not math.isnan(result.number("val_miou")) for result in results) else "val_accuracy"


def leaderboard(results: list[RunResult]) -> str:
    """Runs by final validation accuracy, or mIoU for segmentation (then training accuracy),
    as a text table."""
    metric = ranking_metric(results)

    def order(result: RunResult) -> tuple:
        value = result.number(metric)
        fallback = result.number("train_accuracy")
        return (result.returncode != 0, -(value if not math.isnan(value) else -1), -(fallback if not math.isnan(fallback) else -1))

    miou = metric == "val_miou"
    header = (
        f"{'rank':>4}  {'run':<34} {'val mIoU ' if miou else ''}{'val acc':>7} {'val loss':>8} {'train acc':>9} {'train loss':>10} {'epochs':>6} "
        f"{'steps':>6} {'img/s':>7} {'time':>6}"
    )
    lines = [header, "-" * len(header)]
    for rank, result in enumerate(sorted(results, key=order), start=1):
        if result.returncode != 0:
            lines.append(f"{rank:>4}  {result.name:<34} failed (exit {result.returncode}); see {result.folder / 'train.log'}")
            continue
        lines.append(
            f"{rank:>4}  {result.name:<34} {f'{result.number(metric):>8.3f} ' if miou else ''}"
            f"{result.number('val_accuracy'):>7.3f} {result.number('val_loss'):>8.4f} "
            f"{result.number('train_accuracy'):>9.3f} {result.number('train_data_loss'):>10.4f} {len(result.epochs):>6} "
            f"{result.number('step'):>6.0f} {result.number('images_per_second'):>7.0f} {result.seconds:>5.0f}s"
        )
    return "\n".join(lines)


def write_outputs(results: list[RunResult], output: Path) -> list[Path]:
    """leaderboard.csv, summary.json and the PNG plots; returns the plot paths."""
    columns = ["run", "exit_code", "val_accuracy", "val_loss", "val_miou", "train_accuracy", "train_data_loss", "epochs", "steps", "seconds", "folder"]
    with open(output / "leaderboard.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for result in results:
            writer.writerow([
                result.name, result.returncode, result.number("val_accuracy"), result.number("val_loss"),
                result.number("val_miou"), result.number("train_accuracy"), result.number("train_data_loss"), len(result.epochs),
                "" if math.isnan(result.number("step")) else int(result.number("step")),
                round(result.seconds, 1), str(result.folder),
            ])
    (output / "summary.json").write_text(json.dumps(
        [{"run": r.name, "exit_code": r.returncode, "seconds": r.seconds, "epochs": r.epochs} for r in results], indent=1
    ))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []
    curves = [("val_accuracy", "validation accuracy"), ("val_loss", "validation loss"), ("train_data_loss", "training loss")]
    if ranking_metric(results) == "val_miou":
        curves.insert(0, ("val_miou", "validation mIoU"))
    for key, label in curves:
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for result in results:
            values = [float(row[key]) for row in result.epochs if row.get(key) not in (None, "", "nan")]
            if values:
                axes.plot(range(1, len(values) + 1), values, marker="o", label=result.name)
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.set_title(f"{label} per epoch")
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend(fontsize=8)
        path = output / f"{key}.png"
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
        plots.append(path)
    return plots


def _log_to_file(output: Path, level: str) -> Path:
    """Send every log record (the in-process server's included) to output/sweep.log; only
    warnings and errors also reach the terminal."""
    output.mkdir(parents=True, exist_ok=True)
    path = output / "sweep.log"
    file_handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setLevel(logging.WARNING)
    terminal.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[file_handler, terminal], force=True)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="augserve-sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="sweep YAML: base, runs / grid / random, concurrency, output")
    parser.add_argument("--endpoint", action="append", help="server host:port for every run (repeatable)")
    parser.add_argument("--serve-demo", action="store_true", help="start a server on the built-in demo datasets (demo: classes, scenes: label maps) for the sweep")
    parser.add_argument("--backend", default="auto", help="backend of the --serve-demo server")
    parser.add_argument("--concurrency", type=int, help="runs at once (default: the file's, else 4)")
    parser.add_argument("--output", help="sweep folder (default: the file's, else runs/sweep)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override for every run")
    parser.add_argument("--log-level", default="INFO", help="level of the log file (the server's and the sweep's log)")
    parser.add_argument("--no-progress", action="store_true", help="plain lines per epoch instead of live lines")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with open(args.config, encoding="utf-8") as handle:
            sweep = load_yaml(handle) or {}
        overrides = dict(FLAGS.assignment(assignment) for assignment in args.set)  # as augserve-train reads --set
        plans = plan_runs(sweep, overrides)
    except (OSError, yaml.YAMLError, AugserveError) as error:
        print(f"augserve-sweep: {error}", file=sys.stderr)
        return 2
    output = Path(args.output or sweep.get("output") or "runs/sweep")
    concurrency = args.concurrency or int(sweep.get("concurrency", 4))
    log_path = _log_to_file(output, args.log_level)
    if not sweep.get("optuna"):  # an Optuna study says how many trials it runs itself
        print(f"{len(plans)} runs, {concurrency} at a time, into {output}; server and sweep log: {log_path}")
    server = None
    endpoints = args.endpoint
    if args.serve_demo:
        from augserve.data.demo import ensure_demo_dataset
        from augserve.rpc.server import DatasetConfig, ServerConfig, create_server

        from augserve.data.demo_scenes import ensure_demo_scenes

        datasets = {"demo": DatasetConfig(str(ensure_demo_dataset()), 0.2), "scenes": DatasetConfig(str(ensure_demo_scenes()), 0.2)}
        server = create_server(ServerConfig(port=0, backend=args.backend, datasets=datasets))
        endpoints = [server.address]
    try:
        if sweep.get("optuna"):  # the Optuna strategy: trials from TPE, pruned on validation (trainer/search.py)
            from trainer.search import run_study

            try:
                return run_study(sweep["optuna"], sweep.get("base") or {}, overrides, output, concurrency, endpoints)
            except AugserveError as error:  # a bad optuna section: the field, not a traceback
                print(f"augserve-sweep: {error}", file=sys.stderr)
                return 2
        log.info("sweep of %d runs, %d at a time, into %s", len(plans), concurrency, output)
        started = time.monotonic()
        board = ProgressBoard(
            [RunLine(plan.name, output / _folder_name(plan.name), plan.config.data.epochs) for plan in plans],
            sys.stdout,
            live=sys.stdout.isatty() and not args.no_progress,
        ).start()
        try:
            results = run_sweep(plans, output, concurrency, endpoints, on_finish=board.finish)
        finally:
            board.close()
        if server is not None:
            info = server.manager.counters.snapshot()
            print(f"The server produced {info.batches_produced} batches and delivered {info.batches_delivered} "
                  f"({info.batches_delivered / max(info.batches_produced, 1):.1f}x sharing).")
    finally:
        if server is not None:
            server.stop(grace=2.0)
    plots = write_outputs(results, output)
    print()
    print(leaderboard(results))
    print()
    print(f"{len(results)} runs in {time.monotonic() - started:.0f} s. Leaderboard: {output / 'leaderboard.csv'}")
    print("Plots: " + ", ".join(str(path) for path in plots))
    return 0 if all(result.returncode == 0 for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
