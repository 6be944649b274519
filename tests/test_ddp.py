"""The trainer on real DistributedDataParallel (gloo, 2 processes under torchrun): its steps
equal single-process steps on the union of the ranks' shards, with uneven final batches (one
rank idle in the last step) and for full-batch gradient descent (no_sync accumulation)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from augserve.client import Client, to_torch
from augserve.data.demo import DemoConfig, ensure_demo_dataset
from augserve.rpc.server import DatasetConfig
from servers import running_server
from trainer.loop import CHECKPOINT_NAME
from trainer.losses import LossConfig, build_loss
from trainer.models import ModelConfig, build_model
from trainer.optim import OptimizerConfig, build_optimizer

LEARNING_RATE = 0.5
# Weights after the run; over 4 steps at lr 0.5 that bounds each step's gradient to ~5e-7.
ATOL = 1e-6


@pytest.fixture(scope="module")
def odd_server(tmp_path_factory):
    """49 images of 32x32: rank 0 reads 25 (batches 8, 8, 8, 1), rank 1 reads 24 (8, 8, 8)."""
    source = ensure_demo_dataset(DemoConfig(images_per_class=10, image_size=32), root=tmp_path_factory.mktemp("odd-src"))
    paths = sorted(source.glob("*/*.jpg"))[:49]
    listing = tmp_path_factory.mktemp("odd") / "odd.csv"
    listing.write_text("path,label\n" + "".join(f"{path},{path.parent.name}\n" for path in paths))
    with running_server({"odd": DatasetConfig(str(listing), allow_outside_root=True)}) as server:
        yield server


def reference_weights(address: str, optimizer_name: str) -> dict[str, torch.Tensor]:
    """One process, the same steps on the union of both ranks' batches of each step."""
    with Client(address) as client:
        shards = []
        for rank in (0, 1):
            with client.stream("odd", batch_size=8, epochs=1, shard_index=rank, shard_count=2, transport="inband") as stream:
                shards.append([to_torch(b.images, b.labels, "cpu", True, (0.5,) * 3, (0.25,) * 3) for b in stream])
    assert [len(shard) for shard in shards] == [4, 3]
    steps = [[shard[k] for shard in shards if k < len(shard)] for k in range(4)]
    if optimizer_name == "gd":
        steps = [[batch for step in steps for batch in step]]
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="linear"), (3, 32, 32), 5)
    optimizer = build_optimizer(OptimizerConfig(name="sgd", learning_rate=LEARNING_RATE), model)
    loss_function = build_loss(LossConfig(l2=0.01))
    for batches in steps:
        images = torch.cat([images for images, _ in batches])
        labels = torch.cat([labels for _, labels in batches])
        optimizer.zero_grad()
        loss_function(model(images), labels, model).total.backward()
        optimizer.step()
    return model.state_dict()


@pytest.mark.parametrize("optimizer_name", ["sgd", "gd"])
def test_two_ddp_ranks_step_like_one_process_on_the_union_of_their_shards(odd_server, tmp_path, optimizer_name):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "trainer", "--endpoint", odd_server.address, "--dataset", "odd", "--model", "linear",
        "--optimizer", optimizer_name, "--lr", str(LEARNING_RATE), "--schedule", "constant", "--l2", "0.01",
        "--epochs", "1", "--batch-size", "8", "--no-validate", "--device", "cpu", "--transport", "inband",
        "--output", str(tmp_path), "--no-progress", "--threads", "1", "--log-every", "100",
    ]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)
    assert checkpoint["step"] == (1 if optimizer_name == "gd" else 4)
    expected = reference_weights(odd_server.address, optimizer_name)
    for name, value in checkpoint["model"].items():
        torch.testing.assert_close(value, expected[name], atol=ATOL, rtol=0, msg=name)
