"""Decode once, augment many, as plain objects: the decoded-image cache, a decode group's kept
batches and one producer's batch decode. No servers, sockets or sleeps."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest

from augserve.backends.base import SampleFailure
from augserve.core.sample import SourceImage
from augserve.data.decoded import DecodedCache, content_key
from augserve.streaming import decoding
from augserve.streaming.decoding import BatchDecode, ByteBudget, DecodeGroup, DecodeTally


def image(value: int, side: int = 4) -> np.ndarray:
    return np.full((side, side, 3), value, np.uint8)


class TestDecodedCache:
    def test_hits_misses_and_least_recently_used_eviction(self) -> None:
        size = image(0).nbytes
        cache = DecodedCache(2 * size)
        keys = [content_key(bytes([index]) * 10) for index in range(3)]
        assert cache.get(keys[0]) is None
        cache.put(keys[0], image(0))
        cache.put(keys[1], image(1))
        assert cache.get(keys[0])[0, 0, 0] == 0  # keys[0] is now the most recently used
        cache.put(keys[2], image(2))  # evicts keys[1]
        assert cache.get(keys[1]) is None and cache.get(keys[2]) is not None
        stats = cache.stats()
        assert (stats.hits, stats.misses, stats.evictions, stats.entries, stats.bytes) == (2, 2, 1, 2, 2 * size)
        assert stats.hit_rate == 0.5

    def test_cached_images_are_read_only_and_oversized_ones_are_not_kept(self) -> None:
        cache = DecodedCache(image(0).nbytes)
        kept = image(7)
        cache.put(content_key(b"a"), kept)
        assert not kept.flags.writeable
        cache.put(content_key(b"b"), image(1, side=8))
        assert cache.get(content_key(b"b")) is None and cache.stats().entries == 1

    def test_the_key_is_the_bytes_not_the_name(self) -> None:
        assert content_key(b"same bytes") == content_key(b"same bytes")
        assert content_key(b"same bytes") != content_key(b"same bytez")
        assert content_key(b"ab") != content_key(b"abc")


@dataclass(frozen=True)
class Plan:
    """A stand-in for a SamplePlan: a value the "warp" adds, the sample, the output size."""

    add: int
    sample_id: int = 0
    output_size: tuple[int, int] = (4, 4)


class Backend:
    """A stand-in for a backend that decodes apart: counts decodes; b"bad" cannot be decoded;
    an image "warped" by a plan is its value plus the plan's; runs rows one after another."""

    def __init__(self) -> None:
        self.decodes = 0

    def decode(self, data: bytes) -> np.ndarray:
        self.decodes += 1
        if data == b"bad":
            raise SampleFailure("could not be decoded")
        return image(data[0])

    def apply_decoded(self, decoded: np.ndarray, plan: Plan, out: np.ndarray) -> None:
        if decoded[0, 0, 0] == 99:
            raise SampleFailure("does not fit the plan")
        out[...] = decoded + plan.add

    def run_each(self, count: int, work) -> dict[int, str]:
        failures = {}
        for index in range(count):
            try:
                work(index)
            except SampleFailure as failure:
                failures[index] = str(failure)
        return failures


@contextmanager
def no_turn():
    yield


def run(group, producer_id, cursor, encoded, backend, add=0, cache=None, until=None, following=None, read=None):
    """One producer's batch (sample ids 0, 1, ...) through a BatchDecode: (output values,
    failures, tally). `read` replaces the producer's own read of the files."""
    tally = DecodeTally()
    step = BatchDecode(
        producer_id=producer_id, cursor=cursor, following=following or (cursor[0], cursor[1] + len(encoded)),
        until_epoch=until, group=group, cache=cache, tally=tally,
    )
    sources = [SourceImage(index, 0, f"file{index}", data) for index, data in enumerate(encoded)]
    taken = step.read(lambda: read(sources) if read else sources)
    plans = [Plan(add, source.sample_id) for source in taken]
    try:
        result = step.augment(backend, [source.data for source in taken], plans, None, no_turn)
    finally:
        step.close()
    values = [int(row[0, 0, 0]) for row in result.images]
    return values, result.failures, tally.values()


