"""Sweeps that stay shared: members that pause to validate keep their group (and read one shared
validation stream), a member detached by a real slowdown rejoins once it catches up, streams
with different specs on one dataset order decode each image once, and the decoded-image cache
spares later epochs, all without changing a byte of what any session receives."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from servers import running_server, wait_until

from augserve.client import Client
from augserve.core.spec import AugmentSpec
from augserve.data.demo import DemoConfig, ensure_demo_dataset
from augserve.rpc.metrics import ManagerCollector
from augserve.rpc.server import DatasetConfig

SPEC = AugmentSpec.from_dict({"ops": [{"rotate": {"degrees": 20}}, {"flip": {}}, {"random_resized_crop": {"size": 24}}]})
# Four experiments on one dataset that differ only in augmentation.
SPECS = (
    SPEC,
    AugmentSpec.from_dict({"ops": [{"flip": {"horizontal": 0.5}}, {"brightness": {"factor": 0.3}}]}),
    AugmentSpec.from_dict({"ops": [{"random_resized_crop": {"size": 32}}, {"contrast": {"factor": 0.3}}]}),
    AugmentSpec.from_dict({"ops": [{"shift": {"x": 0.1, "y": 0.1}}, {"hue": {"degrees": 20}}, {"crop": {"size": 24}}]}),
)
BATCH = 8
SEED = 3


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> Path:
    return ensure_demo_dataset(DemoConfig(images_per_class=16, image_size=40), root=tmp_path_factory.mktemp("data"))


def run_threads(targets: dict[str, tuple]) -> dict:
    """Run `function(results, name, *arguments)` per name in threads; every result, or the error."""
    results: dict = {}

    def guarded(name: str, function, *arguments) -> None:
        try:
            function(results, name, *arguments)
        except BaseException as error:  # the test reports it
            results[name] = {"error": error}

    threads = [threading.Thread(target=guarded, args=(name, *target)) for name, target in targets.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for name, result in results.items():
        assert not isinstance(result, dict) or "error" not in result, (name, result["error"])
    assert len(results) == len(targets), sorted(results)
    return results


def read_all(address: str, spec: AugmentSpec = SPEC, **options) -> list[tuple[int, int, bytes]]:
    options.setdefault("seed", SEED)
    with Client(address) as client, client.stream("shapes", spec=spec, batch_size=BATCH, **options) as stream:
        return [(batch.epoch, batch.position, batch.images.tobytes()) for batch in stream]


# --- pauses ---------------------------------------------------------------------------------


def trainer_like(results: dict, name: str, address: str, epochs: int, validation_seconds: float) -> None:
    """What a trainer does: read an epoch of its training stream, then, paused, read the shared
    validation stream and go on validating for `validation_seconds`, then resume."""
    received, validations, shared = [], [], []
    with Client(address) as client, client.stream(
        "shapes", spec=SPEC, batch_size=BATCH, seed=SEED, epochs=epochs, group_size=4, prefetch=2
    ) as stream:
        batches = iter(stream)
        for epoch in range(epochs):
            for _ in range(stream.facts.batches_per_epoch):
                batch = next(batches)
                received.append((batch.epoch, batch.position, batch.images.tobytes()))
            with stream.paused():
                with client.stream(
                    "shapes", split="validation", eval_size=(24, 24), batch_size=BATCH, epochs=1, group_size=4
                ) as validation:
                    shared.append(validation.facts.shared)
                    validations.append([batch.images.tobytes() for batch in validation])
                started = time.monotonic()
                while time.monotonic() - started < validation_seconds:  # the model's forward passes
                    time.sleep(0.05)
        assert next(batches, None) is None
    results[name] = {"training": received, "validation": validations, "shared": shared}


def test_paused_members_keep_their_group_while_they_validate(dataset_root):
    """Four trainers validate each of three epochs for more than three times `stall_seconds`
    while their group's ring is full: announced as pauses, none is detached, every training and
    validation batch is made once for all four (delivered / produced is 4), and each receives
    exactly a solo run's bytes."""
    stall_seconds = 0.3
    datasets = {"shapes": DatasetConfig(str(dataset_root), validation_fraction=0.25)}
    with running_server(datasets, stall_seconds=stall_seconds, group_window=2) as server:
        results = run_threads({name: (trainer_like, server.address, 3, 3 * stall_seconds) for name in "abcd"})
        counters = server.manager.counters.snapshot()
        solo = read_all(server.address, epochs=3, group_policy="alone")
        with Client(server.address) as client, client.stream(
            "shapes", split="validation", eval_size=(24, 24), batch_size=BATCH, epochs=1, group_policy="alone"
        ) as validation:
            solo_validation = [batch.images.tobytes() for batch in validation]
    # Each announced a pause after epochs 0 and 1 (after the last one its session had ended).
    assert counters.detached == 0 and counters.pauses >= 8
    assert counters.batches_delivered == 4 * counters.batches_produced, counters
    assert len(solo) == 3 * 8  # 60 training images, batches of 8
    for name in "abcd":
        assert results[name]["training"] == solo
        assert results[name]["validation"] == [solo_validation] * 3
        assert all(results[name]["shared"])


