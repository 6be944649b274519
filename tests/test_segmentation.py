"""The segmentation task: its metrics against a written-out reference, its loss's ignore index,
the config combinations it refuses, and a U-Net trained on the demo scenes through a real server
(images and label maps in one stream) to a validation mIoU well above chance."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from augserve.data.demo_scenes import SceneConfig, ensure_demo_scenes
from augserve.rpc.server import DatasetConfig
from servers import running_server
from trainer.loop import train
from trainer.run_config import TrainConfig
from trainer.segmentation import IGNORE_INDEX, SmallUNet, confusion_matrix, mean_iou, pixel_accuracy_sum, pixel_cross_entropy
from trainer.sweep import RunResult, leaderboard


def reference_miou(targets: np.ndarray, predicted: np.ndarray, classes: int) -> float:
    """IoU per class by its definition, over pixels not ignored, averaged over present classes."""
    counted = targets != IGNORE_INDEX
    ious = []
    for label in range(classes):
        truth, guess = (targets == label) & counted, (predicted == label) & counted
        union = np.logical_or(truth, guess).sum()
        if union:
            ious.append(np.logical_and(truth, guess).sum() / union)
    return float(np.mean(ious))


def test_miou_and_pixel_accuracy_equal_their_definitions():
    rng = np.random.default_rng(3)
    logits = torch.from_numpy(rng.normal(size=(4, 5, 12, 10)).astype(np.float32))
    targets = rng.integers(0, 4, (4, 12, 10))  # class 4 is never a target
    targets[:, :2] = IGNORE_INDEX
    masks = torch.from_numpy(targets)
    predicted = logits.argmax(dim=1).numpy()
    confusion = confusion_matrix(logits, masks, 5)
    assert int(confusion.sum()) == int((targets != IGNORE_INDEX).sum())
    miou, per_class = mean_iou(confusion)
    assert miou == pytest.approx(reference_miou(targets, predicted, 5), abs=1e-12)
    assert len(per_class) == 5
    counted = targets != IGNORE_INDEX
    per_image = [((predicted[i] == targets[i]) & counted[i]).sum() / counted[i].sum() for i in range(4)]
    assert float(pixel_accuracy_sum(logits, masks)) == pytest.approx(sum(per_image), rel=1e-6)


def test_the_loss_leaves_ignored_pixels_out():
    logits = torch.randn(2, 3, 6, 6)
    masks = torch.randint(0, 3, (2, 6, 6))
    masks[0] = IGNORE_INDEX  # a wholly ignored image changes nothing
    expected = F.cross_entropy(logits[1:], masks[1:])
    assert float(pixel_cross_entropy(logits, masks)) == pytest.approx(float(expected), rel=1e-6)
    assert float(pixel_cross_entropy(logits, torch.full_like(masks, IGNORE_INDEX))) == 0.0


def test_the_unet_keeps_the_input_size():
    model = SmallUNet(3, (8, 16, 32), 4)
    assert model(torch.zeros(2, 3, 48, 40)).shape == (2, 4, 48, 40)


@pytest.fixture(scope="module")
def scenes_server():
    with running_server({"scenes": DatasetConfig(str(ensure_demo_scenes(SceneConfig())), validation_fraction=0.2)}) as server:
        yield server


def scenes_config(server, output, **sections) -> TrainConfig:
    data = {
        "endpoints": [server.address], "dataset": "scenes", "task": "segmentation", "batch_size": 16,
        "eval_batch_size": 48, "epochs": 1, "spec": {"ops": [{"flip": {"horizontal": 0.5}}]}, **sections.pop("data", {}),
    }
    run = {"output": str(output), "progress": False, "threads": 2, "log_every": 1000}
    model = {"name": "unet", "conv_widths": [16, 32, 64], **sections.pop("model", {})}
    return TrainConfig.from_dict({"data": data, "model": model, "run": run, "schedule": {"name": "constant"}, **sections})


@pytest.mark.parametrize(
    ("sections", "field"),
    [
        ({"model": {"name": "cnn"}}, "model.name"),
        ({"loss": {"name": "mse"}}, "loss.name"),
        ({"mixing": {"cutmix_alpha": 1.0}}, "mixing"),
        ({"data": {"task": "classification"}}, "model.name"),
    ],
)
def test_combinations_the_task_cannot_train_are_refused_by_field(scenes_server, tmp_path, sections, field):
    with pytest.raises(ValueError, match=field):
        train(scenes_config(scenes_server, tmp_path, **sections))


def test_a_unet_learns_the_demo_scenes_well_above_chance(scenes_server, tmp_path):
    """Background, circles, squares and triangles. Predicting background everywhere scores a
    mIoU of about 0.19 (the background's IoU over four classes); measured here: 0.62 after 8
    epochs of 12 steps (Adam 1e-3; 0.56-0.70 over the last five epochs), in 45 s."""
    config = scenes_config(scenes_server, tmp_path, data={"epochs": 8}, optimizer={"name": "adam", "learning_rate": 0.001}, loss={"l2": 1e-6})
    summary = train(config)
    first, last = summary.epochs[0], summary.epochs[-1]
    print("validation mIoU per epoch:", [round(epoch["val_miou"], 3) for epoch in summary.epochs])
    assert last["val_miou"] >= 0.50, [round(epoch["val_miou"], 3) for epoch in summary.epochs]
    assert last["train_data_loss"] < first["train_data_loss"] and last["train_penalty"] > 0
    with open(tmp_path / "epochs.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert float(rows[-1]["val_miou"]) == pytest.approx(last["val_miou"])
    board = leaderboard([RunResult("unet", tmp_path, 0, 1.0, rows)])
    assert "val mIoU" in board.splitlines()[0] and f"{last['val_miou']:.3f}" in board


def test_the_segmentation_sweep_file_plans_three_runs_on_one_stream():
    """The main job's segmentation variant (configs/segmentation_sweep.yaml): every run
    segments, and all read one shared stream of images and masks."""
    from pathlib import Path

    from augserve.core.yamlio import load_yaml
    from trainer.sweep import _stream_key, plan_runs

    sweep = load_yaml((Path(__file__).resolve().parent.parent / "configs" / "segmentation_sweep.yaml").read_text())
    plans = plan_runs(dict(sweep), {})
    assert len(plans) == 3 and {plan.config.data.task for plan in plans} == {"segmentation"}
    assert {plan.config.model.name for plan in plans} == {"unet"} and len({_stream_key(plan.config) for plan in plans}) == 1
