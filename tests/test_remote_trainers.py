"""Trainers on other hosts: in-band batches in chunks that fit gRPC's default 4 MiB limit,
starved sessions closed, an idle-message timeout instead of a whole-call deadline, and a
trainer that runs through a server SIGKILL + restart exactly as if nothing had happened."""

from __future__ import annotations

import csv
import signal
import socket
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from augserve._proto.augserve.v1 import augserve_pb2 as pb
from augserve._proto.augserve.v1 import augserve_pb2_grpc as pb_grpc
from augserve.client import AugserveClientError, Client
from augserve.core.spec import AugmentSpec
from augserve.data.demo import DemoConfig, ensure_demo_dataset
from augserve.rpc.convert import spec_to_proto
from augserve.rpc.messages import DEFAULT_CHUNK_BYTES
from augserve.rpc.server import DatasetConfig
from servers import ServerProcess, running_server, wait_until
from trainer.loop import train
from trainer.run_config import TrainConfig

BIG_SPEC = AugmentSpec.from_dict({"ops": [{"flip": {}}, {"random_resized_crop": {"size": 224}}]})
DEFAULT_RECEIVE_LIMIT = 4 << 20


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> Path:
    return ensure_demo_dataset(DemoConfig(images_per_class=8, image_size=32), root=tmp_path_factory.mktemp("data"))


def raw_batches(address: str, opening: pb.OpenSession) -> list[tuple[int, bytes]]:
    """A client written from the .proto alone, on a channel with gRPC's default limits:
    (sequence, pixels) of every batch, reassembled from its chunks."""
    batches: list[tuple[int, bytearray]] = []
    with grpc.insecure_channel(address) as channel:
        requests = iter([pb.ClientMessage(open=opening), pb.ClientMessage(credit=pb.Credit(batches=1000))])
        for message in pb_grpc.AugmentStub(channel).Stream(requests, timeout=120):
            kind = message.WhichOneof("kind")
            if kind == "batch":
                assert message.ByteSize() < DEFAULT_RECEIVE_LIMIT
                batches.append((message.batch.sequence, bytearray()))
            elif kind == "chunk":
                sequence, pixels = batches[-1]
                assert message.chunk.sequence == sequence and message.chunk.offset == len(pixels)
                assert message.ByteSize() <= DEFAULT_RECEIVE_LIMIT
                pixels += message.chunk.data
    return [(sequence, bytes(pixels)) for sequence, pixels in batches]


@pytest.fixture(scope="module")
def larger_root(tmp_path_factory) -> Path:
    """260 images: one full batch of 256 (and one of 64, with more)."""
    return ensure_demo_dataset(DemoConfig(images_per_class=52, image_size=32), root=tmp_path_factory.mktemp("larger"))


@pytest.mark.parametrize("batch_size", [64, 256])
def test_a_client_with_default_limits_streams_large_batches(larger_root, batch_size):
    """224x224 batches of 64 (9.6 MB) and 256 (38.5 MB) reach a client that keeps gRPC's
    default 4 MiB receive limit, equal byte for byte to what the Python client assembles."""
    with running_server({"shapes": DatasetConfig(str(larger_root))}) as server:
        opening = pb.OpenSession(
            dataset="shapes", spec=spec_to_proto(BIG_SPEC), batch_size=batch_size, seed=2, epochs=1,
            transport=pb.TRANSPORT_INBAND,
        )
        raw = raw_batches(server.address, opening)
        with Client(server.address) as client, client.stream(
            "shapes", spec=BIG_SPEC, batch_size=batch_size, seed=2, epochs=1, transport="inband"
        ) as stream:
            assembled = [(batch.sequence, batch.images.tobytes()) for batch in stream]
    assert raw == assembled
    assert len(raw[0][1]) == batch_size * 224 * 224 * 3 > DEFAULT_CHUNK_BYTES


