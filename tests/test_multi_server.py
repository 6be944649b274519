"""Beyond one node: a trainer given several servers reads disjoint shards from them."""

from __future__ import annotations

import pytest

from augserve.client import Client, ShardedStream, open_stream
from augserve.data.demo import DemoConfig, ensure_demo_dataset
from augserve.rpc.server import DatasetConfig
from augserve.core.spec import AugmentSpec
from servers import running_server
from trainer.loop import train
from trainer.run_config import TrainConfig

SPEC = AugmentSpec.from_dict({"ops": [{"flip": {}}, {"random_resized_crop": {"size": 16}}]})


@pytest.fixture(scope="module")
def two_servers(tmp_path_factory):
    root = ensure_demo_dataset(DemoConfig(images_per_class=9, image_size=32), root=tmp_path_factory.mktemp("data"))
    datasets = {"shapes": DatasetConfig(str(root))}
    with running_server(datasets) as first, running_server(datasets) as second:
        assert first.port != second.port
        yield [first.address, second.address]


@pytest.mark.parametrize("world_size", [1, 2])
def test_servers_and_ranks_read_disjoint_shards_that_cover_each_epoch(two_servers, world_size):
    seen = {0: [], 1: []}
    for rank in range(world_size):
        clients = [Client(address) for address in two_servers]
        stream = open_stream(clients, "shapes", rank=rank, world_size=world_size, spec=SPEC, batch_size=4, epochs=2, seed=5)
        with stream:
            assert isinstance(stream, ShardedStream)
            epochs_in_order = []
            for batch in stream:
                seen[batch.epoch].extend(batch.sample_ids.tolist())
                epochs_in_order.append(batch.epoch)
            assert epochs_in_order == sorted(epochs_in_order)  # no epoch-1 batch before epoch 0 ends
            assert len(stream.resume_tokens) == 2
        for client in clients:
            client.close()
    for epoch, ids in seen.items():
        assert sorted(ids) == list(range(45)), epoch  # each sample exactly once per epoch


def test_trainer_with_two_endpoints(two_servers, tmp_path):
    config = TrainConfig.from_dict({
        "data": {"endpoints": two_servers, "dataset": "shapes", "batch_size": 8, "epochs": 2, "validate": False, "transport": "inband"},
        "model": {"name": "linear"},
        "optimizer": {"name": "sgd", "learning_rate": 0.005},
        "run": {"output": str(tmp_path), "progress": False, "threads": 1},
    })
    summary = train(config)
    assert [record["images"] for record in summary.epochs] == [45, 45]
