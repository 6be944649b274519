"""augserve-sweep's Optuna strategy: 6 TPE trials through one server, the sweep killed in the
middle of a trial and run again, the study (SQLite) resumed, pruning visible in it."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna")

from augserve.core.errors import SpecError  # noqa: E402
from augserve.data.demo import DemoConfig, ensure_demo_dataset  # noqa: E402
from augserve.rpc.server import DatasetConfig  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from servers import running_server, wait_until  # noqa: E402
from trainer.search import run_study, suggest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """The demo dataset at tiny settings: 60 images of 32x32, 50 to train, 10 to validate."""
    root = ensure_demo_dataset(DemoConfig(images_per_class=12, image_size=32), root=tmp_path_factory.mktemp("demo"))
    with running_server({"demo": DatasetConfig(str(root), validation_fraction=0.2)}) as server:
        yield server


SWEEP = {
    "output": "unused",
    "base": {
        "data": {"dataset": "demo", "batch_size": 25, "epochs": 2, "transport": "inband"},
        "model": {"name": "linear"},
        "schedule": {"name": "constant"},
        "run": {"threads": 1, "log_every": 100},
    },
    "optuna": {
        "trials": 6,
        "seed": 0,
        "pruner": {"name": "median", "startup_trials": 2},
        # From hopeless (1e-7: chance after epoch 0, so pruned) to useful rates.
        "space": {"optimizer.learning_rate": {"log_uniform": [1.0e-7, 3.0e-2]}, "optimizer.name": ["sgd", "adam"]},
    },
}


def trials_of(output: Path) -> list:
    database = output / "study.db"
    if not database.exists():
        return []
    try:
        return optuna.load_study(study_name=output.name, storage=f"sqlite:///{database}").trials
    except Exception:  # created but not yet written by the sweep
        return []


def test_an_interrupted_study_resumes_to_six_trials_with_pruning(demo_server, tmp_path):
    output = tmp_path / "study"
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(SWEEP))
    command = [sys.executable, "-m", "trainer.sweep", "--config", str(config), "--endpoint", demo_server.address,
               "--output", str(output), "--concurrency", "1"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}

    # Killed (with the trial it trains) while its third trial runs.
    first = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert wait_until(lambda: len(trials_of(output)) >= 3 and trials_of(output)[2].state == TrialState.RUNNING, timeout=180)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    assert [trial.state for trial in trials_of(output)[:2]].count(TrialState.RUNNING) == 0

    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "2 of 6 trials finished, 1 interrupted ones retried; running 4" in result.stdout
    trials = trials_of(output)
    states = [trial.state for trial in trials]
    assert states.count(TrialState.FAIL) == 1  # the interrupted one, retried with its parameters
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 6
    assert states.count(TrialState.PRUNED) >= 1, [(t.params, t.intermediate_values) for t in trials]
    interrupted = next(trial for trial in trials if trial.state == TrialState.FAIL)
    retried = next(trial for trial in trials if trial.user_attrs.get("retry_of") == interrupted.number)
    assert retried.params == interrupted.params and retried.state != TrialState.FAIL
    for trial in trials:
        if trial.state == TrialState.PRUNED:  # stopped at the first epoch the median pruner judged
            steps = trial.intermediate_values
            assert 1 <= len(steps) <= 2 and trial.value == steps[max(steps)]
        elif trial.state == TrialState.COMPLETE:
            assert sorted(trial.intermediate_values) == [0, 1] and trial.value == trial.intermediate_values[1]
    with open(output / "leaderboard.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 7 and rows[0]["state"] == "complete"
    best = max(t.value for t in trials if t.state == TrialState.COMPLETE)
    assert float(rows[0]["val_accuracy"]) == best
    assert "rank" in result.stdout and "pruned" in result.stdout

    again = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120)  # nothing left to run
    assert again.returncode == 0 and "6 of 6 trials finished; running 0" in again.stdout
    assert len(trials_of(output)) == 7


def test_a_bad_space_names_the_field(tmp_path):
    study = optuna.create_study()
    with pytest.raises(SpecError) as caught:
        suggest(study.ask(), {"loss.l2": "big"})
    assert caught.value.field == "optuna.space.loss.l2"
    with pytest.raises(SpecError) as caught:
        run_study({"space": {"loss.l2": [0.0]}, "trails": 3}, {}, {}, tmp_path, 1, None)
    assert caught.value.field == "optuna.trails"