@pytest.fixture(autouse=True)
def no_registration_wait(monkeypatch):
    """Sequential tests: a decoder does not wait for takers to register (they come later)."""
    monkeypatch.setattr(decoding, "REGISTRATION_SECONDS", 0.0)


class TestDecodeGroup:
    def test_the_first_producer_decodes_and_later_ones_take_its_images(self) -> None:
        budget = ByteBudget(1 << 20)
        group = DecodeGroup(("order",), budget)
        for producer_id in (1, 2, 3):
            group.join(producer_id, (0, 0))
        backend = Backend()
        encoded = [b"\x01a", b"bad", b"\x03c"]
        first = run(group, 1, (0, 0), encoded, backend, add=10)
        assert backend.decodes == 3 and first == ([11, 13], {1: "could not be decoded"}, (3, 0, 0))
        assert group.kept_bytes == 2 * image(0).nbytes  # kept for producers 2 and 3
        second = run(group, 2, (0, 0), encoded, backend, add=20)
        third = run(group, 3, (0, 0), encoded, backend, add=30)
        assert backend.decodes == 3  # nobody decoded again
        assert second == ([21, 23], {1: "could not be decoded"}, (0, 3, 0))
        assert third[0] == [31, 33] and third[2] == (0, 3, 0)
        assert group.kept_bytes == 0 and budget.taken == 0  # the last taker took it: let go

    def test_takers_use_the_decoders_read_of_the_files(self) -> None:
        group = DecodeGroup(("order",), ByteBudget(1 << 20))
        group.join(1, (0, 0))
        group.join(2, (0, 0))
        backend = Backend()
        reads = []
        run(group, 1, (0, 0), [b"\x01a", b"\x02b"], backend, read=lambda sources: reads.append(1) or sources)
        values, _, tally = run(group, 2, (0, 0), [b"\x07a", b"\x07b"], backend, read=lambda sources: reads.append(2) or sources)
        assert reads == [1] and tally == (0, 2, 0) and values == [1, 2]  # the decoder's bytes, read once

    def test_producers_past_the_cursor_or_done_with_its_epoch_are_not_waited_for(self) -> None:
        # Batches of 8, epochs of 16 samples: (0, 0), (0, 8), (1, 0), ...
        group = DecodeGroup(("order",), ByteBudget(1 << 20))
        group.join(1, (0, 0))
        group.join(2, (0, 8))  # resumed further on
        run(group, 1, (0, 0), [b"\x01"], Backend(), following=(0, 8))
        assert group.kept_bytes == 0  # producer 2 is past (0, 0)
        run(group, 2, (0, 8), [b"\x02"], Backend(), until=1, following=(1, 0))
        assert group.kept_bytes == image(0).nbytes  # kept for producer 1
        run(group, 1, (0, 8), [b"\x02"], Backend(), following=(1, 0))
        # Producer 2's members end with epoch 0: nothing of epoch 1 is kept for it.
        run(group, 1, (1, 0), [b"\x03"], Backend(), following=(1, 8))
        assert group.kept_bytes == 0

    def test_a_producer_that_leaves_lets_go_of_what_was_kept_for_it(self) -> None:
        budget = ByteBudget(1 << 20)
        group = DecodeGroup(("order",), budget)
        group.join(1, (0, 0))
        group.join(2, (0, 0))
        run(group, 1, (0, 0), [b"\x01"], Backend())
        assert budget.taken == image(0).nbytes
        group.leave(2)
        assert budget.taken == 0 and group.producers == 1

    def test_past_the_budget_the_oldest_kept_batch_goes(self) -> None:
        budget = ByteBudget(image(0).nbytes)
        group = DecodeGroup(("order",), budget)
        group.join(1, (0, 0))
        group.join(2, (0, 0))  # never comes (its members are slow)
        backend = Backend()
        run(group, 1, (0, 0), [b"\x01"], backend, following=(0, 1))
        run(group, 1, (0, 1), [b"\x02"], backend, following=(0, 2))
        assert budget.taken == image(0).nbytes  # only (0, 1) is kept
        assert run(group, 2, (0, 0), [b"\x01"], backend, following=(0, 1))[2] == (1, 0, 0)  # decoded again
        assert run(group, 2, (0, 1), [b"\x02"], backend, following=(0, 2))[2] == (0, 1, 0)
        assert budget.taken == 0

    def test_a_taker_registered_before_the_decoder_starts_is_warped_as_the_decoder_decodes(self) -> None:
        group = DecodeGroup(("order",), ByteBudget(1 << 20))
        group.join(1, (0, 0))
        group.join(2, (0, 0))
        backend = Backend()
        decoder = BatchDecode(producer_id=1, cursor=(0, 0), following=(0, 3), until_epoch=None,
                              group=group, cache=None, tally=DecodeTally())
        sources = [SourceImage(index, 0, f"file{index}", data) for index, data in enumerate([b"\x01a", b"\x02b", b"\x63c"])]
        decoder.read(lambda: sources)
        # Producer 2 comes before the decoder's turn: it takes the read and registers its batch
        # (samples 1 and 2 only: it left sample 0 out).
        taker_shared, part = group.arrive(2, (0, 0), (0, 3), None)
        assert part == "taker" and taker_shared.sources is sources
        job = decoding.Job(2, [Plan(20, 1), Plan(20, 2)], np.zeros((2, 4, 4, 3), np.uint8), {1: 0, 2: 1}, [False, False])
        assert group.register(taker_shared, job)
        result = decoder.augment(backend, [source.data for source in sources], [Plan(10, index) for index in range(3)], None, no_turn)
        assert backend.decodes == 3
        assert [int(row[0, 0, 0]) for row in result.images] == [11, 12] and result.failures == {2: "does not fit the plan"}
        # The decoder wrote the registered job's rows: its own warp of the same decodes.
        assert job.written == [True, True] and int(job.out[0, 0, 0, 0]) == 22 and job.failures == {1: "does not fit the plan"}
        assert decoder.tally.values() == (3, 0, 0) and taker_shared.ready.is_set()
        assert not group.register(taker_shared, job)  # too late now

    def test_a_decoder_without_a_batch_to_augment_lets_its_takers_go_on(self) -> None:
        group = DecodeGroup(("order",), ByteBudget(1 << 20))
        group.join(1, (0, 0))
        group.join(2, (0, 0))
        decoder = BatchDecode(producer_id=1, cursor=(0, 0), following=(0, 1), until_epoch=None,
                              group=group, cache=None, tally=DecodeTally())
        decoder.read(list)
        decoder.close()  # every image was bad: it never augments
        shared, part = group.arrive(2, (0, 0), (0, 1), None)
        assert part == "taker" and shared.ready.is_set()


