"""Regressions of the session machinery, each against a real server on 127.0.0.1: batches made
before a bad file are delivered before its DATA_LOSS, detaching respects the memory budget,
credits are honoured, the seed bound is one definition, and a ring outlives its
unreleased slots (still answering a bad message meanwhile)."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from augserve._proto.augserve.v1 import augserve_pb2 as pb
from augserve._proto.augserve.v1 import augserve_pb2_grpc as pb_grpc
from augserve.client import AugserveClientError, Client
from augserve.core.errors import SpecError
from augserve.core.plan import MAX_SEED, uniforms
from augserve.core.spec import AugmentSpec
from augserve.data.datasets import epoch_order, load_manifest
from augserve.data.demo import DemoConfig, ensure_demo_dataset
from augserve.rpc.convert import spec_to_proto
from augserve.rpc.server import DatasetConfig
from augserve.streaming.manager import INBAND_COPIES
from augserve.transport.ring import SHM_DIR, SlotReader, remove_probe, write_probe
from servers import running_server, wait_until
from trainer.run_config import DataConfig

SPEC = AugmentSpec.from_dict({"ops": [{"rotate": {"degrees": 15}}, {"flip": {}}, {"random_resized_crop": {"size": 24}}]})
BATCH = 4
SEED = 3


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> Path:
    return ensure_demo_dataset(DemoConfig(images_per_class=8, image_size=32), root=tmp_path_factory.mktemp("data"))


def read_all(address: str, **options) -> list[tuple[int, int, bytes]]:
    with Client(address) as client, client.stream("shapes", spec=SPEC, batch_size=BATCH, seed=SEED, **options) as stream:
        return [(batch.epoch, batch.position, batch.images.tobytes()) for batch in stream]


@pytest.mark.parametrize("transport", ["inband", "shared_memory"])
def test_fail_policy_delivers_every_good_batch_before_data_loss(tmp_path, dataset_root, transport):
    """A bad file three batches ahead of a slow reader (a window of one batch): the producer
    fails long before the reader gets there, yet the reader receives the three good batches,
    then DATA_LOSS naming the file; the server goes on serving other clients."""
    root = tmp_path / "shapes"
    root.mkdir()
    for path in dataset_root.rglob("*.jpg"):
        target = root / path.relative_to(dataset_root)
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(path.read_bytes())
    manifest = load_manifest(root, use_cache=False)
    order = epoch_order(np.arange(len(manifest)), SEED, 0, 0, 1, shuffle=True)
    bad_path = Path(manifest.path(int(order[3 * BATCH + 1])))
    good_copy = bad_path.read_bytes()
    with running_server({"shapes": DatasetConfig(str(root))}) as server:
        expected = read_all(server.address, epochs=1, transport=transport)[:3]
        bad_path.write_bytes(b"\xff\xd8\xff not a JPEG after all")
        with Client(server.address) as client, client.stream(
            "shapes", spec=SPEC, batch_size=BATCH, seed=SEED, epochs=1, prefetch=1,
            transport=transport, on_bad_image="fail",
        ) as stream:
            assert wait_until(lambda: any(p.error is not None for p in list(server.manager.producers.values())))
            received = []
            with pytest.raises(AugserveClientError) as caught:
                for batch in stream:
                    received.append((batch.epoch, batch.position, batch.images.tobytes()))
        assert received == expected
        assert caught.value.code == grpc.StatusCode.DATA_LOSS
        assert bad_path.name in caught.value.message
        bad_path.write_bytes(good_copy)
        assert read_all(server.address, epochs=1, transport=transport)[:3] == expected  # still serving


def test_detach_respects_the_memory_budget(dataset_root):
    """A stalled member of a full lockstep group would need a ring of its own that the budget
    cannot hold: it ends with RESOURCE_EXHAUSTED naming the budget, and the member that keeps
    reading gets exactly a solo run's batches."""
    batch_bytes = BATCH * 24 * 24 * 3
    ring_bytes = (2 + 2) * batch_bytes  # (prefetch + group_window) slots of one batch
    inband_bytes = 2 * INBAND_COPIES * batch_bytes  # the two members' messages in flight
    limits = dict(stall_seconds=0.5, group_window=2, max_buffer_bytes=ring_bytes + inband_bytes + 100)
    with running_server({"shapes": DatasetConfig(str(dataset_root))}, **limits) as server:
        solo = read_all(server.address, epochs=2, prefetch=2, transport="inband", group_policy="alone")
        results: dict[str, object] = {}
        release_stalled = threading.Event()

        def stalled() -> None:
            try:
                with Client(server.address) as client, client.stream(
                    "shapes", spec=SPEC, batch_size=BATCH, seed=SEED, epochs=2, prefetch=2,
                    transport="inband", group_size=2,
                ) as stream:
                    for _ in stream:
                        release_stalled.wait(60)
                results["stalled"] = "finished"
            except AugserveClientError as error:
                results["stalled"] = error

        thread = threading.Thread(target=stalled)
        thread.start()
        try:
            reader = read_all(server.address, epochs=2, prefetch=2, transport="inband", group_size=2)
        finally:
            release_stalled.set()
            thread.join(60)
        assert reader == solo
        error = results["stalled"]
        assert isinstance(error, AugserveClientError) and error.code == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        assert "max_buffer_bytes" in error.message
        assert server.manager.counters.detached == 0
        assert server.manager.wait_idle(10)