def member(results: dict, name: str, address: str, delay: float, stop_after: int, stop_seconds: float) -> None:
    """Read a 3-epoch stream taking `delay` s per batch; after `stop_after` batches stop reading
    for `stop_seconds` without a word (a real slowdown), then read as fast as possible."""
    received, times = [], []
    with Client(address) as client, client.stream(
        "shapes", spec=SPEC, batch_size=BATCH, seed=SEED, epochs=3, group_size=2, prefetch=2
    ) as stream:
        for batch in stream:
            received.append((batch.epoch, batch.position, batch.images.tobytes()))
            times.append(time.monotonic())
            if len(received) == stop_after:
                time.sleep(stop_seconds)
                delay = 0.0
            time.sleep(delay)
    results[name] = {"batches": received, "times": times}


def test_a_member_detached_by_a_slowdown_rejoins_once_it_catches_up(dataset_root):
    """One member stops reading (no pause announced) past `stall_seconds` and is detached onto
    a producer of its own; reading fast again it catches up with its group, whose pace is the
    other member's, and rejoins it: from then on both are fed by one producer again. Both get
    exactly a solo run's bytes."""
    with running_server({"shapes": DatasetConfig(str(dataset_root))}, stall_seconds=0.5, group_window=2) as server:
        results = run_threads({
            "steady": (member, server.address, 0.1, 0, 0.0),
            "slowed": (member, server.address, 0.0, 2, 1.5),
        })
        counters = server.manager.counters.snapshot()
        solo = read_all(server.address, epochs=3, group_policy="alone")
    assert counters.detached == 1 and counters.rejoined == 1, counters
    assert results["steady"]["batches"] == results["slowed"]["batches"] == solo
    # 30 batches for the group; the detached producer made only what the group no longer held
    # when the member came back (the steady member got at most 15 batches ahead in the 1.5 s;
    # it stops where the group's window starts) and its ring: after the rejoin, one producer.
    assert counters.batches_produced <= 30 + 15 + 4, counters


# --- decode once, augment many ----------------------------------------------------------------


def spec_member(results: dict, name: str, address: str, spec: AugmentSpec, epochs: int) -> None:
    results[name] = read_all(address, spec, epochs=epochs, decode_group_size=len(SPECS))