# --- whether a decoder keeps a batch's decoded images (`DecodeGroup.start`'s keep) ---

ENCODED = [b"\x01a", b"\x02b"]  # a batch of two: sample ids 0 and 1
KEPT = 2 * image(0).nbytes  # its decoded images


def claimed(producers: list[int]) -> tuple[DecodeGroup, ByteBudget, BatchDecode]:
    """A group of `producers` at (0, 0) whose first one has read the batch as its decoder."""
    budget = ByteBudget(1 << 20)
    group = DecodeGroup(("order",), budget)
    for producer_id in producers:
        group.join(producer_id, (0, 0))
    decoder = batch_decode(group, producers[0])
    decoder.read(lambda: [SourceImage(index, 0, f"file{index}", data) for index, data in enumerate(ENCODED)])
    return group, budget, decoder


def batch_decode(group: DecodeGroup, producer_id: int) -> BatchDecode:
    return BatchDecode(producer_id=producer_id, cursor=(0, 0), following=(0, 2), until_epoch=None,
                       group=group, cache=None, tally=DecodeTally())


def register(group: DecodeGroup, producer_id: int) -> tuple[decoding.SharedBatch, decoding.Job]:
    """`producer_id` comes for the batch and registers its job before the decoder starts."""
    shared, part = group.arrive(producer_id, (0, 0), (0, 2), None)
    assert part == "taker"
    job = decoding.Job(producer_id, [Plan(20, 0), Plan(20, 1)], np.zeros((2, 4, 4, 3), np.uint8), {0: 0, 1: 1}, [False, False])
    assert group.register(shared, job)
    return shared, job


