"""One preprocessor, many experiments: shared groups, lockstep and detach, isolation from dead
and stalled members, fairness between different streams, and the memory budget."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest

from augserve.client import AugserveClientError, Client
from augserve.data.demo import DemoConfig, ensure_demo_dataset
from augserve.rpc.server import DatasetConfig
from augserve.core.spec import AugmentSpec
from servers import running_server, start_streaming_client, wait_until

SPEC = AugmentSpec.from_dict({"ops": [{"rotate": {"degrees": 20}}, {"flip": {}}, {"random_resized_crop": {"size": 24}}]})


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> Path:
    return ensure_demo_dataset(DemoConfig(images_per_class=16, image_size=40), root=tmp_path_factory.mktemp("data"))


def consume(
    address: str, results: dict, name: str, delay: float = 0.0, hold: threading.Event | None = None, **options
) -> None:
    """Stream to the end, keeping (epoch, position, bytes) of every batch and arrival times.
    `delay` (seconds) makes a slow reader; with `hold` it stops after its first batch, without
    acknowledging it, until `hold` is set (60 s at most)."""
    received, times = [], []
    try:
        with Client(address) as client, client.stream("shapes", spec=SPEC, batch_size=8, **options) as stream:
            for batch in stream:
                received.append((batch.epoch, batch.position, batch.images.tobytes(), batch.labels.tobytes()))
                times.append(time.monotonic())
                if hold is not None and len(received) == 1:
                    hold.wait(60)
                time.sleep(delay)
            results[name] = {"batches": received, "times": times, "shared": stream.facts.shared}
    except BaseException as error:
        results[name] = {"error": error}


def run_members(address: str, members: dict[str, dict]) -> dict:
    results: dict = {}
    threads = [threading.Thread(target=consume, args=(address, results, name), kwargs=options) for name, options in members.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for name, result in results.items():
        assert "error" not in result, (name, result.get("error"))
    return results


def solo_run(address: str, **options) -> list:
    results: dict = {}
    consume(address, results, "solo", group_policy="alone", **options)
    return results["solo"]["batches"]


def test_three_members_get_identical_batches_produced_once(dataset_root):
    with running_server({"shapes": DatasetConfig(str(dataset_root))}) as server:
        results = run_members(server.address, {name: {"epochs": 2, "group_size": 3, "seed": 4} for name in "abc"})
        info = Client(server.address).server_info()
        expected = solo_run(server.address, epochs=2, seed=4)
    batches = [results[name]["batches"] for name in "abc"]
    assert len(batches[0]) == 20  # 80 images, batches of 8, 2 epochs
    assert batches[0] == batches[1] == batches[2] == expected
    assert all(results[name]["shared"] for name in "abc")
    # Each batch was made once for the group (the solo run made its own 20).
    assert info.batches_produced == 20 and info.batches_delivered == 60


def test_a_slow_member_is_waited_for_in_lockstep(dataset_root):
    window = 2
    with running_server({"shapes": DatasetConfig(str(dataset_root))}, group_window=window) as server:
        members = {
            "fast": {"epochs": 2, "group_size": 2, "group_policy": "lockstep", "prefetch": 2},
            "slow": {"epochs": 2, "group_size": 2, "group_policy": "lockstep", "prefetch": 2, "delay": 0.1},
        }
        results = run_members(server.address, members)
        detached = server.manager.counters.detached
        produced = server.manager.counters.batches_produced
        expected = solo_run(server.address, epochs=2)
    assert results["fast"]["batches"] == results["slow"]["batches"] == expected
    # At each of its batches (the last one too) the fast member was no more than prefetch +
    # window batches (and one in each client's hands) ahead of the slow one.
    for index, arrival in enumerate(results["fast"]["times"]):
        slow_count = sum(1 for t in results["slow"]["times"] if t <= arrival)
        assert index + 1 - slow_count <= 2 + window + 2, (index, slow_count)
    assert detached == 0 and produced == 20


def test_a_member_that_stops_reading_is_detached_and_the_other_finishes(dataset_root):
    """The slow member reads one batch and then nothing until the fast one has finished: only
    detaching it lets the fast one finish at all; it then catches up with the same batches.
    stall_seconds is far beyond the wait for the fast one, so falling behind by group_window
    batches is what detaches it, not stalling."""
    with running_server({"shapes": DatasetConfig(str(dataset_root))}, group_window=2, stall_seconds=300) as server:
        results: dict = {}
        hold = threading.Event()
        options = {"epochs": 2, "group_size": 2, "group_policy": "detach", "prefetch": 2}
        fast = threading.Thread(target=consume, args=(server.address, results, "fast"), kwargs=options)
        slow = threading.Thread(target=consume, args=(server.address, results, "slow"), kwargs={**options, "hold": hold})
        slow.start()
        fast.start()
        fast.join(30)
        finished_while_held = not fast.is_alive()
        hold.set()
        fast.join(60)
        slow.join(60)
        detached = server.manager.counters.detached
        produced = server.manager.counters.batches_produced
        expected = solo_run(server.address, epochs=2)
    for name in ("fast", "slow"):
        assert "error" not in results[name], (name, results[name].get("error"))
    assert finished_while_held, "the fast member waited for the one that stopped reading"
    assert results["fast"]["batches"] == results["slow"]["batches"] == expected
    slow_before_fast_finished = sum(1 for t in results["slow"]["times"] if t <= results["fast"]["times"][-1])
    assert slow_before_fast_finished == 1
    assert detached == 1 and produced > 20  # the detached member's rest was made again for it


@pytest.mark.parametrize("transport", ["shared_memory", "inband"])
def test_a_member_killed_mid_epoch_does_not_stop_its_group(dataset_root, transport):
    with running_server({"shapes": DatasetConfig(str(dataset_root))}, stall_seconds=60) as server:
        results: dict = {}
        threads = [
            threading.Thread(target=consume, args=(server.address, results, name),
                             kwargs={"epochs": 2, "group_size": 3, "delay": 0.02, "transport": transport})
            for name in ("a", "b")
        ]
        child = start_streaming_client(server.address, "shapes", SPEC, batch_size=8, epochs=2, group_size=3, transport=transport)
        with child:
            for thread in threads:
                thread.start()
            assert child.stdout.readline().strip() == "streaming"
            child.kill()
        for thread in threads:
            thread.join(60)
        assert results["a"]["batches"] == results["b"]["batches"] and len(results["a"]["batches"]) == 20
        assert results["a"]["shared"]
        assert wait_until(lambda: not server.manager.sessions and not server.manager.producers)
        assert server.manager.counters.batches_produced == 20


def test_a_stalled_member_is_detached_after_stall_seconds(dataset_root):
    with running_server({"shapes": DatasetConfig(str(dataset_root))}, stall_seconds=1.0, group_window=2) as server:
        client = Client(server.address)
        stalled = client.stream("shapes", spec=SPEC, batch_size=8, epochs=0, prefetch=1)
        held = iter(stalled)
        next(held)  # then never asks for more (keeping the iterator, so nothing is acknowledged)
        started = time.monotonic()
        with Client(server.address) as other, other.stream("shapes", spec=SPEC, batch_size=8, epochs=0, prefetch=1) as stream:
            assert stream.facts.shared  # joined the stalled member's group at the start
            count = 0
            for _ in stream:
                count += 1
                if count == 30:
                    break
        assert time.monotonic() - started < 20
        assert server.manager.counters.detached >= 1
        stalled.close()
        client.close()


def test_two_different_streams_both_progress(dataset_root):
    """Fair turns at the backend: neither of two busy streams starves the other."""
    with running_server({"shapes": DatasetConfig(str(dataset_root))}) as server:
        images = {"one": 0, "two": 0}
        batches = {"one": 0, "two": 0}
        stop = threading.Event()

        def pull(name: str, seed: int, batch_size: int) -> None:
            with Client(server.address) as client, client.stream("shapes", spec=SPEC, batch_size=batch_size, epochs=0, seed=seed) as stream:
                for batch in stream:
                    images[name] += len(batch.sample_ids)
                    batches[name] += 1
                    if stop.is_set():
                        return

        threads = [threading.Thread(target=pull, args=("one", 1, 32)), threading.Thread(target=pull, args=("two", 2, 8))]
        for thread in threads:
            thread.start()
        # However fast the machine: compare the shares once 60 batches have gone out in all.
        reached = wait_until(lambda: sum(batches.values()) >= 60, timeout=120)
        stop.set()
        for thread in threads:
            thread.join(30)
    assert reached, batches
    assert batches["one"] >= 10 and batches["two"] >= 10, batches  # neither starved
    # Turns are per batch: the stream with small batches gets at least a fair share of turns.
    assert images["two"] * 4 >= images["one"] * 0.5, images


def test_memory_budget_rejects_a_new_stream_with_resource_exhausted(dataset_root):
    slot_bytes = 8 * 24 * 24 * 3
    budget = slot_bytes * (4 + 8) + 1000  # one stream at default prefetch and window
    with running_server({"shapes": DatasetConfig(str(dataset_root))}, max_buffer_bytes=budget) as server, Client(server.address) as client:
        with client.stream("shapes", spec=SPEC, batch_size=8, epochs=0, seed=1) as first:
            next(iter(first))
            with pytest.raises(AugserveClientError) as caught:
                client.stream("shapes", spec=SPEC, batch_size=8, epochs=0, seed=2)
            assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_buffer_bytes" in caught.value.message
            # The same stream joins the existing group and needs no new buffers.
            with client.stream("shapes", spec=SPEC, batch_size=8, epochs=0, seed=1) as joined:
                next(iter(joined))