@pytest.mark.parametrize("transport", ["shared_memory", "inband"])
def test_four_specs_decode_each_image_once_per_epoch(dataset_root, transport):
    """Four experiments with four specs on one dataset order, the cache off: the server decodes
    each image once per epoch for all four, and each receives exactly a solo run's bytes."""
    epochs = 2
    with running_server({"shapes": DatasetConfig(str(dataset_root))}, decoded_cache_bytes=0) as server:
        results = run_threads({
            str(index): (spec_member, server.address, spec, epochs) for index, spec in enumerate(SPECS)
        })
        counters = server.manager.counters.snapshot()
        solos = [read_all(server.address, spec, epochs=epochs, group_policy="alone", transport=transport) for spec in SPECS]
        solo_counters = server.manager.counters.snapshot()
    images = 80  # 5 classes of 16
    assert counters.images_decoded == images * epochs, counters
    assert counters.decode_shared == (len(SPECS) - 1) * images * epochs
    assert solo_counters.images_decoded - counters.images_decoded == len(SPECS) * images * epochs  # alone: no sharing
    for index, solo in enumerate(solos):
        assert results[str(index)] == solo
        assert len(solo) == epochs * images // BATCH


def test_the_cache_spares_later_epochs_and_later_experiments(dataset_root):
    """With a cache the dataset fits in, epoch 1 decodes every image once for all four specs,
    later epochs and a later experiment decode nothing; outputs equal runs without the cache."""
    epochs = 3
    with running_server({"shapes": DatasetConfig(str(dataset_root))}) as server:
        results = run_threads({
            str(index): (spec_member, server.address, spec, epochs) for index, spec in enumerate(SPECS)
        })
        counters = server.manager.counters.snapshot()
        later = read_all(server.address, SPECS[1], epochs=epochs, seed=SEED + 1)  # another order, same images
        later_counters = server.manager.counters.snapshot()
        metrics = {metric.name: metric for metric in ManagerCollector(server.manager, "cpu").collect()}
    with running_server({"shapes": DatasetConfig(str(dataset_root))}, decoded_cache_bytes=0) as uncached:
        expected = [read_all(uncached.address, spec, epochs=epochs) for spec in SPECS]
        expected_later = read_all(uncached.address, SPECS[1], epochs=epochs, seed=SEED + 1)
    assert counters.images_decoded == 80, counters
    assert later_counters.images_decoded == 80 and later_counters.decode_cached >= counters.decode_cached + 80 * epochs
    assert [results[str(index)] for index in range(len(SPECS))] == expected
    assert later == expected_later
    cache = metrics["augserve_decoded_cache_hit_ratio"].samples[0].value
    assert 0.8 < cache < 1.0
    assert metrics["augserve_decoded_cache_bytes"].samples[0].value == 80 * 40 * 40 * 4  # RGBA decodes


def test_a_file_rewritten_in_place_is_not_served_from_the_cache(tmp_path):
    """The cache is keyed by the bytes: a file rewritten with other pixels, keeping its size and
    modification time, is decoded anew (what a session receives never depends on the cache)."""
    root = ensure_demo_dataset(DemoConfig(images_per_class=2, image_size=40), root=tmp_path / "data")
    victim = min(root.rglob("*.jpg"))
    status = victim.stat()
    spec = AugmentSpec.from_dict({"ops": [{"flip": {}}]})
    with running_server({"shapes": DatasetConfig(str(root))}) as server:
        first = read_all(server.address, spec, epochs=1)
        original = cv2.imread(str(victim))
        replacement = _same_size_jpeg(255 - original, status.st_size)
        victim.write_bytes(replacement)
        os.utime(victim, ns=(status.st_atime_ns, status.st_mtime_ns))
        assert victim.stat().st_size == status.st_size and victim.stat().st_mtime_ns == status.st_mtime_ns
        second = read_all(server.address, spec, epochs=1)
    with running_server({"shapes": DatasetConfig(str(root))}, decoded_cache_bytes=0) as uncached:
        expected = read_all(uncached.address, spec, epochs=1)
    assert second == expected and second != first


def _same_size_jpeg(pixels: np.ndarray, size: int) -> bytes:
    """`pixels` ([H, W, 3] BGR) as a JPEG of exactly `size` bytes: the best quality that fits,
    padded with zero bytes after its end marker (which decoders ignore)."""
    for quality in range(95, 10, -5):
        encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()
        if len(encoded) <= size:
            return encoded + bytes(size - len(encoded))
    raise AssertionError("no quality fits")


# --- a real sweep -----------------------------------------------------------------------------