def decode(group: DecodeGroup, decoder: BatchDecode, backend: Backend) -> tuple[decoding.SharedBatch, bool]:
    """The decoder's augment of the batch (then publish): the batch it shared and its start's keep."""
    answers = []
    start = group.start

    def noted_start(shared: decoding.SharedBatch) -> tuple[list[decoding.Job], bool]:
        jobs, keep = start(shared)  # the real start: only its answer is noted
        answers.append((shared, keep))
        return jobs, keep

    group.start = noted_start
    try:
        decoder.augment(backend, ENCODED, [Plan(10, index) for index in range(2)], None, no_turn)
    finally:
        decoder.close()
    [(shared, keep)] = answers
    return shared, keep


def test_nothing_is_kept_when_every_taker_registered_before_the_decoder_started() -> None:
    """Nobody can come for the images later, so each goes once its rows are written."""
    group, budget, decoder = claimed([1, 2, 3])
    jobs = [register(group, producer_id)[1] for producer_id in (2, 3)]
    backend = Backend()
    shared, keep = decode(group, decoder, backend)
    assert keep is False and shared.images == {}  # not even on the batch
    assert group.kept_bytes == 0 and budget.taken == 0
    assert backend.decodes == 2 and all(job.written == [True, True] for job in jobs)
    assert [int(job.out[row, 0, 0, 0]) for job in jobs for row in range(2)] == [21, 22, 21, 22]


@pytest.mark.parametrize("goes", ["takes", "leaves"])
def test_images_are_kept_within_the_budget_for_a_member_that_has_not_come_yet(goes: str) -> None:
    """A member still to come may take them; once it took them (or left) they are let go."""
    group, budget, decoder = claimed([1, 2])
    backend = Backend()
    shared, keep = decode(group, decoder, backend)
    assert keep is True and sorted(shared.images) == [0, 1]
    assert group.kept_bytes == KEPT and budget.taken == KEPT
    if goes == "takes":
        assert run(group, 2, (0, 0), ENCODED, backend, add=20)[::2] == ([21, 22], (0, 2, 0))
    else:
        group.leave(2)
    assert backend.decodes == 2 and group.kept_bytes == 0 and budget.taken == 0


def test_images_are_kept_while_one_taker_registered_and_another_has_not_come() -> None:
    """One registered taker does not make the batch done: the member still to come takes it."""
    group, budget, decoder = claimed([1, 2, 3])
    _, job = register(group, 2)
    backend = Backend()
    shared, keep = decode(group, decoder, backend)
    assert keep is True and job.written == [True, True]
    assert group.kept_bytes == KEPT  # for producer 3
    assert run(group, 3, (0, 0), ENCODED, backend, add=30)[::2] == ([31, 32], (0, 2, 0))
    assert backend.decodes == 2 and group.kept_bytes == 0 and budget.taken == 0


def test_images_are_kept_on_the_batch_for_a_taker_that_came_but_did_not_register() -> None:
    """A taker that came too late to register takes the kept images instead of decoding again;
    it holds the batch itself, so nothing of the group's budget is taken for it."""
    group, budget, decoder = claimed([1, 2])
    taker = batch_decode(group, 2)
    assert len(taker.read(list)) == 2  # the decoder's read (its own would be empty): it came, did not register
    backend = Backend()
    shared, keep = decode(group, decoder, backend)
    assert keep is True and sorted(shared.images) == [0, 1]
    assert group.kept_bytes == 0 and budget.taken == 0  # nobody else waits: not in the budget
    result = taker.augment(backend, ENCODED, [Plan(20, index) for index in range(2)], None, no_turn)
    taker.close()
    assert [int(row[0, 0, 0]) for row in result.images] == [21, 22]
    assert backend.decodes == 2 and taker.tally.values() == (0, 2, 0)


def test_images_are_kept_for_a_producer_that_joined_after_the_claim_and_came_for_them() -> None:
    """A producer the decoder did not count as a taker but that came for the batch may still
    take it: its arrival, not the claim's takers, decides."""
    group, _, decoder = claimed([1, 2])
    register(group, 2)
    group.join(3, (0, 0))
    late, part = group.arrive(3, (0, 0), (0, 2), None)
    assert part == "taker" and 3 not in late.waiting
    shared, keep = decode(group, decoder, Backend())
    assert keep is True and sorted(shared.images) == [0, 1]


