"""Hostile and careless clients against a real server on 127.0.0.1: idle streams that never
open, members that grant credit but never release, in-band sessions past the memory budget,
forged tokens at the last epoch. After each, a control client still gets its batches byte for
byte."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from augserve._proto.augserve.v1 import augserve_pb2 as pb
from augserve._proto.augserve.v1 import augserve_pb2_grpc as pb_grpc
from augserve.client import AugserveClientError, Client
from augserve.core.plan import MAX_EPOCH
from augserve.core.spec import AugmentSpec
from augserve.data.demo import DemoConfig, ensure_demo_dataset
from augserve.rpc.convert import spec_to_proto
from augserve.rpc.server import DatasetConfig
from augserve.streaming.manager import INBAND_COPIES
from augserve.streaming.keys import ResumeToken
from servers import running_server, wait_until

SPEC = AugmentSpec.from_dict({"ops": [{"rotate": {"degrees": 10}}, {"flip": {}}, {"random_resized_crop": {"size": 24}}]})
BATCH = 4


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> Path:
    return ensure_demo_dataset(DemoConfig(images_per_class=8, image_size=32), root=tmp_path_factory.mktemp("data"))


def control_run(address: str, **options) -> list[bytes]:
    options = {"epochs": 1, **options}
    with Client(address) as client, client.stream("shapes", spec=SPEC, batch_size=BATCH, seed=5, **options) as stream:
        return [batch.images.tobytes() + batch.labels.tobytes() for batch in stream]


def health_status(address: str, timeout: float = 2.0) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout).status


def opening(**fields) -> pb.OpenSession:
    values = dict(dataset="shapes", spec=spec_to_proto(SPEC), batch_size=BATCH, seed=5, epochs=1)
    values.update(fields)
    return pb.OpenSession(**values)


class SilentStream:
    """A Stream call that sends `messages` (then nothing) until `close()`; with `every`
    seconds it keeps sending `repeat` that often meanwhile."""

    def __init__(
        self,
        channel: grpc.Channel,
        messages: list[pb.ClientMessage] = (),
        repeat: pb.ClientMessage | None = None,
        every: float = 0.1,
    ) -> None:
        self._stop = threading.Event()
        self._messages = list(messages)
        self._repeat = repeat
        self._every = every
        self.repeating = False
        self.outcome: grpc.StatusCode | None = None
        self.call = pb_grpc.AugmentStub(channel).Stream(self._requests(), timeout=60)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _requests(self):
        yield from self._messages
        if self._repeat is None:
            self._stop.wait(60)
            return
        self.repeating = True
        while not self._stop.wait(self._every):
            yield self._repeat
        self.repeating = False

    def _read(self) -> None:
        try:
            for _ in self.call:
                pass
            self.outcome = grpc.StatusCode.OK
        except grpc.RpcError as error:
            self.outcome = error.code()

    def close(self) -> None:
        self._stop.set()
        self.call.cancel()
        self._thread.join(10)


def test_streams_that_never_open_cannot_lock_anyone_out(dataset_root):
    """80 streams that never send their open message: past the pending bounds the longest
    waiting are cut at once (their deadline is far off), and meanwhile health checks,
    ListDatasets and a control client from the same host are answered."""
    limits = dict(max_sessions=4, max_pending_opens=8, max_pending_opens_per_peer=8, open_timeout_seconds=60.0)
    with running_server({"shapes": DatasetConfig(str(dataset_root))}, **limits) as server:
        expected = control_run(server.address)
        channels = [grpc.insecure_channel(server.address) for _ in range(8)]
        attackers = [SilentStream(channels[index % 8]) for index in range(80)]
        try:
            assert wait_until(lambda: sum(a.outcome is not None for a in attackers) >= 72, timeout=20)
            assert server.servicer.pending.pending == 8  # the newest eight still wait
            assert health_status(server.address) == health_pb2.HealthCheckResponse.SERVING
            with Client(server.address, timeout=5) as client:
                assert [item.name for item in client.list_datasets()] == ["shapes"]
            assert control_run(server.address) == expected
        finally:
            for attacker in attackers:
                attacker.close()
            for channel in channels:
                channel.close()
        assert control_run(server.address) == expected


def test_a_stream_without_its_open_message_is_cut_at_the_deadline(dataset_root):
    with running_server({"shapes": DatasetConfig(str(dataset_root))}, open_timeout_seconds=0.5) as server:
        with grpc.insecure_channel(server.address) as channel:
            silent = SilentStream(channel)
            try:
                assert wait_until(lambda: silent.outcome is not None, timeout=10)
            finally:
                silent.close()
        assert silent.outcome == grpc.StatusCode.CANCELLED
        assert server.servicer.pending.pending == 0
        assert control_run(server.address)


def test_a_member_that_grants_credit_but_never_releases_is_detached(dataset_root):
    """A shared-memory member that keeps granting credit without releasing a slot consumes
    nothing: it stalls its lockstep group until it is detached, and the other member gets
    exactly a solo run's batches."""
    from augserve.transport.ring import remove_probe, write_probe

    with running_server({"shapes": DatasetConfig(str(dataset_root))}, stall_seconds=1.0, group_window=2) as server:
        expected = control_run(server.address, epochs=2, group_policy="alone")
        probe, nonce = write_probe()
        hoarder_open = opening(epochs=2, group_size=2, prefetch=2, transport=pb.TRANSPORT_SHARED_MEMORY,
                               shm_probe_name=probe, shm_probe_nonce=nonce)
        credit = pb.ClientMessage(credit=pb.Credit(batches=1))
        with grpc.insecure_channel(server.address) as channel:
            hoarder = SilentStream(channel, [pb.ClientMessage(open=hoarder_open)], repeat=credit, every=0.1)
            try:
                received = control_run(server.address, epochs=2, group_size=2, transport="shared_memory")
                granting_throughout = hoarder.repeating
            finally:
                hoarder.close()
                remove_probe(probe)
        assert received == expected
        assert granting_throughout  # detached while it still granted credit: credit is not consumption
        assert server.manager.counters.detached == 1


