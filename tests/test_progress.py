"""The sweep's terminal lines (trainer/progress.py), from hand-written steps.csv and epochs.csv:
plain lines off a terminal, live lines on one, and always the newest numbers."""

from __future__ import annotations

import io
from pathlib import Path

from trainer.metrics import EPOCH_COLUMNS, STEP_COLUMNS, MetricsLog
from trainer.progress import ProgressBoard, RunLine


def step_record(epoch: int, step: int, loss: float) -> dict:
    return dict(zip(STEP_COLUMNS, (epoch, step, loss, loss, 0.0, 0.5, 0.01, 100.0, 0.02)))


def epoch_record(epoch: int, step: int, loss: float, val_accuracy: float) -> dict:
    return dict(zip(EPOCH_COLUMNS, (epoch, step, loss, 0.0, 0.6, loss, val_accuracy, 1200, 150.0, 0.01, 8.0)))


def test_off_a_terminal_one_plain_line_per_epoch_and_the_last_once_with_done(tmp_path: Path):
    log = MetricsLog(tmp_path / "run")
    stream = io.StringIO()
    board = ProgressBoard([RunLine("adam", tmp_path / "run", epochs=2)], stream, live=False)
    board.refresh()
    assert stream.getvalue() == ""  # nothing to say before the first epoch ends
    log.write("epoch", epoch_record(0, 19, 1.2, 0.40))
    board.refresh()
    board.refresh()  # nothing new: nothing printed
    log.write("epoch", epoch_record(1, 38, 0.9, 0.55))
    board.refresh()  # the last epoch: its line waits for the run's end
    board.finish("adam", 0)
    board.close()
    lines = stream.getvalue().splitlines()
    assert lines == [
        "adam  epoch 1/2  step   19  loss 1.2000  acc 0.600  img/s 150  wait 1%  val acc 0.400",
        "adam  epoch 2/2  step   38  loss 0.9000  acc 0.600  img/s 150  wait 1%  val acc 0.550  done",
    ]
    assert "\x1b" not in stream.getvalue()


def test_a_failed_run_says_so_and_where_its_log_is(tmp_path: Path):
    stream = io.StringIO()
    board = ProgressBoard([RunLine("gd", tmp_path / "gd", epochs=3)], stream, live=False)
    board.finish("gd", 2)
    board.close()
    assert stream.getvalue() == f"gd  epoch 0/3  failed (exit 2); see {tmp_path / 'gd' / 'train.log'}\n"


def test_on_a_terminal_the_lines_are_redrawn_in_place(tmp_path: Path):
    stream = io.StringIO()
    lines = [RunLine("adam", tmp_path / "adam", epochs=2), RunLine("sgd", tmp_path / "sgd", epochs=2)]
    board = ProgressBoard(lines, stream, live=True)
    board.refresh()
    MetricsLog(tmp_path / "adam").write("step", step_record(0, 5, 1.5))
    board.refresh()
    first, second = stream.getvalue().split("\x1b[2F")  # back up two lines to redraw them
    assert first == "\x1b[2Kadam  epoch 0/2  starting\n\x1b[2Ksgd   epoch 0/2  starting\n"
    assert second.startswith("\x1b[2Kadam  epoch 0/2  step    5  loss 1.5000")


def test_a_line_shows_the_newer_of_the_step_and_epoch_records(tmp_path: Path):
    log = MetricsLog(tmp_path)
    line = RunLine("sgd", tmp_path, epochs=8)
    log.write("step", step_record(1, 20, 1.19))  # logged early in epoch 1 ...
    log.write("epoch", epoch_record(1, 38, 1.05, 0.46))  # ... which has ended since
    assert "step   38  loss 1.0500" in line.render(3)
    log.write("step", step_record(2, 40, 0.98))  # epoch 2 under way
    assert "step   40  loss 0.9800" in line.render(3) and "val acc 0.460" in line.render(3)
