"""The server against real clients on 127.0.0.1: coverage, sharding, transports, credits,
health, reflection, and the ListDatasets / GetServerInfo calls."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from augserve.backends.opencv import OpenCVBackend
from augserve.client import Client
from augserve.data.demo import CLASSES, DemoConfig, ensure_demo_dataset
from augserve.backends.batch import SourceImage, augment_batch
from augserve.rpc.server import DatasetConfig
from augserve.core.spec import AugmentSpec
from servers import own_segments, running_server, wait_until

SPEC = AugmentSpec.from_dict(
    {"ops": [{"rotate": {"degrees": 15}}, {"flip": {}}, {"random_resized_crop": {"size": 32, "scale": [0.5, 1]}}, {"brightness": {"factor": 0.2}}]}
)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    """60 real JPEG files, 12 per class, in an ImageFolder tree."""
    return ensure_demo_dataset(DemoConfig(images_per_class=12, image_size=48), root=tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def server(small_dataset):
    datasets = {"shapes": DatasetConfig(str(small_dataset), validation_fraction=0.25)}
    with running_server(datasets, max_batch_size=64) as server:
        yield server


@pytest.fixture
def client(server):
    with Client(server.address, timeout=60) as client:
        yield client


def collect(stream) -> list:
    return [batch for batch in stream]


def test_two_epochs_every_sample_once_per_epoch_per_shard(client, small_dataset):
    listing = {info.name: info for info in client.list_datasets()}["shapes"]
    assert (listing.samples, listing.train_samples, listing.validation_samples) == (60, 45, 15)
    assert list(listing.classes) == sorted(CLASSES)
    shards = []
    for shard_index in range(3):
        with client.stream("shapes", spec=SPEC, batch_size=4, epochs=2, seed=3, shard_index=shard_index, shard_count=3) as stream:
            assert stream.facts.samples_per_epoch == 15 and stream.facts.batches_per_epoch == 4
            batches = collect(stream)
            assert [summary.epoch for summary in stream.epochs] == [0, 1]
            assert stream.end_reason == "finished 2 epochs"
        per_epoch = {0: [], 1: []}
        for batch in batches:
            assert batch.images.shape == (len(batch.sample_ids), 32, 32, 3)
            per_epoch[batch.epoch].extend(batch.sample_ids.tolist())
            # Labels are the class folders the files live in.
            for sample_id, label in zip(batch.sample_ids, batch.labels):
                assert str(client_paths(small_dataset)[sample_id]).split("/")[-2] == sorted(CLASSES)[label]
        for epoch, ids in per_epoch.items():
            assert len(ids) == len(set(ids)) == 15, (shard_index, epoch)
        assert per_epoch[0] != per_epoch[1]  # reshuffled each epoch
        shards.append(per_epoch)
    for epoch in (0, 1):
        union = set().union(*(set(shard[epoch]) for shard in shards))
        assert len(union) == 45 and sum(len(shard[epoch]) for shard in shards) == 45


def client_paths(root: Path) -> list[Path]:
    """Manifest order: class folders sorted, files sorted (the server's sample ids)."""
    return [path for folder in sorted(root.iterdir()) if folder.is_dir() for path in sorted(folder.glob("*.jpg"))]


def test_validation_split_uses_the_eval_spec_in_order(client):
    with client.stream("shapes", split="validation", batch_size=8, eval_size=(40, 40)) as stream:
        batches = collect(stream)
    ids = [i for batch in batches for i in batch.sample_ids.tolist()]
    assert ids == sorted(ids) and len(ids) == 15
    assert batches[0].images.shape[1:] == (40, 40, 3)
    counts = Counter(label for batch in batches for label in batch.labels.tolist())
    assert sorted(counts.values()) == [3, 3, 3, 3, 3]  # the same fraction of every class


def test_inband_and_shared_memory_equal_the_in_process_backend(client, small_dataset):
    results = {}
    for transport in ("inband", "shared_memory"):
        with client.stream("shapes", spec=SPEC, batch_size=7, epochs=1, seed=11, transport=transport) as stream:
            assert stream.facts.transport == transport
            results[transport] = [(b.sample_ids.copy(), b.labels.copy(), b.images.copy(), b.epoch) for b in stream]
    assert len(results["inband"]) == len(results["shared_memory"]) == 7
    paths = client_paths(small_dataset)
    backend = OpenCVBackend(2)
    try:
        for (ids_a, labels_a, images_a, epoch), (ids_b, labels_b, images_b, _) in zip(results["inband"], results["shared_memory"]):
            assert np.array_equal(ids_a, ids_b) and np.array_equal(labels_a, labels_b)
            assert images_a.tobytes() == images_b.tobytes()
            sources = [SourceImage(int(i), int(label), str(paths[i]), paths[i].read_bytes()) for i, label in zip(ids_a, labels_a)]
            expected = augment_batch(backend, SPEC, 11, epoch, sources)
            assert expected.images.tobytes() == images_a.tobytes()
    finally:
        backend.close()
    assert wait_until(lambda: not own_segments())


def test_auto_transport_picks_shared_memory_on_the_same_host(client):
    with client.stream("shapes", spec=SPEC, batch_size=8, transport="auto") as stream:
        assert stream.facts.transport == "shared_memory"
        next(iter(stream))


def test_credits_bound_how_far_the_server_runs_ahead(server, client):
    """A client that never acknowledges gets exactly `prefetch` batches, though the server has
    more made; and the producer stops within its ring (prefetch + group_window slots) of them."""
    # The counters are ours alone once no session is open and no producer still runs.
    assert wait_until(lambda: (lambda info: info.live_sessions == 0 and info.producers == 0)(client.server_info()))
    before = client.server_info()
    prefetch, window = 2, server.config.limits.group_window
    stub_stream = client.stream("shapes", spec=SPEC, batch_size=2, epochs=0, prefetch=prefetch, transport="inband")
    received = []
    call = stub_stream._call
    for message in call:
        if message.WhichOneof("kind") == "batch":
            received.append(message.batch.sequence)
            if len(received) == prefetch:
                break

    def made_and_sent() -> tuple[int, int]:
        info = client.server_info()
        return info.batches_produced - before.batches_produced, info.batches_delivered - before.batches_delivered

    # The event: a ring's worth of batches made, so the server has batches it could send.
    assert wait_until(lambda: made_and_sent()[0] >= prefetch + window, timeout=60), made_and_sent()
    # Sending nothing more is no event; a second is far longer than sending a ready batch takes.
    assert not wait_until(lambda: made_and_sent()[1] > prefetch, timeout=1.0), made_and_sent()
    produced, delivered = made_and_sent()
    assert delivered == prefetch
    assert produced <= prefetch + prefetch + window, produced  # what was sent, plus a full ring
    stub_stream.close()
    assert wait_until(lambda: client.server_info().live_sessions == 0)


def test_health_and_reflection_answer_to_grpc_stubs(server):
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "augserve.v1.Augment"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {service.name for response in responses for service in response.list_services_response.service}
    assert {"augserve.v1.Augment", "grpc.health.v1.Health"} <= names


def test_server_info_reports_backend_limits_and_counters(client):
    info = client.server_info()
    assert info.backend == "opencv" and info.device == "cpu"
    assert info.limits.max_batch_size == 64 and list(info.datasets) == ["shapes"]


def test_csv_file_list_dataset(tmp_path, small_dataset):
    rows = ["path,label"] + [f"{path},{path.parent.name}" for path in client_paths(small_dataset)[::4]]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    # The rows name files outside the CSV's folder, which a server refuses unless told.
    with running_server({"listed": DatasetConfig(str(tmp_path / "list.csv"), allow_outside_root=True)}) as server:
        with Client(server.address) as client, client.stream("listed", spec=SPEC, batch_size=5, split="all") as stream:
            batches = collect(stream)
    assert sum(len(batch.sample_ids) for batch in batches) == 15
    assert stream.facts.classes == tuple(sorted(CLASSES))
