"""Faults and a bounded soak against a server in its own process, measured from outside through
/proc: resident memory, open file descriptors, threads and /dev/shm segments.

Faults here complete what tests/test_server_faults.py and tests/test_groups.py already inject
(client SIGKILL with shared memory and in-band, server SIGTERM, server SIGKILL + restart +
byte-identical resume, slow, killed and stalled group members):

- clients that never grant credit, or grant it but never read: the server's memory stays
  bounded by the rings it reports (buffer_bytes) and stops growing while they sit;
- SIGTERM mid-stream, restart, and resume from the token the UNAVAILABLE status carried: the
  continuation is byte-identical to an uninterrupted run;
- SIGKILL of a group member while batches are in flight: the group finishes with the same
  batches, produced once, and nothing is left behind.

The soak runs 8 clients opening and closing sessions for 20 s (AUGSERVE_LONG=1: 180 s, and a
120 s soak on the dali-cpu backend) with a mix of transports, groups and solo streams, full
epochs, partial reads, resumes and abrupt closes (one of them kills client processes), then
checks that the gauges return to their baseline within the tolerances below and that no client
saw an unexpected error.
"""

from __future__ import annotations

import hashlib
import json
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from augserve._proto.augserve.v1 import augserve_pb2 as pb
from augserve._proto.augserve.v1 import augserve_pb2_grpc as pb_grpc
from augserve.client import AugserveClientError, Client, Reconnect
from augserve.data.demo import DemoConfig, ensure_demo_dataset
from augserve.rpc.server import DatasetConfig
from augserve.core.spec import AugmentSpec
from augserve.transport.ring import remove_probe, write_probe
from augserve.rpc.convert import spec_to_proto
from augserve.streaming.manager import INBAND_COPIES
from reliability_helpers import Gauges, GaugeSampler, long_only, read_gauges, record_figures, scaled
from servers import (
    ServerProcess, own_segments, running_server, segments_of, start_streaming_client, wait_until, wait_until_steady,
)
from test_groups import SPEC as GROUP_SPEC
from test_groups import consume, solo_run
from test_server_faults import SPEC as RESUME_SPEC

# ---- tolerances (see docs/reliability.md) ----
# After a soak and a settle period the server must be back to its baseline (taken after a
# warm-up that grew its thread pools) within these:
RSS_TOLERANCE_BYTES = 24 << 20  # allocator caches and arenas keep some freed memory
FD_TOLERANCE = 2  # a listening or wake-up descriptor gRPC may open lazily
THREAD_TOLERANCE = 4  # gRPC's handler pool keeps idle workers (it never shrinks)
SHM_TOLERANCE = 0  # every segment of a closed stream is unlinked: exactly the baseline
SETTLE_SECONDS = 15.0
SOAK_SECONDS = scaled(20.0, 180.0)
SOAK_CLIENTS = 8


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    return ensure_demo_dataset(DemoConfig(images_per_class=8, image_size=40), root=tmp_path_factory.mktemp("shapes"))


def server_with_limits(tmp_path: Path, datasets: dict[str, str], extra: list[str] | None = None, **limits: object) -> ServerProcess:
    """`augserve serve` in its own process with limits from a config file (and `extra`
    arguments, which override ServerProcess's: `--backend dali-cpu`)."""
    config = tmp_path / f"server-{time.monotonic_ns()}.yaml"
    config.write_text(yaml.safe_dump({"limits": limits}))
    return ServerProcess(tmp_path, datasets, extra=["--config", str(config), *(extra or [])])


# ---- clients that never grant credit ----

BIG_SPEC = AugmentSpec.from_dict({"ops": [{"flip": {}}, {"resize": {"size": 96}}]})
BIG_BATCH = 16
SLOT_BYTES = BIG_BATCH * 96 * 96 * 3