def test_inband_sessions_are_counted_in_the_budget(dataset_root):
    """Each in-band session reserves its messages' copies: with a budget for two, the third is
    refused with RESOURCE_EXHAUSTED naming max_buffer_bytes, and the two keep streaming."""
    batch_bytes = BATCH * 24 * 24 * 3
    ring_bytes = (4 + 8) * batch_bytes
    budget = ring_bytes + 2 * INBAND_COPIES * batch_bytes
    with running_server({"shapes": DatasetConfig(str(dataset_root))}, max_buffer_bytes=budget) as server:
        with Client(server.address) as client:
            first = client.stream("shapes", spec=SPEC, batch_size=BATCH, seed=5, epochs=1, transport="inband", group_size=1)
            second = client.stream("shapes", spec=SPEC, batch_size=BATCH, seed=5, epochs=1, transport="inband")
            with first, second:
                assert second.facts.shared
                with pytest.raises(AugserveClientError) as refused:
                    client.stream("shapes", spec=SPEC, batch_size=BATCH, seed=5, epochs=1, transport="inband")
                assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "max_buffer_bytes" in refused.value.message
                assert server.manager.buffer_bytes <= budget
                one = [batch.images.tobytes() + batch.labels.tobytes() for batch in first]
                two = [batch.images.tobytes() + batch.labels.tobytes() for batch in second]
        assert one == two == control_run(server.address, transport="inband")


def test_a_forged_endless_token_at_the_last_epoch_ends_cleanly(dataset_root, caplog):
    """An endless stream resumed at epoch 2**24 - 1 gives that epoch, then ends: no traceback."""
    with running_server({"shapes": DatasetConfig(str(dataset_root))}) as server:
        with Client(server.address) as client:
            with client.stream("shapes", spec=SPEC, batch_size=BATCH, seed=5, epochs=0) as stream:
                token = ResumeToken.decode(next(iter(stream)).resume_token)
            forged = ResumeToken(token.stream_hash, MAX_EPOCH, 0).encode()
            caplog.set_level(logging.INFO)
            with client.stream("shapes", spec=SPEC, batch_size=BATCH, seed=5, epochs=0, resume_token=forged) as stream:
                epochs = {batch.epoch for batch in stream}
                reason = stream.end_reason
        assert epochs == {MAX_EPOCH} and reason
        assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
        assert control_run(server.address)


def test_refused_opens_are_logged(dataset_root, caplog):
    caplog.set_level(logging.INFO, logger="augserve.rpc.servicer")
    with running_server({"shapes": DatasetConfig(str(dataset_root))}) as server:
        with Client(server.address) as client, pytest.raises(AugserveClientError):
            client.stream("no-such-dataset", spec=SPEC, batch_size=BATCH)
    assert any("refused a stream from 127.0.0.1: NOT_FOUND" in record.getMessage() for record in caplog.records)
