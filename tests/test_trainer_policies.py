"""Training with the modern recipes through a real server: RandAugment with CutMix,
TrivialAugment with MixUp; client-side mixing is exact on resume and lets the members of one
shared group mix the same stream each its own way; a sweep can vary a policy's magnitude.

Tiny settings (the demo generator's shapes at 32x32, 12 per class: 50 training images in 4
batches of 16, the last one short) so that each run takes seconds."""

from __future__ import annotations

import csv
import threading
from pathlib import Path

import pytest
from servers import running_server

from augserve.data.demo import DemoConfig, ensure_demo_dataset
from augserve.rpc.server import DatasetConfig
from trainer.loop import train
from trainer.losses import LossFunction
from trainer.mixing import BatchMixer
from trainer.run_config import TrainConfig
from trainer.sweep import _stream_key, plan_runs

TINY_CNN = {"name": "cnn", "conv_widths": [8, 16]}
RAND_AUGMENT = {"ops": [{"flip": {"horizontal": 0.5}}, {"rand_augment": {"num_ops": 2, "magnitude": 9}}]}
TRIVIAL_AUGMENT = {"ops": [{"flip": {"horizontal": 0.5}}, {"trivial_augment_wide": {}}]}


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    root = ensure_demo_dataset(DemoConfig(images_per_class=12, image_size=32), root=tmp_path_factory.mktemp("tiny"))
    with running_server({"tiny": DatasetConfig(str(root), validation_fraction=0.2)}) as server:
        yield server


def config_for(server, output: Path, spec: dict, mixing: dict, **sections) -> TrainConfig:
    data = {
        "endpoints": [server.address],
        "dataset": "tiny",
        "batch_size": 16,
        "epochs": 4,
        "transport": "inband",
        "spec": spec,
        **sections.pop("data", {}),
    }
    run = {"output": str(output), "progress": False, "threads": 1, "log_every": 1, **sections.pop("run", {})}
    return TrainConfig.from_dict(
        {
            "data": data,
            "model": TINY_CNN,
            "optimizer": {"name": "adam", "learning_rate": 0.01},
            "mixing": mixing,
            "run": run,
            **sections,
        }
    )


@pytest.fixture
def mixes(monkeypatch) -> list:
    """Every mix the trainers in this test drew: (kind, weight, batch rows)."""
    drawn: list = []
    original = BatchMixer.draw

    def spy(self, epoch, position, count, size):
        mix = original(self, epoch, position, count, size)
        drawn.append((mix.kind, mix.weight, count))
        return mix

    monkeypatch.setattr(BatchMixer, "draw", spy)
    return drawn


@pytest.fixture
def loss_targets(monkeypatch) -> list:
    """The shape of the targets of every loss the trainers in this test computed."""
    shapes: list = []
    original = LossFunction.__call__

    def spy(self, logits, labels, model):
        shapes.append(tuple(labels.shape))
        return original(self, logits, labels, model)

    monkeypatch.setattr(LossFunction, "__call__", spy)
    return shapes


def step_losses(folder: Path) -> list[float]:
    with open(folder / "steps.csv", newline="") as handle:
        return [float(row["batch_loss"]) for row in csv.DictReader(handle)]


@pytest.mark.parametrize(
    "spec, mixing, kind",
    [(RAND_AUGMENT, {"cutmix_alpha": 1.0}, "cutmix"), (TRIVIAL_AUGMENT, {"mixup_alpha": 0.4}, "mixup")],
    ids=["rand_augment+cutmix", "trivial_augment+mixup"],
)
def test_a_policy_and_a_mix_train_the_demo_shapes(tiny_server, tmp_path, mixes, loss_targets, spec, mixing, kind):
    """Every training batch is mixed (each epoch: 3 batches of 16 and one of 2) and its loss
    takes soft targets [N, 5]; the loss falls; validation (never mixed) takes the labels."""
    summary = train(config_for(tiny_server, tmp_path, spec, mixing, data={"epochs": 6}))
    soft = [shape for shape in loss_targets if len(shape) == 2]
    assert len(soft) == 6 * 4 and all(shape[1] == 5 for shape in soft)
    assert len(loss_targets) > len(soft)  # validation batches, with [N] labels
    losses = [record["train_data_loss"] for record in summary.epochs]
    assert losses[-1] < losses[0], losses
    assert all(0.0 <= record["val_accuracy"] <= 1.0 for record in summary.epochs)
    assert len(mixes) == 6 * 4  # every batch of every epoch drew its mix
    assert {mix for mix, _, count in mixes if count >= 2} == {kind}
    assert all(0.0 <= weight <= 1.0 for _, weight, _ in mixes)
    assert len({weight for _, weight, _ in mixes}) > 10  # a weight of its own per batch
    saved = (tmp_path / "config.yaml").read_text()
    assert "mixing:" in saved and next(iter(mixing)) in saved