def test_nothing_is_kept_for_a_taker_that_withdrew_its_job_before_the_start() -> None:
    """A withdrawn taker goes its own way: it takes nothing kept."""
    group, budget, decoder = claimed([1, 2])
    taker_shared, job = register(group, 2)
    assert group.withdraw(taker_shared, job)
    shared, keep = decode(group, decoder, Backend())
    assert keep is False and shared.images == {} and not shared.jobs
    assert group.kept_bytes == 0 and budget.taken == 0


def test_nothing_is_kept_for_a_taker_that_came_and_left_before_the_start() -> None:
    """A producer that left takes nothing more, though it came for the batch."""
    group, budget, decoder = claimed([1, 2])
    group.arrive(2, (0, 0), (0, 2), None)
    group.leave(2)
    shared, keep = decode(group, decoder, Backend())
    assert keep is False and shared.images == {}
    assert group.kept_bytes == 0 and budget.taken == 0


class TestBatchDecodeWithTheCache:
    def test_later_epochs_take_the_cached_images(self) -> None:
        cache = DecodedCache(1 << 20)
        backend = Backend()
        encoded = [b"\x01a", b"\x02b"]
        run(None, 1, (0, 0), encoded, backend, cache=cache)
        values, _, tally = run(None, 1, (1, 0), encoded, backend, cache=cache)
        assert backend.decodes == 2 and tally == (0, 0, 2)
        assert values == [1, 2] and cache.stats().hits == 2

    def test_a_disabled_cache_is_not_used(self) -> None:
        cache = DecodedCache(0)
        backend = Backend()
        run(None, 1, (0, 0), [b"\x01"], backend, cache=cache)
        run(None, 1, (1, 0), [b"\x01"], backend, cache=cache)
        assert backend.decodes == 2 and cache.stats().misses == 0


def test_a_negative_cache_budget_is_refused() -> None:
    with pytest.raises(ValueError):
        DecodedCache(-1)


@pytest.mark.parametrize("fill_mode", ["constant", "nearest"])
@pytest.mark.parametrize("interpolation", ["linear", "nearest"])
def test_opencv_decoding_apart_gives_the_bytes_augment_gives(fill_mode, interpolation) -> None:
    """OpenCV's decode-apart path (RGBA decodes, 4-channel warps) equals its fused `augment`
    byte for byte, so a sample's pixels do not depend on which path made them."""
    import cv2

    from augserve.backends.opencv import OpenCVBackend
    from augserve.core.plan import make_plan
    from augserve.core.spec import AugmentSpec

    rng = np.random.default_rng(4)
    spec = AugmentSpec.from_dict({
        "fill_mode": fill_mode, "fill_value": 17,
        "ops": [{"rotate": {"degrees": 30}}, {"zoom": {"range": [0.7, 1.4]}},
                {"random_resized_crop": {"size": 48, "interpolation": interpolation}},
                {"brightness": {"factor": 0.3}}, {"hue": {"degrees": 20}}, {"random_erasing": {"p": 0.5}}],
    })
    encoded = []
    for index in range(12):
        height, width = (int(side) for side in rng.integers(40, 90, 2))
        pixels = cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), np.uint8), (5, 5), 0)
        encoded.append(cv2.imencode(".jpg" if index % 2 else ".png", pixels)[1].tobytes())
    backend = OpenCVBackend(threads=2)
    try:
        plans = [
            make_plan(spec, 7, 1, index, cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape[:2])
            for index, data in enumerate(encoded)
        ]
        fused = backend.augment(encoded, plans).images
        apart = np.empty_like(fused)
        decoded = [backend.decode(data) for data in encoded]
        assert decoded[0].shape[2] == 4
        backend.run_each(len(plans), lambda index: backend.apply_decoded(decoded[index], plans[index], apart[index]))
    finally:
        backend.close()
    assert np.array_equal(fused, apart)