def test_a_starved_session_is_closed(dataset_root):
    """Batches ready, no credit: after idle_session_seconds the session ends with
    DEADLINE_EXCEEDED naming the limit, and its buffers are freed."""
    with running_server({"shapes": DatasetConfig(str(dataset_root))}, idle_session_seconds=1.0) as server:
        opening = pb.OpenSession(dataset="shapes", batch_size=4, epochs=0, prefetch=1, transport=pb.TRANSPORT_INBAND)
        stop = threading.Event()

        def requests():
            yield pb.ClientMessage(open=opening)
            stop.wait(30)

        kinds = []
        with grpc.insecure_channel(server.address) as channel:
            call = pb_grpc.AugmentStub(channel).Stream(requests(), timeout=30)
            with pytest.raises(grpc.RpcError) as caught:
                for message in call:
                    kinds.append(message.WhichOneof("kind"))
            stop.set()
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "idle_session_seconds" in caught.value.details()
        assert kinds.count("batch") == 1
        assert server.manager.wait_idle(10)
        with Client(server.address) as client, client.stream("shapes", batch_size=4, epochs=1) as stream:
            assert sum(len(batch.sample_ids) for batch in stream) == 40


def test_timeout_is_the_longest_wait_for_a_message_not_a_deadline(dataset_root):
    """Client(timeout=1): a stream read slowly for longer than that goes on (the caller's time
    does not count); a stream whose server sends nothing ends with DEADLINE_EXCEEDED."""
    with running_server({"shapes": DatasetConfig(str(dataset_root))}, group_wait_seconds=30) as server:
        with Client(server.address, timeout=1.0) as client:
            with client.stream("shapes", batch_size=8, epochs=0, prefetch=1) as stream:
                read = 0
                for _ in stream:
                    read += 1
                    threading.Event().wait(0.3)  # a slow training step
                    if read == 6:
                        break
            assert read == 6
            # A group waiting for a member that never comes sends nothing.
            with client.stream("shapes", batch_size=8, epochs=1, group_size=2) as stream:
                with pytest.raises(AugserveClientError) as caught:
                    next(iter(stream))
            assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def step_losses(folder: Path) -> list[float]:
    path = folder / "steps.csv"
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return [float(row["batch_loss"]) for row in csv.DictReader(handle)]


def test_a_trainer_runs_through_a_server_kill_and_restart(tmp_path, dataset_root):
    """SIGKILL the server after three steps, start it again on the same port: the trainer
    reconnects with its last resume token and its loss curve equals an uninterrupted run's."""
    port = free_port()
    datasets = {"shapes": str(dataset_root)}

    def config(output: Path) -> TrainConfig:
        return TrainConfig.from_dict({
            "data": {"endpoints": [f"127.0.0.1:{port}"], "dataset": "shapes", "batch_size": 8, "epochs": 2,
                     "transport": "inband", "validate": False,
                     "spec": {"ops": [{"rotate": {"degrees": 15}}, {"flip": {}}]}},
            "model": {"name": "cnn", "conv_widths": [8, 16]},
            "optimizer": {"name": "adam", "learning_rate": 0.01},
            "run": {"output": str(output), "progress": False, "threads": 1, "log_every": 1, "deterministic": True},
        })

    server = ServerProcess(tmp_path, datasets, ["--port", str(port)])
    try:
        train(config(tmp_path / "whole"))
    finally:
        server.stop()
    expected = step_losses(tmp_path / "whole")
    assert len(expected) == 10  # 2 epochs of 5 batches

    servers = [ServerProcess(tmp_path, datasets, ["--port", str(port)])]
    killed = threading.Event()

    def kill_and_restart() -> None:
        if wait_until(lambda: len(step_losses(tmp_path / "cut")) >= 3, timeout=60, interval=0.01):
            servers[0].signal(signal.SIGKILL)
            servers[0].wait(10)
            killed.set()
            servers.append(ServerProcess(tmp_path, datasets, ["--port", str(port)]))

    chaos = threading.Thread(target=kill_and_restart)
    chaos.start()
    try:
        summary = train(config(tmp_path / "cut"))
    finally:
        chaos.join(60)
        for process in servers:
            process.stop()
    assert killed.is_set() and len(servers) == 2
    assert step_losses(tmp_path / "cut") == expected
    assert summary.step == 10
    assert np.isfinite(expected).all()
