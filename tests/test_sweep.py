"""The sweep and the main job: runs planned from grids and random spaces, trained concurrently
against one shared server, ranked, tabulated and plotted."""

from __future__ import annotations

import csv
import math
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from servers import running_server

from augserve.core.errors import SpecError
from augserve.data.demo import DemoConfig, ensure_demo_dataset
from augserve.rpc.server import DatasetConfig
from trainer.sweep import plan_runs

ROOT = Path(__file__).resolve().parent.parent


def test_grid_random_and_explicit_runs_are_planned_and_validated():
    sweep = {
        "base": {"data": {"dataset": "demo"}, "optimizer": {"name": "sgd"}},
        "runs": [{"name": "baseline"}],
        "grid": {"optimizer.name": ["sgd", "adam"], "optimizer.learning_rate": [0.1, 0.01]},
        "random": {"samples": 3, "seed": 1, "space": {"optimizer.learning_rate": {"log_uniform": [1e-4, 1e-1]}, "loss.l2": [0.0, 1e-4]}},
    }
    plans = plan_runs(sweep, {"data.epochs": 2})
    assert len(plans) == 1 + 4 + 3
    assert plans[0].name == "baseline"
    assert {(p.config.optimizer.name, p.config.optimizer.learning_rate) for p in plans[1:5]} == {
        ("sgd", 0.1), ("sgd", 0.01), ("adam", 0.1), ("adam", 0.01)
    }
    drawn = [p.config.optimizer.learning_rate for p in plans[5:]]
    assert all(1e-4 <= rate <= 1e-1 for rate in drawn)
    assert len(set(drawn)) == 3  # three draws, not one value three times
    assert all(p.config.data.epochs == 2 for p in plans)
    assert plans[5:] == plan_runs(sweep, {"data.epochs": 2})[5:]  # the same seed draws the same
    reseeded = plan_runs({**sweep, "random": {**sweep["random"], "seed": 2}}, {"data.epochs": 2})
    assert [p.config.optimizer.learning_rate for p in reseeded[5:]] != drawn  # another seed, others
    assert len({p.name for p in plans}) == len(plans)


@pytest.mark.parametrize(
    "sweep,field",
    [
        ({"grids": {}}, "grids"),
        ({"runs": [{"optimizer.name": "lbfgs"}]}, "runs[0].optimizer.name"),
        ({"random": {"samples": 1, "space": {"loss.l2": "big"}}}, "random.space.loss.l2"),
    ],
)
def test_invalid_sweeps_name_the_field(sweep, field):
    with pytest.raises(SpecError) as caught:
        plan_runs(sweep, {})
    assert caught.value.field == field


def test_main_job_runs_end_to_end_and_lists_every_run(demo_root, tmp_path):
    """The README's main command, with one epoch instead of eight."""
    command = [
        sys.executable, "-m", "trainer.sweep", "--config", str(ROOT / "configs" / "demo_sweep.yaml"),
        "--serve-demo", "--backend", "opencv", "--output", str(tmp_path), "--set", "data.epochs=1",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    names = ["sgd-momentum+l2", "adam", "adamw+l1", "full-batch-gd"]
    board = result.stdout.split("rank", 1)[1]
    assert all(name in board for name in names)
    with open(tmp_path / "leaderboard.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["run"] for row in rows) == sorted(names)
    assert all(row["exit_code"] == "0" and row["epochs"] == "1" for row in rows)
    for plot in ("val_accuracy.png", "val_loss.png", "train_data_loss.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # One production fed all four trainers' training streams (validation streams are their own).
    produced, delivered = map(int, re.search(r"produced (\d+) batches and delivered (\d+)", result.stdout).groups())
    assert delivered >= 3 * produced - 30, (produced, delivered)
    # The terminal shows the runs, not the server's log: that goes to a file, whose path it names.
    assert "INFO" not in result.stdout + result.stderr
    log_path = tmp_path / "sweep.log"
    assert str(log_path) in result.stdout and "session s1 opened" in log_path.read_text()
    progress = result.stdout.split("rank", 1)[0]
    steps = {row["run"]: row["steps"] for row in rows}
    assert steps["full-batch-gd"] == "1" and steps["adam"] == str(math.ceil(1200 / 64)), steps
    for name in names:  # not a terminal: plain lines; with one epoch, one line that ends the run
        lines = [line for line in progress.splitlines() if line.startswith(name + " ")]
        assert len(lines) == 1 and lines[0].endswith("done"), (name, lines)
        assert "epoch 1/1" in lines[0] and f" step {steps[name]:>4} " in lines[0] and " loss " in lines[0], (name, lines)
    assert "\x1b" not in result.stdout


def run_on_a_terminal(command: list[str]) -> tuple[int, str]:
    """Run `command` with a pseudo-terminal as stdout and stderr; (exit code, what it printed)."""
    main, child = pty.openpty()
    with subprocess.Popen(command, stdout=child, stderr=child, stdin=subprocess.DEVNULL, cwd=ROOT) as process:
        os.close(child)
        output = b""
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the child side is closed, the process has ended
                break
            if not chunk:
                break
            output += chunk
        code = process.wait(120)
    os.close(main)
    return code, output.decode(errors="replace")


def train_log(run_folder: Path) -> str:
    """The end of a run's train.log, for a failure message."""
    log = run_folder / "train.log"
    return "\n--- " + str(log) + ":\n" + (log.read_text()[-3000:] if log.exists() else "(none)")


def test_on_a_terminal_lines_are_live_and_no_progress_makes_them_plain(tmp_path):
    root = ensure_demo_dataset(DemoConfig(images_per_class=6, image_size=32), root=tmp_path / "data")
    sweep = {
        "base": {"data": {"dataset": "tiny", "batch_size": 8, "epochs": 2}, "model": {"name": "linear"},
                 "optimizer": {"name": "sgd", "learning_rate": 0.01}, "run": {"threads": 1}},
        "runs": [{"name": "linear-sgd"}],
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    with running_server({"tiny": DatasetConfig(str(root), validation_fraction=0.2)}) as server:
        outputs = {}
        for mode, extra in (("live", []), ("quiet", ["--no-progress"])):
            code, outputs[mode] = run_on_a_terminal([
                sys.executable, "-m", "trainer.sweep", "--config", str(tmp_path / "sweep.yaml"),
                "--endpoint", server.address, "--output", str(tmp_path / mode), *extra,
            ])
            assert code == 0, outputs[mode][-3000:] + train_log(tmp_path / mode / "linear-sgd")
    assert "\x1b[2K" in outputs["live"]  # lines drawn and redrawn in place
    assert "\x1b" not in outputs["quiet"]
    quiet_lines = [line for line in outputs["quiet"].splitlines() if line.startswith("linear-sgd ")]
    epochs = [line.split("  ")[1] for line in quiet_lines]  # an epoch line, unless the next came within a second
    assert epochs[-1] == "epoch 2/2" and quiet_lines[-1].endswith("done") and len(set(epochs)) == len(epochs), quiet_lines