class StuckClient:
    """A raw stream that opens a session and then never grants credit (`mode` "no_credit":
    it reads what the server sends unasked; "no_read": it never reads past SessionInfo) or
    grants credit forever but never reads ("credit_no_read")."""

    def __init__(self, channel: grpc.Channel, mode: str, seed: int, transport: int, probe: tuple[str, bytes] | None) -> None:
        self.mode = mode
        self.batches = 0
        self._outgoing: queue.Queue = queue.Queue()
        message = pb.OpenSession(dataset="big", batch_size=BIG_BATCH, seed=seed, epochs=0, prefetch=4, transport=transport)
        message.spec.CopyFrom(spec_to_proto(BIG_SPEC))
        if probe is not None:
            message.shm_probe_name, message.shm_probe_nonce = probe
        self._outgoing.put(pb.ClientMessage(open=message))
        self.call = pb_grpc.AugmentStub(channel).Stream(iter(self._outgoing.get, None), timeout=300)
        self.info = next(self.call).info
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self.mode == "no_credit":
            try:
                for message in self.call:
                    self.batches += message.WhichOneof("kind") == "batch"
            except grpc.RpcError:
                pass
        elif self.mode == "credit_no_read":
            while not self._stop.wait(0.05):
                self._outgoing.put(pb.ClientMessage(credit=pb.Credit(batches=4)))

    def close(self) -> None:
        self._stop.set()
        self._outgoing.put(None)
        self.call.cancel()
        self._thread.join(10)


def production_stopped(client: Client) -> bool:
    """Wait until the server makes no more batches (nothing announces that it stopped): its
    count of batches made unchanged for 2 s, well over the pauses between a producer's turns,
    so such a pause is not mistaken for the end. False if it still runs after 30 s."""
    return wait_until_steady(lambda: client.server_info().batches_produced, quiet=2.0, timeout=30) is not None


def test_clients_that_never_grant_credit_keep_server_memory_bounded(tmp_path):
    root = ensure_demo_dataset(DemoConfig(images_per_class=8, image_size=96), root=tmp_path / "big")
    server = server_with_limits(tmp_path, {"big": str(root)}, group_window=8, max_prefetch=8)
    probe = write_probe()
    stuck: list[StuckClient] = []
    try:
        with Client(server.address) as client, grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", -1)]) as channel:
            with client.stream("big", spec=BIG_SPEC, batch_size=BIG_BATCH, epochs=1) as warm_up:
                for _ in warm_up:
                    pass
            assert wait_until(lambda: client.server_info().live_sessions == 0)
            warm_up_info = client.server_info()
            baseline = read_gauges(server.process.pid)
            sampler = GaugeSampler(server.process.pid, interval=0.1)
            modes = [("no_credit", pb.TRANSPORT_INBAND), ("no_credit", pb.TRANSPORT_SHARED_MEMORY),
                     ("no_read", pb.TRANSPORT_INBAND), ("credit_no_read", pb.TRANSPORT_INBAND)]
            for seed, (mode, transport) in enumerate(modes):
                stuck.append(StuckClient(channel, mode, seed, transport, probe if transport == pb.TRANSPORT_SHARED_MEMORY else None))
            slot_count = stuck[0].info.slot_count
            ring_bytes = slot_count * SLOT_BYTES
            assert production_stopped(client)  # credit and rings used up
            early = read_gauges(server.process.pid)
            produced_early = client.server_info().batches_produced
            sit_seconds = scaled(3.0, 30.0)
            time.sleep(sit_seconds)
            info = client.server_info()
            late = read_gauges(server.process.pid)
            peak = sampler.stop()
            # What the server holds is its rings and, per in-band session, the copies of its
            # messages in flight, exactly as reported.
            inband = sum(1 for _, transport in modes if transport == pb.TRANSPORT_INBAND)
            assert info.live_sessions == len(stuck) and info.producers == len(stuck)
            assert info.buffer_bytes == len(stuck) * ring_bytes + inband * INBAND_COPIES * SLOT_BYTES
            # Credit bounds what was sent, the ring what was made; nothing moves while they sit.
            assert [c.batches for c in stuck if c.mode == "no_credit"] == [4, 4]
            assert info.batches_produced == produced_early
            produced = info.batches_produced - warm_up_info.batches_produced
            delivered = info.batches_delivered - warm_up_info.batches_delivered
            assert produced <= delivered + len(stuck) * slot_count  # a ring ahead of what was sent, at most
            # Memory: the rings plus the in-band messages in flight, plus slack; flat while sitting.
            in_flight = 3 * (4 + 8) * SLOT_BYTES  # in-band: prefetch + credit per stream
            bound = baseline.rss_bytes + len(stuck) * ring_bytes + in_flight + (32 << 20)
            assert peak.rss_bytes <= bound, (peak, baseline, bound)
            assert late.rss_bytes - early.rss_bytes <= 4 << 20, (early, late)
            for stream in stuck:
                stream.close()
            stuck.clear()
            assert wait_until(lambda: client.server_info().live_sessions == 0 and client.server_info().buffer_bytes == 0)
            assert not segments_of(server.process.pid)
        record_figures(
            "never_credit",
            clients=len(modes), modes=[mode for mode, _ in modes], sit_seconds=sit_seconds,
            ring_bytes_per_stream=ring_bytes, buffer_bytes=info.buffer_bytes, batches_produced=produced, batches_sent=delivered,
            rss_baseline_mib=round(baseline.rss_bytes / 2**20, 1), rss_peak_mib=round(peak.rss_bytes / 2**20, 1),
            rss_bound_mib=round(bound / 2**20, 1), rss_growth_while_sitting_mib=round((late.rss_bytes - early.rss_bytes) / 2**20, 2),
        )
    finally:
        for stream in stuck:
            stream.close()
        remove_probe(probe[0])
        server.stop()