def test_a_sweep_whose_trainers_validate_longer_than_stall_seconds_stays_shared(tmp_path):
    """Four `augserve-train` processes (a sweep over optimizers) train three epochs on one
    shared stream and validate after each for longer than the server's `stall_seconds`
    (validation takes one batch per image, training eight images per batch). The trainers
    pause their training stream while they validate and read one shared validation stream:
    nobody is detached and the server delivers every batch it made to all four."""
    from trainer.sweep import plan_runs, run_sweep

    stall_seconds = 0.3
    root = ensure_demo_dataset(DemoConfig(images_per_class=60, image_size=32), root=tmp_path / "data")
    sweep = {
        "base": {
            "data": {"dataset": "tiny", "batch_size": 8, "eval_batch_size": 1, "epochs": 3, "prefetch": 2},
            "model": {"name": "linear"}, "run": {"threads": 1, "log_every": 1000},
        },
        "runs": [
            {"name": "sgd", "optimizer.name": "sgd", "optimizer.learning_rate": 0.05},
            {"name": "momentum", "optimizer.name": "momentum", "optimizer.learning_rate": 0.05},
            {"name": "adam", "optimizer.name": "adam", "optimizer.learning_rate": 0.003},
            {"name": "adamw", "optimizer.name": "adamw", "optimizer.learning_rate": 0.003},
        ],
    }
    datasets = {"tiny": DatasetConfig(str(root), validation_fraction=0.5)}
    with running_server(datasets, stall_seconds=stall_seconds, group_window=2) as server:
        results = run_sweep(plan_runs(sweep, {}), tmp_path / "sweep", concurrency=4, endpoints=[server.address])
        counters = server.manager.counters.snapshot()
    for result in results:
        assert result.returncode == 0, (result.folder / "train.log").read_text()[-3000:]
        assert len(result.epochs) == 3
        # The scenario holds: every validation outlasted stall_seconds.
        assert all(float(row["val_seconds"]) > stall_seconds for row in result.epochs), result.epochs
    assert counters.detached == 0, counters
    assert counters.pauses >= 4 * 2
    # 150 training images in 19 batches per epoch, 150 validation images in batches of one.
    assert counters.batches_produced == 3 * (19 + 150), counters
    assert counters.batches_delivered == 4 * counters.batches_produced, counters


def test_a_pause_outlives_a_reconnect(dataset_root):
    """A stream that paused and then lost its session (UNAVAILABLE: a restart, a network blip)
    tells the new session what is left of its pause, so its group goes on waiting for it; after
    `resume` a reconnect carries no pause."""
    from augserve.client import Reconnect
    from augserve.core.errors import UnavailableError

    with running_server({"demo": DatasetConfig(str(dataset_root))}) as server:
        manager = server.manager

        def live_sessions():
            return [session for session in list(manager.sessions.values()) if session.failure is None]

        def cut_and_reconnect(stream, batches) -> object:
            (old,) = live_sessions()
            reconnects = stream.reconnects
            old.fail(UnavailableError("cut by the test"))
            for _ in range(20):  # batches already on their way come first, then the reconnect
                next(batches)
                if stream.reconnects > reconnects:
                    break
            assert stream.reconnects == reconnects + 1
            assert wait_until(lambda: len(live_sessions()) == 1 and live_sessions()[0] is not old)
            return live_sessions()[0]

        with Client(server.address, reconnect=Reconnect(attempts=3, first_delay=0.1)) as client:
            with client.stream("demo", spec=SPEC, batch_size=4, epochs=0) as stream:
                batches = iter(stream)
                next(batches)
                stream.pause(300)
                session = cut_and_reconnect(stream, batches)
                assert wait_until(lambda: session.paused(time.monotonic()))
                assert 200 < session.paused_until - time.monotonic() <= 300
                stream.resume()
                assert wait_until(lambda: not session.paused(time.monotonic()))
                session = cut_and_reconnect(stream, batches)
                time.sleep(0.3)  # a Pause would have come with the open message
                assert not session.paused(time.monotonic())

