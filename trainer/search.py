"""Optuna as a search strategy of `augserve-sweep`: TPE, pruning on validation metrics, a
resumable study in SQLite (or any SQLAlchemy URL), the leaderboard read from the study.

A sweep file with an `optuna` section (beside `base`):

    optuna:
      trials: 20                       # finished trials the study should hold in the end
      metric: val_accuracy             # a column of the trainer's epochs.csv
      direction: maximize              # or minimize
      seed: 0                          # TPE's seed
      storage: sqlite:///runs/s/study.db   # default: study.db in the sweep's output
      study_name: sweep                # default: the output folder's name
      pruner: {name: median, startup_trials: 2, warmup_epochs: 0}   # or {name: none}
      space:
        optimizer.learning_rate: {log_uniform: [1.0e-4, 1.0e-1]}
        optimizer.name: [adam, adamw]  # a list: a categorical choice
        loss.l2: {uniform: [0.0, 1.0e-3]}
        data.batch_size: {int: [16, 64]}

Each trial trains as its own process (exactly like a grid run) in `trial-NNNN/`; the sweep
reads its epochs.csv as it grows, reports each epoch's metric to Optuna and stops the process
when the pruner says so (the trial is then PRUNED, its last epoch its value). Running the same
command again resumes the study: trials an interrupted sweep left RUNNING are marked FAIL and
their parameters tried again first, and only the trials still missing are run.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from augserve.core.config import set_dotted
from augserve.core.errors import SpecError
from trainer.run_config import TrainConfig

log = logging.getLogger("sweep.optuna")

OPTUNA_KEYS = ("trials", "metric", "direction", "seed", "storage", "study_name", "pruner", "space")
PRUNERS = ("median", "none")
POLL_SECONDS = 0.2


def _check(section: dict[str, Any]) -> None:
    if not isinstance(section, dict):
        raise SpecError("optuna", "expected a mapping")
    for key in section:
        if key not in OPTUNA_KEYS:
            raise SpecError(f"optuna.{key}", f"unknown key; known: {list(OPTUNA_KEYS)}")
    if not section.get("space"):
        raise SpecError("optuna.space", "required: the dotted fields to search and their ranges")
    if section.get("direction", "maximize") not in ("maximize", "minimize"):
        raise SpecError("optuna.direction", "expected maximize or minimize")
    pruner = section.get("pruner") or {}
    if pruner.get("name", "median") not in PRUNERS:
        raise SpecError("optuna.pruner.name", f"expected one of {list(PRUNERS)}")


def suggest(trial: Any, space: dict[str, Any]) -> dict[str, Any]:
    """One point of `space` from the trial: a list is categorical; {uniform|log_uniform: [a, b]}
    a float range, {int: [a, b]} an integer range (both ends included)."""
    point = {}
    for key, choice in space.items():
        if isinstance(choice, list) and choice:
            point[key] = trial.suggest_categorical(key, choice)
        elif isinstance(choice, dict) and len(choice) == 1 and next(iter(choice)) in ("uniform", "log_uniform", "int"):
            kind, bounds = next(iter(choice.items()))
            if not isinstance(bounds, list) or len(bounds) != 2:
                raise SpecError(f"optuna.space.{key}.{kind}", "expected [low, high]")
            low, high = bounds
            if kind == "int":
                point[key] = trial.suggest_int(key, int(low), int(high))
            else:
                point[key] = trial.suggest_float(key, float(low), float(high), log=kind == "log_uniform")
        else:
            raise SpecError(f"optuna.space.{key}", "expected a list of choices or {uniform|log_uniform|int: [low, high]}")
    return point


def _epochs(folder: Path) -> list[dict[str, str]]:
    path = folder / "epochs.csv"
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [row for row in rows if row.get("seconds")]  # a row still being written has no last column


def _number(row: dict[str, str], metric: str) -> float:
    try:
        return float(row.get(metric, "nan"))
    except ValueError:
        return math.nan


class Objective:
    """Train one trial as a process; report each epoch's metric; prune by stopping it."""

    def __init__(self, section: dict[str, Any], base: dict[str, Any], overrides: dict[str, Any], output: Path,
                 endpoints: list[str] | None) -> None:
        self.space = section["space"]
        self.metric = section.get("metric", "val_accuracy")
        self.base, self.overrides, self.output, self.endpoints = base, overrides, output, endpoints

    def config_for(self, point: dict[str, Any], folder: Path) -> TrainConfig:
        data = copy.deepcopy(self.base)
        for dotted, value in {**point, **self.overrides}.items():
            set_dotted(data, dotted, value)
        try:
            config = TrainConfig.from_dict(data)
        except SpecError as error:
            raise SpecError(f"optuna.space.{error.field}", error.message) from None
        config = config.replace("run", output=str(folder), name=folder.name, progress=False)
        if self.endpoints:
            config = config.replace("data", endpoints=tuple(self.endpoints))
        return config

    def __call__(self, trial: Any) -> float:
        import optuna

        folder = self.output / f"trial-{trial.number:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for stale in ("epochs.csv", "steps.csv", "metrics.jsonl", "checkpoint.pt"):
            (folder / stale).unlink(missing_ok=True)  # a retried number starts clean
        config = self.config_for(suggest(trial, self.space), folder)
        trial.set_user_attr("folder", str(folder))
        (folder / "config-in.yaml").write_text(config.to_yaml())
        reported = 0
        with open(folder / "train.log", "wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "trainer", "--config", str(folder / "config-in.yaml")],
                stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            try:
                while True:
                    finished = process.poll() is not None
                    rows = _epochs(folder)
                    for epoch in range(reported, len(rows)):
                        value = _number(rows[epoch], self.metric)
                        if not math.isnan(value):
                            trial.report(value, epoch)
                        reported = epoch + 1
                        if trial.should_prune():
                            trial.set_user_attr("epochs", reported)
                            raise optuna.TrialPruned(f"{self.metric} {value:.4f} after epoch {epoch}")
                    if finished:
                        break
                    time.sleep(POLL_SECONDS)
            finally:
                if process.poll() is None:
                    process.terminate()
                    try:
                        process.wait(15)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait()
        trial.set_user_attr("epochs", reported)
        if process.returncode != 0:
            raise RuntimeError(f"trial {trial.number} exited with {process.returncode}; see {folder / 'train.log'}")
        rows = _epochs(folder)
        value = _number(rows[-1], self.metric) if rows else math.nan
        if math.isnan(value):
            raise RuntimeError(f"trial {trial.number}: no {self.metric} in {folder / 'epochs.csv'}")
        return value


def _pruner(section: dict[str, Any]) -> Any:
    import optuna

    config = section.get("pruner") or {}
    if config.get("name", "median") == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=int(config.get("startup_trials", 2)), n_warmup_steps=int(config.get("warmup_epochs", 0))
    )


