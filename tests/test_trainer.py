"""The trainer against a real server: learning, every optimizer and loss, full-batch GD, exact
resume, the command line and data parallelism under torchrun."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from augserve.client import Client, to_torch
from augserve.data.demo import DemoConfig, ensure_demo_dataset
from augserve.rpc.server import DatasetConfig
from servers import running_server
from trainer.cli import main as train_main
from trainer.loop import CHECKPOINT_NAME, train
from trainer.losses import LossConfig, build_loss
from trainer.models import ModelConfig, build_model
from trainer.optim import OptimizerConfig, build_optimizer
from trainer.run_config import TrainConfig

TINY_CNN = {"name": "cnn", "conv_widths": [8, 16]}


@pytest.fixture(scope="module")
def demo_server(demo_root):
    with running_server({"demo": DatasetConfig(str(demo_root), validation_fraction=0.2)}) as server:
        yield server


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    """60 images of 32x32, 12 per class: 50 to train on (4 batches of 16), 10 to validate."""
    root = ensure_demo_dataset(DemoConfig(images_per_class=12, image_size=32), root=tmp_path_factory.mktemp("tiny"))
    with running_server({"tiny": DatasetConfig(str(root), validation_fraction=0.2)}) as server:
        yield server


def config_for(server, output: Path, **sections) -> TrainConfig:
    data = {
        "endpoints": [server.address],
        "dataset": "tiny",
        "batch_size": 16,
        "epochs": 3,
        "transport": "inband",
        **sections.pop("data", {}),
    }
    run = {"output": str(output), "progress": False, "threads": 1, "log_every": 1, **sections.pop("run", {})}
    return TrainConfig.from_dict({"data": data, "run": run, **sections})


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_cnn_with_adam_learns_the_demo_dataset_well_above_chance(demo_server, tmp_path):
    """Five classes (chance 0.2); measured here: validation accuracy about 0.7 after 6 epochs."""
    config = TrainConfig.from_dict(
        {
            "data": {
                "endpoints": [demo_server.address],
                "dataset": "demo",
                "spec": {"ops": [{"rotate": {"degrees": 10}}, {"flip": {"horizontal": 0.5}}]},
                "batch_size": 64,
                "epochs": 6,
            },
            "model": {"name": "cnn"},
            "optimizer": {"name": "adam", "learning_rate": 0.003},
            "run": {"output": str(tmp_path), "progress": False, "threads": 2},
        }
    )
    summary = train(config)
    last = summary.epochs[-1]
    assert last["val_accuracy"] >= 0.5, summary.epochs
    assert last["train_data_loss"] < summary.epochs[0]["train_data_loss"]
    assert (tmp_path / "config.yaml").exists() and (tmp_path / CHECKPOINT_NAME).exists()
    epochs = read_csv(tmp_path / "epochs.csv")
    assert [int(row["epoch"]) for row in epochs] == list(range(6))
    assert all(0.0 <= float(row["data_wait_fraction"]) <= 1.0 for row in epochs)
    assert int(epochs[0]["images"]) == 1200  # every training image once per epoch
    kinds = {json.loads(line)["kind"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()}
    assert kinds == {"step", "epoch"}


LEARNING_RATES = {"gd": 0.01, "sgd": 0.01, "momentum": 0.001, "nesterov": 0.001, "adam": 0.003, "adamw": 0.003, "rmsprop": 0.001, "adagrad": 0.02}


@pytest.mark.parametrize("optimizer", sorted(LEARNING_RATES))
def test_every_optimizer_lowers_the_loss(tiny_server, tmp_path, optimizer):
    epochs = 6 if optimizer == "gd" else 3
    config = config_for(
        tiny_server, tmp_path,
        data={"epochs": epochs, "validate": False},
        model={"name": "linear"},
        optimizer={"name": optimizer, "learning_rate": LEARNING_RATES[optimizer]},
        schedule={"name": "constant"},
    )
    summary = train(config)
    losses = [record["train_data_loss"] for record in summary.epochs]
    assert losses[-1] < losses[0], losses
    assert summary.step == (epochs if optimizer == "gd" else epochs * 4)


@pytest.mark.parametrize("loss", ["cross_entropy", "binary_cross_entropy", "mse"])
@pytest.mark.parametrize("penalty", [{}, {"l1": 1e-3}, {"l2": 1e-3}, {"l1": 1e-3, "l2": 1e-3}], ids=["none", "l1", "l2", "elastic"])
def test_every_loss_and_regularizer_lowers_the_loss(tmp_path_factory, loss, penalty, request):
    server = request.getfixturevalue("binary_server" if loss == "binary_cross_entropy" else "tiny_server")
    dataset = "pair" if loss == "binary_cross_entropy" else "tiny"
    config = config_for(
        server, tmp_path_factory.mktemp("run"),
        data={"dataset": dataset, "validate": False},
        model=TINY_CNN,
        optimizer={"name": "adam", "learning_rate": 0.01},
        schedule={"name": "constant"},
        loss={"name": loss, **penalty},
    )
    summary = train(config)
    totals = [record["train_data_loss"] + record["train_penalty"] for record in summary.epochs]
    assert totals[-1] < totals[0], totals
    if penalty:
        assert all(record["train_penalty"] > 0 for record in summary.epochs)
    else:
        assert all(record["train_penalty"] == 0 for record in summary.epochs)


@pytest.fixture(scope="module")
def binary_server(tmp_path_factory):
    """Two classes (circle, cross) for the binary loss, as Keras class_mode='binary'."""
    source = ensure_demo_dataset(DemoConfig(images_per_class=12, image_size=32), root=tmp_path_factory.mktemp("pair-src"))
    rows = ["path,label"] + [f"{path},{path.parent.name}" for name in ("circle", "cross") for path in sorted((source / name).glob("*.jpg"))]
    listing = tmp_path_factory.mktemp("pair") / "pair.csv"
    listing.write_text("\n".join(rows) + "\n")
    with running_server({"pair": DatasetConfig(str(listing), allow_outside_root=True)}) as server:
        yield server


def test_gd_takes_one_step_per_epoch_equal_to_the_full_batch_step(tiny_server, tmp_path):
    lr = 0.3
    config = config_for(
        tiny_server, tmp_path,
        data={"epochs": 1, "batch_size": 7, "validate": False},
        model={"name": "linear"},
        optimizer={"name": "gd", "learning_rate": lr},
        schedule={"name": "constant"},
        loss={"l2": 0.01},
    )
    summary = train(config)
    assert summary.step == 1
    trained = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)["model"]

    # The same epoch, fetched directly, and one plain gradient step on all of it at once.
    loss_function = build_loss(config.loss)
    torch.manual_seed(config.data.seed)
    model = build_model(config.model, (3, 32, 32), 5)
    with Client(tiny_server.address) as client, client.stream("tiny", batch_size=50, epochs=1, transport="inband") as stream:
        batches = [to_torch(b.images, b.labels, "cpu", True, (0.5,) * 3, (0.25,) * 3) for b in stream]
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert len(labels) == 50
    optimizer = build_optimizer(OptimizerConfig(name="sgd", learning_rate=lr), model)
    loss_function(model(images), labels, model).total.backward()
    optimizer.step()
    for name, value in model.state_dict().items():
        assert torch.allclose(value, trained[name], atol=1e-6), name


def step_losses(folder: Path) -> list[float]:
    return [float(row["batch_loss"]) for row in read_csv(folder / "steps.csv")]


def test_resume_from_a_mid_epoch_checkpoint_continues_exactly(tiny_server, tmp_path):
    sections = dict(
        data={"epochs": 2, "spec": {"ops": [{"rotate": {"degrees": 20}}, {"flip": {}}]}},
        model={**TINY_CNN, "dropout": 0.2},
        optimizer={"name": "adamw", "learning_rate": 0.01},
    )
    whole = config_for(tiny_server, tmp_path / "whole", **sections, run={"deterministic": True})
    train(whole)
    expected = step_losses(tmp_path / "whole")
    assert len(expected) == 8  # 2 epochs of 4 batches

    interrupted = config_for(tiny_server, tmp_path / "cut", **sections, run={"deterministic": True, "max_steps": 6})
    train(interrupted)  # stops in the middle of the second epoch
    assert step_losses(tmp_path / "cut") == expected[:6]
    resumed = config_for(tiny_server, tmp_path / "cut", **sections, run={"deterministic": True})
    train(resumed, resume=tmp_path / "cut")
    assert step_losses(tmp_path / "cut") == expected


def test_command_line_with_keras_flags_writes_the_resolved_config(tiny_server, tmp_path, capsys):
    code = train_main([
        "--endpoint", tiny_server.address, "--dataset", "tiny", "--image-size", "24",
        "--rotation-range", "10", "--horizontal-flip", "--width-shift-range", "0.1",
        "--model", "mlp", "--optimizer", "momentum", "--lr", "0.05", "--l2", "1e-4",
        "--epochs", "1", "--batch-size", "16", "--output", str(tmp_path), "--no-progress", "--threads", "1",
        "--set", "schedule.warmup_steps=1",
    ])
    assert code == 0
    assert "done: 1 epochs" in capsys.readouterr().out
    saved = TrainConfig.from_dict(__import__("yaml").safe_load((tmp_path / "config.yaml").read_text()))
    assert saved.optimizer.name == "momentum" and saved.loss.l2 == 1e-4 and saved.schedule.warmup_steps == 1
    ops = [next(iter(op)) for op in saved.data.spec["ops"]]
    assert ops == ["rotate", "shift", "flip"] and saved.data.image_size == (24, 24)
    assert saved.data.augment_spec().fixed_output_size == (24, 24)
    assert train_main(["--endpoint", tiny_server.address, "--dataset", "tiny", "--lr", "-1"]) == 2
    assert "optimizer.learning_rate" in capsys.readouterr().err


def test_the_progress_bar_is_drawn_on_a_terminal_and_nowhere_else(tiny_server, tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream, drawn in ((io.StringIO(), False), (Terminal(), True)):
        monkeypatch.setattr(sys, "stderr", stream)
        train(config_for(tiny_server, tmp_path / str(drawn), data={"epochs": 1}, run={"progress": True}))
        assert ("\r" in stream.getvalue()) == drawn and ("epoch 1/1" in stream.getvalue()) == drawn


def test_torchrun_with_two_processes_trains_on_disjoint_shards(tiny_server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="augserve.streaming.manager")
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "trainer", "--endpoint", tiny_server.address, "--dataset", "tiny", "--model", "linear",
        "--optimizer", "sgd", "--lr", "0.005", "--epochs", "2", "--batch-size", "8", "--no-validate",
        "--output", str(tmp_path), "--no-progress", "--threads", "1",
    ]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    opened = [record.getMessage() for record in caplog.records if "opened" in record.getMessage()]
    assert any("shard=0/2" in line for line in opened) and any("shard=1/2" in line for line in opened)
    epochs = read_csv(tmp_path / "epochs.csv")
    # Both ranks together see each of the 50 training images once per epoch.
    assert [int(row["images"]) for row in epochs] == [50, 50]
    assert float(epochs[1]["train_data_loss"]) < float(epochs[0]["train_data_loss"])