# ---- SIGTERM mid-stream, restart, resume ----

RESUME_EPOCHS = 4  # 40 images in batches of 5: 32 batches, more than a server buffers ahead


def read_stream(address: str, transport: str, epochs: int, resume_token: bytes = b"") -> list[bytes]:
    """Every batch's images (bytes) of the resume-test stream, from `resume_token` on."""
    with Client(address) as client, client.stream(
        "shapes", spec=RESUME_SPEC, batch_size=5, epochs=epochs, seed=21, resume_token=resume_token, transport=transport
    ) as stream:
        return [batch.images.tobytes() for batch in stream]


def not_serving(address: str) -> bool:
    """Whether the server's health check says NOT_SERVING (it is shutting down)."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        except grpc.RpcError:
            return True  # already gone
    return reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize("transport", ["inband", "shared_memory"])
def test_sigterm_mid_stream_then_restart_resumes_byte_identically(tmp_path, shapes_root, transport):
    """An endless stream (tests/test_server_faults.py's SPEC and seed) cut by SIGTERM after 3
    batches ends with UNAVAILABLE and the token to resume from (the stream identity leaves out
    the epoch count, so the head may be endless); a restarted server continues it, and head
    plus continuation equal an uninterrupted run byte for byte."""
    first = ServerProcess(tmp_path, {"shapes": str(shapes_root)})
    head: list[bytes] = []
    try:
        with Client(first.address, reconnect=Reconnect(attempts=0)) as client, client.stream(
            "shapes", spec=RESUME_SPEC, batch_size=5, epochs=0, seed=21, transport=transport
        ) as stream, pytest.raises(AugserveClientError) as caught:
            for batch in stream:
                head.append(batch.images.tobytes())
                if len(head) == 3:
                    first.signal(signal.SIGTERM)
                    # Read on once the server is shutting down, however late the signal lands.
                    assert wait_until(lambda: not_serving(first.address), timeout=30)
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert caught.value.resume_token == stream.last_resume_token  # the last batch received
        assert first.wait(30) == 0
        assert not segments_of(first.process.pid)
    finally:
        first.stop()
    second = ServerProcess(tmp_path, {"shapes": str(shapes_root)})
    try:
        tail = read_stream(second.address, "shared_memory", RESUME_EPOCHS, caught.value.resume_token)
        whole = read_stream(second.address, transport, RESUME_EPOCHS)
    finally:
        second.stop()
    assert 3 <= len(head) < len(whole) == 8 * RESUME_EPOCHS
    assert head + tail == whole
    record_figures(f"sigterm_resume_{transport}", batches_before_unavailable=len(head), batches_after_restart=len(tail))


# ---- SIGKILL of a group member while batches are in flight ----

STALL_SECONDS = 60.0  # a member that reads nothing this long is detached
# Closed "at once" means well before stall_seconds, the other way a dead member's session ends.
CLOSE_BOUND_SECONDS = STALL_SECONDS / 4

BUSY_CLIENT = """
import json, sys
from augserve.client import Client
from augserve.core.spec import AugmentSpec
options = json.loads(sys.argv[2])
spec = AugmentSpec.from_json(options.pop("spec"))
for index, batch in enumerate(Client(sys.argv[1]).stream(options.pop("dataset"), spec=spec, **options)):
    if index == 0:
        print("streaming", flush=True)
"""


def start_busy_client(address: str, dataset: str, spec: AugmentSpec, **options: object) -> subprocess.Popen:
    """Like servers.start_streaming_client, but it keeps reading as fast as it can, so a kill
    lands while batches are on their way to it."""
    arguments = json.dumps({"dataset": dataset, "spec": spec.to_json(), **options})
    return subprocess.Popen([sys.executable, "-c", BUSY_CLIENT, address, arguments], stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("transport", ["shared_memory", "inband"])
def test_a_group_member_killed_with_batches_in_flight_does_not_disturb_its_group(tmp_path, transport):
    root = ensure_demo_dataset(DemoConfig(images_per_class=16, image_size=40), root=tmp_path / "data")
    with running_server({"shapes": DatasetConfig(str(root))}, stall_seconds=STALL_SECONDS) as server:
        results: dict = {}
        members = [
            threading.Thread(target=consume, args=(server.address, results, name),
                             kwargs={"epochs": 2, "group_size": 3, "delay": 0.03, "transport": transport})
            for name in ("a", "b")
        ]
        child = start_busy_client(server.address, "shapes", GROUP_SPEC, batch_size=8, epochs=2, group_size=3,
                                  transport=transport, prefetch=8)
        with child:
            for thread in members:
                thread.start()
            assert child.stdout.readline().strip() == "streaming"
            time.sleep(random.Random(transport).uniform(0.0, 0.05))
            in_flight = server.manager.counters.batches_delivered
            child.kill()
            killed_at = time.monotonic()
            child.wait(10)
        # The killed member's session goes at once (not after stall_seconds).
        assert wait_until(lambda: len(server.manager.sessions) <= 2, timeout=CLOSE_BOUND_SECONDS)
        closed_after = time.monotonic() - killed_at
        for thread in members:
            thread.join(60)
        assert "error" not in results["a"] and "error" not in results["b"], results
        assert results["a"]["batches"] == results["b"]["batches"] and len(results["a"]["batches"]) == 20
        assert results["a"]["shared"]
        assert wait_until(lambda: not server.manager.sessions and not server.manager.producers)
        assert server.manager.counters.batches_produced == 20  # once, for the whole group
        expected = solo_run(server.address, epochs=2)
    assert results["a"]["batches"] == expected
    assert not own_segments()
    record_figures(f"group_member_sigkill_{transport}", batches_delivered_to_the_group_when_killed=in_flight,
                   session_closed_after_seconds=round(closed_after, 2))


# ---- the soak ----

SOAK_SPEC = AugmentSpec.from_dict({"ops": [{"rotate": {"degrees": 10}}, {"flip": {}}, {"random_resized_crop": {"size": 24}}]})
SOAK_LIMITS = {"group_wait_seconds": 2.0, "stall_seconds": 5.0}


class Ledger:
    """What every soak client saw, checked across clients: the batch at (stream, epoch,
    position) must be the same bytes every time anyone receives it."""

    def __init__(self) -> None:
        self._digests: dict[tuple, str] = {}
        self._lock = threading.Lock()
        self.sessions = 0
        self.batches = 0
        self.mismatches: list[tuple] = []
        self.scenarios: Counter = Counter()
        self.faults: Counter = Counter()
        self.unexpected: list[str] = []

    def count(self, counter: str, name: str) -> None:
        with self._lock:
            getattr(self, counter)[name] += 1

    def opened(self) -> None:
        with self._lock:
            self.sessions += 1

    def record(self, stream_key: tuple, batch) -> None:
        digest = hashlib.sha1(batch.images.tobytes() + batch.sample_ids.tobytes() + batch.labels.tobytes()).hexdigest()
        key = (*stream_key, batch.epoch, batch.position)
        with self._lock:
            self.batches += 1
            if self._digests.setdefault(key, digest) != digest:
                self.mismatches.append(key)


def read_checked(stream, ledger: Ledger, stream_key: tuple, limit: int | None = None, delay: float = 0.0) -> list:
    """Read up to `limit` batches (all, when None), recording each; positions must follow on."""
    received = []
    batch_size = stream_key[1]
    for batch in stream:
        ledger.record(stream_key, batch)
        if received:
            previous = received[-1]
            expected = (previous[0], previous[1] + batch_size) if previous[1] + batch_size < stream.facts.samples_per_epoch else (previous[0] + 1, 0)
            assert (batch.epoch, batch.position) == expected, ((batch.epoch, batch.position), expected)
        received.append((batch.epoch, batch.position, batch.sample_ids.copy()))
        if limit is not None and len(received) >= limit:
            break
        time.sleep(delay)
    return received


def soak_stream(client: Client, ledger: Ledger, seed: int, batch_size: int, **options):
    ledger.opened()
    return client.stream("shapes", spec=SOAK_SPEC, batch_size=batch_size, seed=seed, **options), (seed, batch_size)


def full_epoch(client: Client, ledger: Ledger, rng: random.Random) -> None:
    stream, key = soak_stream(client, ledger, rng.choice([1, 2]), rng.choice([4, 6]), epochs=1,
                              transport=rng.choice(["inband", "shared_memory"]))
    with stream:
        received = read_checked(stream, ledger, key)
        ids = np.concatenate([entry[2] for entry in received])
        assert len(ids) == len(set(ids.tolist())) == stream.facts.samples_per_epoch


def partial_read(client: Client, ledger: Ledger, rng: random.Random) -> None:
    stream, key = soak_stream(client, ledger, rng.choice([1, 2, 3]), 4, epochs=0, transport=rng.choice(["inband", "shared_memory"]))
    with stream:
        read_checked(stream, ledger, key, limit=rng.randint(1, 12))


def group_member(client: Client, ledger: Ledger, rng: random.Random) -> None:
    stream, key = soak_stream(client, ledger, 100, 5, epochs=1, group_size=2, group_policy=rng.choice(["lockstep", "detach"]),
                              transport=rng.choice(["inband", "shared_memory"]))
    with stream:
        read_checked(stream, ledger, key, limit=rng.choice([None, 3]), delay=rng.choice([0.0, 0.02]))


def resume_after_close(client: Client, ledger: Ledger, rng: random.Random) -> None:
    seed, batch_size = rng.choice([1, 2]), 6
    stream, key = soak_stream(client, ledger, seed, batch_size, epochs=2, transport=rng.choice(["inband", "shared_memory"]))
    with stream:
        head = read_checked(stream, ledger, key, limit=rng.randint(1, 8))
        token = stream.last_resume_token
    stream, key = soak_stream(client, ledger, seed, batch_size, epochs=2, resume_token=token, transport=rng.choice(["inband", "shared_memory"]))
    with stream:
        tail = read_checked(stream, ledger, key)
    assert len(head) + len(tail) == 2 * stream.facts.batches_per_epoch


def abrupt_close(client: Client, ledger: Ledger, rng: random.Random) -> None:
    """Close with batches in flight, before reading any or after one."""
    ledger.count("faults", "abrupt close")
    stream, key = soak_stream(client, ledger, rng.choice([1, 2, 3]), 4, epochs=0, transport=rng.choice(["inband", "shared_memory"]), prefetch=8)
    if rng.random() < 0.5:
        read_checked(stream, ledger, key, limit=1)
    stream.close()


def dropped_connection(client: Client, ledger: Ledger, rng: random.Random) -> None:
    """Close the channel under an open stream (the stream object is closed only after)."""
    ledger.count("faults", "dropped connection")
    other = Client(client.endpoint)
    stream, key = soak_stream(other, ledger, rng.choice([1, 2, 3]), 4, epochs=0, transport=rng.choice(["inband", "shared_memory"]))
    read_checked(stream, ledger, key, limit=1)
    other.close()
    stream.close()


def killed_process(client: Client, ledger: Ledger, rng: random.Random) -> None:
    """A client process SIGKILLed mid-stream (two batches read, more in flight)."""
    ledger.count("faults", "client process SIGKILL")
    ledger.opened()
    child = start_streaming_client(client.endpoint, "shapes", SOAK_SPEC, batch_size=4, epochs=0, seed=rng.choice([1, 2, 3]),
                                   transport=rng.choice(["inband", "shared_memory"]))
    with child:
        assert child.stdout.readline().strip() == "streaming"
        child.kill()
        child.wait(10)


SCENARIOS = [full_epoch, partial_read, partial_read, group_member, group_member, resume_after_close, abrupt_close, dropped_connection]


def soak_client(index: int, address: str, ledger: Ledger, deadline: float) -> None:
    rng = random.Random(index)
    with Client(address, timeout=120) as client:
        iteration = 0
        while time.monotonic() < deadline:
            scenario = killed_process if index == 0 and iteration % 3 == 2 else rng.choice(SCENARIOS)
            iteration += 1
            try:
                scenario(client, ledger, rng)
                ledger.count("scenarios", scenario.__name__)
            except Exception as error:  # every error is unexpected here
                ledger.unexpected.append(f"client {index} {scenario.__name__}: {error!r}")


def run_clients(address: str, ledger: Ledger, seconds: float, clients: int) -> None:
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=soak_client, args=(index, address, ledger, deadline), name=f"soak-{index}")
               for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 120)
        assert not thread.is_alive(), f"{thread.name} is stuck"


def settled(client: Client) -> bool:
    info = client.server_info()
    return info.live_sessions == 0 and info.producers == 0 and info.buffer_bytes == 0


def countable_gauges(pid: int) -> tuple[int, int, int]:
    """Open descriptors, threads and segments of `pid`: the gauges that stop changing when a
    server is idle (resident memory wanders by a page or so)."""
    gauges = read_gauges(pid)
    return gauges.open_fds, gauges.threads, gauges.shm_segments


def within_tolerances(before: Gauges, after: Gauges) -> bool:
    """Whether `after` is back to the baseline `before` within the tolerances above."""
    return (
        after.shm_segments - before.shm_segments <= SHM_TOLERANCE
        and after.open_fds - before.open_fds <= FD_TOLERANCE
        and after.threads - before.threads <= THREAD_TOLERANCE
        and after.rss_bytes - before.rss_bytes <= RSS_TOLERANCE_BYTES
    )


def soak(tmp_path: Path, shapes_root: Path, backend: str, seconds: float) -> None:
    """The soak against a server process on `backend`; asserts the tolerances and records the
    figures under `soak_<backend>`."""
    server = server_with_limits(tmp_path, {"shapes": str(shapes_root)}, extra=["--backend", backend], **SOAK_LIMITS)
    try:
        with Client(server.address) as client:
            # Warm-up: every scenario once, more clients at once than the soak has, so that
            # pools and caches reach their working size before the baseline.
            run_clients(server.address, Ledger(), 2.0, SOAK_CLIENTS + 4)
            assert wait_until(lambda: settled(client), timeout=SETTLE_SECONDS)
            # The baseline once the warm-up's threads and descriptors are gone: no longer changing.
            steady = wait_until_steady(lambda: countable_gauges(server.process.pid), quiet=1.0, timeout=SETTLE_SECONDS)
            assert steady is not None, countable_gauges(server.process.pid)
            before = read_gauges(server.process.pid)
            ledger = Ledger()
            sampler = GaugeSampler(server.process.pid)
            started = time.monotonic()
            run_clients(server.address, ledger, seconds, SOAK_CLIENTS)
            soak_seconds = time.monotonic() - started
            peak = sampler.stop()
            settle_started = time.monotonic()
            assert wait_until(lambda: settled(client), timeout=SETTLE_SECONDS), client.server_info()
            # Sessions end before their threads and descriptors do: wait for the gauges (the
            # asserts below name what did not come back).
            wait_until(lambda: within_tolerances(before, read_gauges(server.process.pid)), timeout=SETTLE_SECONDS, interval=0.2)
            settle_seconds = time.monotonic() - settle_started
            after = read_gauges(server.process.pid)
            info = client.server_info()
        record_figures(
            f"soak_{backend}",
            clients=SOAK_CLIENTS, seconds=round(soak_seconds, 1), sessions_opened=ledger.sessions, batches_received=ledger.batches,
            scenarios=dict(ledger.scenarios), faults_injected=dict(ledger.faults), unexpected_errors=len(ledger.unexpected),
            expected_errors=0, cross_client_mismatches=len(ledger.mismatches), settle_seconds=round(settle_seconds, 1),
            server_batches_produced=info.batches_produced, server_batches_delivered=info.batches_delivered,
            before=before.as_figures(), peak=peak.as_figures(), after=after.as_figures(),
            tolerances={"rss_bytes": RSS_TOLERANCE_BYTES, "open_fds": FD_TOLERANCE, "threads": THREAD_TOLERANCE, "shm_segments": SHM_TOLERANCE},
        )
        assert not ledger.unexpected, ledger.unexpected[:10]
        assert not ledger.mismatches, ledger.mismatches[:10]
        assert ledger.sessions >= 50 and ledger.faults["client process SIGKILL"] >= 2
        assert after.shm_segments - before.shm_segments <= SHM_TOLERANCE
        assert after.open_fds - before.open_fds <= FD_TOLERANCE, (before, after)
        assert after.threads - before.threads <= THREAD_TOLERANCE, (before, after)
        assert after.rss_bytes - before.rss_bytes <= RSS_TOLERANCE_BYTES, (before, after)
    finally:
        server.stop()


def test_soak_clients_opening_and_closing_sessions_leave_the_server_as_they_found_it(tmp_path, shapes_root):
    soak(tmp_path, shapes_root, "opencv", SOAK_SECONDS)


@long_only
def test_soak_on_the_dali_cpu_backend(tmp_path, shapes_root):
    soak(tmp_path, shapes_root, "dali-cpu", 120.0)