def test_a_credit_flood_is_honoured(dataset_root):
    """Credit{1000} on a window of 1 gives every batch of the stream: none is dropped, the
    stream does not stall."""
    with running_server({"shapes": DatasetConfig(str(dataset_root))}) as server:
        expected = read_all(server.address, epochs=2, transport="inband")
        opening = pb.OpenSession(
            dataset="shapes", spec=spec_to_proto(SPEC), batch_size=BATCH, seed=SEED, epochs=2,
            prefetch=1, transport=pb.TRANSPORT_INBAND,
        )
        messages = [pb.ClientMessage(open=opening), pb.ClientMessage(credit=pb.Credit(batches=1000))]
        done = threading.Event()

        def requests():
            yield from messages
            done.wait(30)

        received = []
        with grpc.insecure_channel(server.address) as channel:
            for message in pb_grpc.AugmentStub(channel).Stream(requests(), timeout=30):
                if message.WhichOneof("kind") == "batch":
                    received.append((message.batch.epoch, message.batch.position, b""))
                elif message.WhichOneof("kind") == "chunk":  # the pixels follow their batch
                    epoch, position, pixels = received[-1]
                    received[-1] = (epoch, position, pixels + message.chunk.data)
            done.set()
        assert len(received) == len(expected) > 17
        assert received == expected


def test_the_seed_bound_is_one_definition(dataset_root):
    """Plans, the wire and the trainer accept MAX_SEED and refuse MAX_SEED + 1."""
    uniforms(MAX_SEED, 0, 0, 1)
    with pytest.raises(SpecError):
        uniforms(MAX_SEED + 1, 0, 0, 1)
    DataConfig(seed=MAX_SEED)
    with pytest.raises(SpecError) as caught:
        DataConfig(seed=MAX_SEED + 1)
    assert caught.value.field == "seed"
    with running_server({"shapes": DatasetConfig(str(dataset_root))}) as server:
        with Client(server.address) as client:
            with client.stream("shapes", spec=SPEC, batch_size=BATCH, seed=MAX_SEED, epochs=1) as stream:
                assert sum(len(batch.sample_ids) for batch in stream) == 40
            with pytest.raises(AugserveClientError) as refused:
                client.stream("shapes", spec=SPEC, batch_size=BATCH, seed=MAX_SEED + 1, epochs=1)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and "open.seed" in refused.value.message


class WholeStream:
    """A raw Stream call for a one-batch shared-memory stream (the split fits in one batch)
    that reads nothing until the server has produced and sent all of it; `send` adds client
    messages, `close` ends the call and removes the same-host probe."""

    def __init__(self, server) -> None:
        self.probe, nonce = write_probe()
        opening = pb.OpenSession(
            dataset="shapes", spec=spec_to_proto(SPEC), batch_size=64, seed=SEED, epochs=1,
            transport=pb.TRANSPORT_SHARED_MEMORY, shm_probe_name=self.probe, shm_probe_nonce=nonce,
        )  # fmt: skip
        self.channel = grpc.insecure_channel(server.address)
        self.requests: queue.Queue[pb.ClientMessage | None] = queue.Queue()
        self.send(pb.ClientMessage(open=opening))
        self.call = pb_grpc.AugmentStub(self.channel).Stream(iter(self.requests.get, None), timeout=60)
        assert wait_until(lambda: server.manager.counters.batches_delivered == 1)
        time.sleep(0.5)  # long enough for a server that does not wait to end the stream

    def send(self, message: pb.ClientMessage) -> None:
        self.requests.put(message)

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()
        self.channel.close()
        remove_probe(self.probe)


def test_a_stream_sent_whole_keeps_its_ring_until_its_slots_are_released(dataset_root):
    """A one-batch shared-memory stream is produced and sent whole before its client reads the
    SessionInfo naming the ring: the ring stays until the client has mapped it and released the
    slot, and only then does End come and the segment go."""
    with running_server({"shapes": DatasetConfig(str(dataset_root))}) as server:
        stream = WholeStream(server)
        try:
            info = next(stream.call).info
            segment = SHM_DIR / info.shm_name
            reader = SlotReader(info.shm_name, info.slot_bytes)
            batch = next(stream.call).batch
            images = reader.view(batch.slot, (batch.count, *info.output_size, 3)).copy()
            reader.close()
            stream.send(pb.ClientMessage(release=pb.ReleaseSlot(sequence=batch.sequence)))
            rest = [message.WhichOneof("kind") for message in stream.call]
        finally:
            stream.close()
        assert batch.count == len(load_manifest(dataset_root)) and images.any()
        assert rest == ["epoch_end", "end"]
        assert wait_until(lambda: not segment.exists())


def test_a_bad_message_while_the_end_waits_for_releases_is_refused(dataset_root):
    """Waiting for its last release, a stream still answers a bad client message with
    INVALID_ARGUMENT naming the field, not with a clean end."""
    with running_server({"shapes": DatasetConfig(str(dataset_root))}) as server:
        stream = WholeStream(server)
        try:
            assert next(stream.call).WhichOneof("kind") == "info"
            assert next(stream.call).WhichOneof("kind") == "batch"
            stream.send(pb.ClientMessage(open=pb.OpenSession(dataset="shapes")))
            with pytest.raises(grpc.RpcError) as refused:
                list(stream.call)
        finally:
            stream.close()
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "open" in refused.value.details()