def open_study(section: dict[str, Any], output: Path) -> Any:
    """The study (created, or loaded when it exists): TPE seeded by `seed`, the pruner named."""
    import optuna

    storage = section.get("storage") or f"sqlite:///{(output / 'study.db').resolve()}"
    return optuna.create_study(
        storage=storage,
        study_name=section.get("study_name") or output.resolve().name,
        direction=section.get("direction", "maximize"),
        sampler=optuna.samplers.TPESampler(seed=int(section.get("seed", 0))),
        pruner=_pruner(section),
        load_if_exists=True,
    )


def _recover_interrupted(study: Any) -> int:
    """Trials an interrupted sweep left RUNNING: FAIL them and queue their parameters again."""
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    return len(stale)


def study_leaderboard(study: Any, metric: str) -> tuple[str, list[list[Any]]]:
    """The study's trials best first (complete, then pruned, then failed) as text and rows."""
    from optuna.trial import TrialState

    sign = -1 if study.direction.name == "MAXIMIZE" else 1
    order = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1}

    def value_of(trial: Any) -> float:
        if trial.value is not None:
            return trial.value
        steps = trial.intermediate_values
        return steps[max(steps)] if steps else math.nan

    def key(trial: Any) -> tuple:
        value = value_of(trial)
        return (order.get(trial.state, 2), math.inf if math.isnan(value) else sign * value)

    rows = []
    for rank, trial in enumerate(sorted(study.trials, key=key), start=1):
        rows.append([rank, trial.number, trial.state.name.lower(), value_of(trial), len(trial.intermediate_values),
                     " ".join(f"{name.split('.')[-1]}={value:.4g}" if isinstance(value, float) else f"{name.split('.')[-1]}={value}"
                              for name, value in trial.params.items()),
                     trial.user_attrs.get("folder", "")])
    header = f"{'rank':>4}  {'trial':>5} {'state':<8} {metric:>12} {'epochs':>6}  params"
    lines = [header, "-" * len(header)]
    for rank, number, state, value, epochs, params, _ in rows:
        lines.append(f"{rank:>4}  {number:>5} {state:<8} {value:>12.4f} {epochs:>6}  {params}")
    return "\n".join(lines), rows


def run_study(section: dict[str, Any], base: dict[str, Any], overrides: dict[str, Any], output: Path,
              concurrency: int, endpoints: list[str] | None) -> int:
    """Run the `optuna` section until the study holds `trials` finished trials; print and
    write the leaderboard. The exit code: 0 when no trial failed in this invocation."""
    import optuna
    from optuna.trial import TrialState

    _check(section)
    output.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(section, output)
    recovered = _recover_interrupted(study)
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    wanted = int(section.get("trials", 10))
    missing = max(wanted - done, 0)
    metric = section.get("metric", "val_accuracy")
    print(f"optuna study {study.study_name!r}: {done} of {wanted} trials finished"
          f"{f', {recovered} interrupted ones retried' if recovered else ''}; running {missing}, {concurrency} at a time",
          flush=True)
    objective = Objective(section, base, overrides, output, endpoints)
    failed_before = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
    if missing:
        study.optimize(objective, n_trials=missing, n_jobs=concurrency, catch=(RuntimeError,))
    text, rows = study_leaderboard(study, metric)
    with open(output / "leaderboard.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["rank", "trial", "state", metric, "epochs", "params", "folder"])
        writer.writerows(rows)
    print()
    print(text)
    print(f"\nstudy: {study.study_name} in {section.get('storage') or output / 'study.db'}; leaderboard: {output / 'leaderboard.csv'}")
    failed_now = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))) - failed_before
    return 0 if failed_now == 0 else 1
