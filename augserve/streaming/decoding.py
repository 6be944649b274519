"""Read once, decode once, augment many: producers of one dataset order share their batches'
files and decoded images.

Producers whose streams differ only in the spec (same dataset, split, seed, batch size and
shard: a `StreamKey.order_key`) hold the same samples at the same cursors. They form a
`DecodeGroup`. The first producer to reach a cursor is its batch's *decoder*: it reads the
batch's files once for the group, and the group's other producers that will still make that
cursor (`groups.decode_takers`) take those bytes instead of reading the files again, each
drawing its own plans. A producer that registers its batch (plans and output rows) before the
decoder starts waits: the decoder, at its turn at the backend, decodes each image once and
warps it for every registered batch while it is still in the CPU's caches (one decode, one
augmentation per spec), then hands over. A producer that comes later takes the decoded images
the group kept for it and warps them itself (they are kept only where such a producer may still
come: otherwise each goes once its rows are written). Producers of a group read and plan a
batch ahead (`producer.SHARING_READ_AHEAD`), so they usually register before the decoder's turn
comes; besides, the decoder waits a moment (`REGISTRATION_SECONDS`) for the producers whose
next batch is this one and that are not held up by their own members (a full ring).

What the group keeps for producers still to come is let go when the last of them took it (or
left); all groups together keep at most a server-wide byte budget
(`Limits.decode_share_bytes`): past it the oldest kept batches go, and a producer that comes for
one later decodes it again. Beyond the group, a `DecodedCache` (data/decoded.py) keeps decoded
images across epochs and experiments, keyed by the bytes' digest (`content_key`).

Whoever reads or decodes, a sample's pixels are a function of its file's bytes and its plan:
within a batch every producer uses the one read of the files (as if each had read them at that
moment), and the cache serves only the decode of exactly the bytes read, so a session's pixels
never depend on what else runs or is cached.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import numpy as np

from augserve.backends.base import AugmentResult, DecodesApart, SampleFailure, compact, output_array
from augserve.core.plan import SamplePlan
from augserve.core.sample import SourceImage
from augserve.data.decoded import DecodedCache, content_key
from augserve.streaming import groups
from augserve.streaming.cursor import Cursor

# How long a decoder waits, before its turn, for the producers about to register their batches.
REGISTRATION_SECONDS = 0.25
# Longest a producer waits for a decoder that has not started (or for its read of the files)
# before it goes its own way. A decoder that started always finishes: it holds its turn.
TAKER_WAIT_SECONDS = 60.0

Turn = Callable[[], AbstractContextManager[object]]


def _never() -> bool:
    return False


class ByteBudget:
    """Bytes that may be taken in all (thread-safe): the decode groups' kept batches."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.taken = 0
        self._lock = threading.Lock()

    def take(self, amount: int) -> bool:
        with self._lock:
            if self.taken + amount > self.max_bytes:
                return False
            self.taken += amount
            return True

    def give(self, amount: int) -> None:
        with self._lock:
            self.taken -= amount


@dataclass
class DecodeTally:
    """Where one producer's images came from, summed over its batches (thread-safe `add`)."""

    decoded: int = 0  # decoded by this producer
    shared: int = 0  # from another producer's decode of the same batch
    cached: int = 0  # from the decoded-image cache
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def add(self, decoded: int = 0, shared: int = 0, cached: int = 0) -> None:
        with self._lock:
            self.decoded += decoded
            self.shared += shared
            self.cached += cached

    def values(self) -> tuple[int, int, int]:
        with self._lock:
            return self.decoded, self.shared, self.cached


@dataclass(eq=False)
class Job:
    """One producer's batch: its plans and output rows, its rows by sample id. A decoder that
    takes the job writes rows and sets `written` (with `failures`)."""

    producer_id: int
    plans: Sequence[SamplePlan]
    out: np.ndarray  # [len(plans), H, W, 3] uint8
    rows: dict[int, int]  # sample id -> row
    written: list[bool]
    failures: dict[int, str] = field(default_factory=dict)


@dataclass(eq=False)
class SharedBatch:
    """One cursor's batch, claimed by its decoder for the takers in `waiting`."""

    decoder: int
    waiting: set[int]  # takers that have not come for it yet
    expected: set[int]  # takers the decoder waits for before it starts (those about to come)
    arrived: set[int] = field(default_factory=set)  # producers that came for it after its decoder
    sources: list[SourceImage] | None = None  # the decoder's read of the batch's files
    read: threading.Event = field(default_factory=threading.Event)  # `sources` is set (or None: failed)
    jobs: list[Job] = field(default_factory=list)  # takers' batches registered before the start
    started: bool = False
    ready: threading.Event = field(default_factory=threading.Event)  # images kept, jobs written
    images: dict[int, np.ndarray | str] = field(default_factory=dict)  # by sample id; str: why it failed
    nbytes: int = 0  # taken from the budget while kept


