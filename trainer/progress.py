"""The sweep's terminal: one live line per run, read from each run's steps.csv and epochs.csv.

On a terminal the lines are redrawn in place about once a second; elsewhere (a pipe, a log
file, `--no-progress`) a plain line is printed whenever a run finishes an epoch or ends.
"""

from __future__ import annotations

import csv
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

REDRAW_SECONDS = 1.0


def _last_row(path: Path) -> dict[str, str]:
    """The last complete row of a CSV that another process is appending to ({} if none)."""
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError:
        return {}
    return next((row for row in reversed(rows) if None not in row.values()), {})


def _count_rows(path: Path) -> int:
    try:
        with open(path, newline="") as handle:
            return max(0, sum(1 for _ in handle) - 1)
    except OSError:
        return 0


def _number(row: dict[str, str], key: str) -> float | None:
    try:
        return float(row[key])
    except (KeyError, ValueError):
        return None


def _epoch_of(row: dict[str, str]) -> float:
    value = _number(row, "epoch")
    return -1.0 if value is None else value


@dataclass
class RunLine:
    """What one run's line shows."""

    name: str
    folder: Path
    epochs: int
    finished: str = ""  # "", or "done" / "failed (exit N)"

    def render(self, width: int) -> str:
        step = _last_row(self.folder / "steps.csv")
        epoch_row = _last_row(self.folder / "epochs.csv")
        epochs_done = _count_rows(self.folder / "epochs.csv")
        parts = [f"{self.name:<{width}}", f"epoch {epochs_done}/{self.epochs}"]
        # The newer of the latest step and epoch records: a step record written in an epoch
        # that has since ended (steps are logged every `log_every` batches) is older news.
        step_is_newer = bool(step) and _epoch_of(step) > _epoch_of(epoch_row)
        latest = step if step_is_newer else {
            "step": epoch_row.get("step", ""), "batch_loss": epoch_row.get("train_data_loss", ""),
            "accuracy": epoch_row.get("train_accuracy", ""), "images_per_second": epoch_row.get("images_per_second", ""),
            "data_wait_fraction": epoch_row.get("data_wait_fraction", ""),
        }
        if latest.get("step"):
            parts.append(f"step {latest['step']:>4}")
        for label, key, form in (
            ("loss", "batch_loss", "{:.4f}"), ("acc", "accuracy", "{:.3f}"),
            ("img/s", "images_per_second", "{:.0f}"), ("wait", "data_wait_fraction", "{:.0%}"),
        ):
            value = _number(latest, key)
            if value is not None:
                parts.append(f"{label} {form.format(value)}")
        validation = _number(epoch_row, "val_accuracy")
        if validation is not None:
            parts.append(f"val acc {validation:.3f}")
        if self.finished:
            parts.append(self.finished)
        elif not latest.get("step"):
            parts.append("starting")
        return "  ".join(parts)


class ProgressBoard:
    """Shows every run's line on `stream` until `close()`."""

    def __init__(self, lines: list[RunLine], stream: TextIO, live: bool) -> None:
        self.lines = lines
        self.stream = stream
        self.live = live
        self._width = max((len(line.name) for line in lines), default=4)
        self._printed_epochs = {line.name: 0 for line in lines}
        self._ended: set[str] = set()
        self._drawn = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="sweep-progress", daemon=True)

    def start(self) -> ProgressBoard:
        self._thread.start()
        return self

    def finish(self, name: str, returncode: int) -> None:
        for line in self.lines:
            if line.name == name:
                line.finished = "done" if returncode == 0 else f"failed (exit {returncode}); see {line.folder / 'train.log'}"
        self.refresh()

    def refresh(self) -> None:
        with self._lock:
            if self.live:
                self._redraw()
            else:
                self._print_news()

    def _redraw(self) -> None:
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F")  # back to the first line drawn
        for line in self.lines:
            self.stream.write("\x1b[2K" + line.render(self._width) + "\n")
        self._drawn = len(self.lines)
        self.stream.flush()

    def _print_news(self) -> None:
        """A line for each run that finished an epoch since the last look, and one when it ends;
        the last epoch's line waits for the run's end, so that it is printed once, with "done"."""
        for line in self.lines:
            if line.name in self._ended:
                continue
            epochs = _count_rows(line.folder / "epochs.csv")
            last_epoch_waits = epochs >= line.epochs and not line.finished
            if line.finished or (epochs > self._printed_epochs[line.name] and not last_epoch_waits):
                self.stream.write(line.render(self._width) + "\n")
                self._printed_epochs[line.name] = epochs
                if line.finished:
                    self._ended.add(line.name)
        self.stream.flush()

    def _loop(self) -> None:
        while not self._stop.wait(REDRAW_SECONDS):
            self.refresh()

    def close(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join(5)
        self.refresh()