def test_mixed_training_resumes_exactly(tiny_server, tmp_path):
    """Mixes are drawn from (seed, epoch, batch position, rank): a run stopped mid-epoch and
    resumed has the very losses of an uninterrupted one."""
    mixing = {"mixup_alpha": 0.4, "cutmix_alpha": 1.0}
    whole = config_for(tiny_server, tmp_path / "whole", RAND_AUGMENT, mixing, data={"epochs": 2}, run={"deterministic": True})
    train(whole)
    expected = step_losses(tmp_path / "whole")
    assert len(expected) == 8
    cut = config_for(
        tiny_server, tmp_path / "cut", RAND_AUGMENT, mixing, data={"epochs": 2}, run={"deterministic": True, "max_steps": 6}
    )
    train(cut)
    resumed = config_for(tiny_server, tmp_path / "cut", RAND_AUGMENT, mixing, data={"epochs": 2}, run={"deterministic": True})
    train(resumed, resume=tmp_path / "cut")
    assert step_losses(tmp_path / "cut") == expected
    unmixed = config_for(tiny_server, tmp_path / "unmixed", RAND_AUGMENT, {}, data={"epochs": 2}, run={"deterministic": True})
    train(unmixed)
    assert step_losses(tmp_path / "unmixed") != expected  # the mixing is not a no-op


def test_group_members_share_one_stream_and_mix_it_each_their_own_way(tiny_server, tmp_path, mixes):
    """Two trainers on the same RandAugment stream, one with CutMix and one with MixUp: the
    server produces each batch once and delivers it twice; each mixes its copy."""
    before = tiny_server.manager.counters.snapshot()
    configs = [
        config_for(tiny_server, tmp_path / name, RAND_AUGMENT, mixing, data={"epochs": 2, "validate": False, "group_size": 2})
        for name, mixing in (("cutmix", {"cutmix_alpha": 1.0}), ("mixup", {"mixup_alpha": 0.4}))
    ]
    errors: list[BaseException] = []

    def run(config: TrainConfig) -> None:
        try:
            train(config)
        except BaseException as error:  # noqa: BLE001 (asserted below, in the test's thread)
            errors.append(error)

    threads = [threading.Thread(target=run, args=(config,)) for config in configs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)
    after = tiny_server.manager.counters.snapshot()
    produced = after.batches_produced - before.batches_produced
    delivered = after.batches_delivered - before.batches_delivered
    assert produced == 2 * 4 and delivered == 2 * produced, (produced, delivered)
    assert {kind for kind, _, count in mixes if count >= 2} == {"cutmix", "mixup"}


def test_a_sweep_varies_the_policy_magnitude_and_the_mix():
    """Dotted overrides index into the spec's op list; runs that differ in the mix only share
    a stream, runs with another magnitude do not."""
    sweep = {
        "base": {"data": {"dataset": "demo", "spec": RAND_AUGMENT}},
        "grid": {"data.spec.ops.1.rand_augment.magnitude": [5, 9], "mixing.cutmix_alpha": [0.0, 1.0]},
    }
    plans = plan_runs(sweep, {})
    assert len(plans) == 4
    magnitudes = {(plan.config.data.spec["ops"][1]["rand_augment"]["magnitude"], plan.config.mixing.cutmix_alpha) for plan in plans}
    assert magnitudes == {(5, 0.0), (5, 1.0), (9, 0.0), (9, 1.0)}
    assert sweep["base"]["data"]["spec"] == RAND_AUGMENT  # the base is left alone
    streams = {_stream_key(plan.config) for plan in plans}
    assert len(streams) == 2  # one per magnitude: the mix is the client's
    with pytest.raises(Exception, match="not an index"):
        plan_runs({**sweep, "grid": {"data.spec.ops.7.rand_augment.magnitude": [5]}}, {})


def test_the_recipes_sweep_file_plans_five_runs_on_three_streams():
    from augserve.core.yamlio import load_yaml

    sweep = load_yaml((Path(__file__).resolve().parent.parent / "configs" / "recipes_sweep.yaml").read_text())
    plans = plan_runs({key: value for key, value in sweep.items()}, {})
    assert len(plans) == 5
    assert len({_stream_key(plan.config) for plan in plans}) == 3
    assert {plan.config.mixing.cutmix_alpha for plan in plans} == {0.0, 1.0}