class DecodeGroup:
    """The producers of one dataset order and the batches they share."""

    def __init__(self, order_key: tuple, budget: ByteBudget) -> None:
        self.order_key = order_key
        self.sessions_opened = 0  # on any producer of the group, ever (a new group gathers them)
        self._budget = budget
        self._lock = threading.Lock()
        self._registered = threading.Condition(self._lock)
        self._next: dict[int, Cursor] = {}  # producer id -> the next cursor it will make
        self._until: dict[int, int | None] = {}  # producer id -> first epoch its members do not need
        self._held_up: dict[int, Callable[[], bool]] = {}  # producer id -> whether it cannot go on now
        self._batches: dict[Cursor, SharedBatch] = {}  # kept batches, oldest first

    # --- membership (the manager and producer threads) ---

    def join(self, producer_id: int, cursor: Cursor, held_up: Callable[[], bool] | None = None) -> None:
        """`producer_id` makes batches from `cursor` on; `held_up()` says when it cannot make
        one now (its ring is full), so that no decoder waits for it then."""
        with self._lock:
            self._next[producer_id] = cursor
            self._until[producer_id] = None
            if held_up is not None:
                self._held_up[producer_id] = held_up

    def leave(self, producer_id: int) -> None:
        """A producer stopped: it takes nothing more, so nothing is kept or waited for it."""
        with self._lock:
            self._next.pop(producer_id, None)
            self._until.pop(producer_id, None)
            self._held_up.pop(producer_id, None)
            for cursor, batch in list(self._batches.items()):
                batch.waiting.discard(producer_id)
                batch.expected.discard(producer_id)
                batch.arrived.discard(producer_id)
                if not batch.waiting and batch.ready.is_set():
                    self._drop(cursor)
            self._registered.notify_all()

    @property
    def producers(self) -> int:
        with self._lock:
            return len(self._next)

    @property
    def kept_bytes(self) -> int:
        with self._lock:
            return sum(batch.nbytes for batch in self._batches.values())

    # --- one batch ---

    def arrive(
        self, producer_id: int, cursor: Cursor, following: Cursor, until_epoch: int | None
    ) -> tuple[SharedBatch | None, str]:
        """`producer_id` comes to make the batch at `cursor` (then `following`). Its part:
        "decoder" (it reads and decodes the batch, for the takers that will come), "taker"
        (it takes the decoder's read, then registers or takes the kept images), or (None,
        "alone") when nobody shares the batch."""
        with self._lock:
            self._next[producer_id] = max(self._next.get(producer_id, following), following)
            self._until[producer_id] = until_epoch
            for kept_cursor, kept in list(self._batches.items()):
                if kept_cursor < cursor and producer_id in kept.waiting:  # passed without taking it
                    kept.waiting.discard(producer_id)
                    if not kept.waiting and kept.ready.is_set():
                        self._drop(kept_cursor)
            kept = self._batches.get(cursor)
            if kept is not None:
                # A taker, or a producer that joined the group after the batch was claimed.
                kept.waiting.discard(producer_id)
                kept.arrived.add(producer_id)
                if not kept.waiting and kept.ready.is_set():
                    self._drop(cursor)  # the last taker: it holds the batch from here
                return kept, "taker"
            takers = groups.decode_takers(producer_id, cursor, self._next, self._until)
            if not takers:
                return None, "alone"
            coming = {
                taker for taker in takers
                if self._next[taker] == cursor and not self._held_up.get(taker, _never)()
            }
            shared = SharedBatch(producer_id, takers, coming)
            self._batches[cursor] = shared
            return shared, "decoder"

    def register(self, shared: SharedBatch, job: Job) -> bool:
        """Register a taker's batch for its decoder to augment (False: it started already)."""
        with self._lock:
            if shared.started:
                return False
            shared.jobs.append(job)
            self._registered.notify_all()
            return True

    def await_takers(self, shared: SharedBatch, timeout: float) -> None:
        """The decoder waits (at most `timeout` seconds) for its expected takers to register."""
        with self._registered:
            self._registered.wait_for(
                lambda: shared.expected <= {job.producer_id for job in shared.jobs}, timeout=timeout
            )

    def start(self, shared: SharedBatch) -> tuple[list[Job], bool]:
        """The decoder starts: registration closes. The jobs it writes as it decodes, and whether
        to keep the decoded images: only where a producer may still come for them (a taker that
        has not come yet, or came and did not register). Otherwise each image goes as soon as
        its rows are written. Kept till the batch's end, a batch's images (40 MB at 64 images
        of 400x400) were memory that malloc took from the system and gave back, batch after
        batch, each page a fault when written again: bench_sharing's server spent 0.10 ms of
        system time per delivered image then, 0.035 ms since."""
        with self._lock:
            shared.started = True
            registered = {job.producer_id for job in shared.jobs}
            keep = bool(shared.waiting) or not shared.arrived <= registered
            return list(shared.jobs), keep

    def withdraw(self, shared: SharedBatch, job: Job) -> bool:
        """Take a registered job back if its decoder has not started (True): the producer
        goes its own way."""
        with self._lock:
            if shared.started:
                return False
            shared.jobs.remove(job)
            shared.arrived.discard(job.producer_id)  # it goes its own way: it takes nothing kept
            return True

    def publish(self, shared: SharedBatch, images: dict[int, np.ndarray | str]) -> None:
        """The decoder is done: its registered jobs are written; keep the images for the takers
        still to come, within the budget (the oldest kept batches go first to make room;
        without room, later takers decode the batch again)."""
        size = sum(image.nbytes for image in images.values() if isinstance(image, np.ndarray))
        with self._lock:
            shared.images = images
            shared.started = True
            cursor = next((key for key, batch in self._batches.items() if batch is shared), None)
            if cursor is not None:
                if shared.waiting and self._reserve(size):
                    shared.nbytes = size
                else:
                    del self._batches[cursor]
            shared.ready.set()

    def _reserve(self, size: int) -> bool:
        """Take `size` bytes from the budget, dropping this group's oldest kept batches as
        needed (lock held)."""
        while not self._budget.take(size):
            oldest = next((key for key, batch in self._batches.items() if batch.ready.is_set()), None)
            if oldest is None:
                return False
            self._drop(oldest)
        return True

    def _drop(self, cursor: Cursor) -> None:
        batch = self._batches.pop(cursor)
        if batch.nbytes:
            self._budget.give(batch.nbytes)
            batch.nbytes = 0


class BatchDecode:
    """One producer's batch at `cursor` through its decode group and the cache: `read` its
    files (or take the decoder's read), then `augment` (a `backends.base.DecodedSource`)."""

    def __init__(
        self,
        *,
        producer_id: int,
        cursor: Cursor,
        following: Cursor,
        until_epoch: int | None,
        group: DecodeGroup | None,
        cache: DecodedCache | None,
        tally: DecodeTally,
        on_done: Callable[[int, int, int], None] | None = None,
    ) -> None:
        self.producer_id = producer_id
        self.cursor = cursor
        self.following = following
        self.until_epoch = until_epoch
        self.group = group
        self.cache = cache if cache is not None and cache.enabled else None
        self.tally = tally
        self.on_done = on_done
        self._shared: SharedBatch | None = None
        self._part = "alone"
        self._published = False

    def read(self, read_files: Callable[[], list[SourceImage]]) -> list[SourceImage]:
        """The batch's sources: read here (`read_files()`) by its decoder or a producer alone
        with it, else the decoder's read."""
        if self.group is not None:
            self._shared, self._part = self.group.arrive(self.producer_id, self.cursor, self.following, self.until_epoch)
        shared = self._shared
        if self._part == "taker":
            if shared.read.wait(TAKER_WAIT_SECONDS) and shared.sources is not None:
                return shared.sources
            self._part = "alone"  # read apart: its decodes are of other bytes
            return read_files()
        sources = None
        try:
            sources = read_files()
            return sources
        finally:
            if self._part == "decoder":
                shared.sources = sources
                shared.read.set()

    def close(self) -> None:
        """The producer is done with the batch (always called, also when it failed or had no
        image to augment): a decoder that did not get to publish lets its takers go on."""
        if self._part == "decoder" and not self._published:
            self._published = True
            self.group.publish(self._shared, {})

    def augment(
        self,
        backend: DecodesApart,
        encoded: Sequence[bytes],
        plans: Sequence[SamplePlan],
        out: np.ndarray | None,
        turn: Turn,
    ) -> AugmentResult:
        images = output_array(plans, out)
        count = len(plans)
        job = Job(self.producer_id, plans, images, {plan.sample_id: row for row, plan in enumerate(plans)}, [False] * count)
        # Per row: where its decode came from (list stores are atomic; pool threads write them).
        origins: list[str | None] = [None] * count
        shared, part = self._shared, self._part
        try:
            if part == "taker":
                if self.group.register(shared, job):
                    if not shared.ready.wait(TAKER_WAIT_SECONDS) and self.group.withdraw(shared, job):
                        shared = None  # the decoder never started: all of it here
                    else:
                        shared.ready.wait()  # it started: it finishes (it holds its turn)
                        for row in range(count):
                            if job.written[row]:
                                origins[row] = "shared"
                elif not shared.ready.wait(TAKER_WAIT_SECONDS):
                    shared = None
                self._own_pass(backend, encoded, job, origins, shared, turn)
            elif part == "decoder":
                self._decode_for_all(backend, encoded, job, origins, shared, turn)
            else:
                self._own_pass(backend, encoded, job, origins, None, turn)
        finally:
            counts = (origins.count("decoded"), origins.count("shared"), origins.count("cached"))
            self.tally.add(*counts)
            if self.on_done is not None:
                self.on_done(*counts)
        failures = dict(sorted(job.failures.items()))
        if not failures:
            return AugmentResult(images, list(range(count)))
        kept = [row for row in range(count) if row not in failures]
        return AugmentResult(compact(images, kept), kept, failures)

    def _image(
        self,
        backend: DecodesApart,
        data: bytes,
        sample_id: int,
        row: int,
        origins: list[str | None],
        kept: SharedBatch | None,
        recorded: dict[int, np.ndarray | str] | None,
    ) -> np.ndarray:
        """Row `row`'s decoded image: kept by the group, cached, or decoded here (and offered
        to `recorded` and the cache)."""
        if kept is not None:
            found = kept.images.get(sample_id)
            if found is not None:
                origins[row] = "shared"
                if isinstance(found, str):
                    raise SampleFailure(found)
                return found
        key = None
        if self.cache is not None:
            key = content_key(data)
            image = self.cache.get(key)
            if image is not None:
                origins[row] = "cached"
                if recorded is not None:
                    recorded[sample_id] = image
                return image
        origins[row] = "decoded"
        try:
            image = backend.decode(data)
        except SampleFailure as failure:
            if recorded is not None:
                recorded[sample_id] = str(failure)
            raise
        image.flags.writeable = False
        if recorded is not None:
            recorded[sample_id] = image
        if key is not None:
            self.cache.put(key, image)
        return image

    def _own_pass(
        self,
        backend: DecodesApart,
        encoded: Sequence[bytes],
        job: Job,
        origins: list[str | None],
        kept: SharedBatch | None,
        turn: Turn,
    ) -> None:
        """Decode (or take) and augment the rows no decoder wrote, at this producer's turn."""
        todo = [row for row in range(len(job.plans)) if not job.written[row]]
        if not todo:
            return

        def work(position: int) -> None:
            row = todo[position]
            plan = job.plans[row]
            image = self._image(backend, encoded[row], plan.sample_id, row, origins, kept, None)
            backend.apply_decoded(image, plan, job.out[row])

        with turn():
            failures = backend.run_each(len(todo), work)
        for position, reason in failures.items():
            job.failures[todo[position]] = reason

    def _decode_for_all(
        self,
        backend: DecodesApart,
        encoded: Sequence[bytes],
        job: Job,
        origins: list[str | None],
        shared: SharedBatch,
        turn: Turn,
    ) -> None:
        """As the decoder: wait a moment for the takers about to register, then at the turn
        decode each image once and warp it for this batch and every registered one."""
        group = self.group
        recorded: dict[int, np.ndarray | str] = {}
        try:
            group.await_takers(shared, REGISTRATION_SECONDS)
            with turn():
                jobs, keep = group.start(shared)
                kept_for = recorded if keep else None
                # The registered rows of each of this batch's samples.
                extra: list[list[tuple[Job, int]]] = [[] for _ in job.plans]
                for other in jobs:
                    for row, plan in enumerate(job.plans):
                        other_row = other.rows.get(plan.sample_id)
                        if other_row is not None:
                            extra[row].append((other, other_row))

                def work(row: int) -> None:
                    sample_id = job.plans[row].sample_id
                    try:
                        image = self._image(backend, encoded[row], sample_id, row, origins, None, kept_for)
                    except SampleFailure as failure:
                        for other, other_row in extra[row]:
                            other.failures[other_row] = str(failure)
                            other.written[other_row] = True
                        raise
                    for other, other_row in extra[row]:
                        try:
                            backend.apply_decoded(image, other.plans[other_row], other.out[other_row])
                        except SampleFailure as failure:
                            other.failures[other_row] = str(failure)
                        other.written[other_row] = True
                    backend.apply_decoded(image, job.plans[row], job.out[row])

                failures = backend.run_each(len(job.plans), work)
            job.failures.update(failures)
        finally:
            self._published = True
            group.publish(shared, recorded)
