"""A producer makes one stream's batches into a ring of slots, in its own thread.

Its condition guards its own state (slots, members, who holds which batch) and the state of the
sessions that are its members; nothing else is behind it, so producers never wait for each
other. The thread decides only about itself (`groups.may_produce`): when members hold its group
back, it says it is blocked and wakes the manager, which decides about the members.

Read-ahead: the thread hands up to `read_ahead + 1` batches at once to workers of its own, each
with a slot of its own: one reads the files of batch n+2 and another draws the plans of n+1
while the backend runs batch n (a DALI pipeline takes n+1 before n is done). The thread
publishes them strictly in order, so members see exactly the batches, sequences and cursors an
unhurried producer makes; every sample's pixels depend only on its bytes and its plan
(seed, epoch, sample id), never on which worker or when.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from augserve.backends.base import Backend, read_ahead_batches
from augserve.backends.batch import Batch, augment_batch
from augserve.core.errors import AugserveError
from augserve.core.images import HeaderCache
from augserve.core.policy import BadImagePolicy
from augserve.core.spec import AugmentSpec
from augserve.data.datasets import Dataset, epoch_order
from augserve.data.reading import read_sources
from augserve.streaming import groups
from augserve.streaming.counters import Counters
from augserve.streaming.cursor import Cursor, EpochLayout, shard_samples
from augserve.streaming.keys import StreamKey
from augserve.streaming.scheduler import FairScheduler
from augserve.streaming.slots import ProducedBatch, SlotTable
from augserve.transport.ring import SlotRing

if TYPE_CHECKING:
    from augserve.streaming.session import Session

log = logging.getLogger(__name__)

WAIT_SECONDS = 1.0  # longest a waiting producer sleeps before it looks again (gathering deadline)


@dataclass(frozen=True)
class Dispatched:
    """A batch handed to a worker and not yet published."""

    sequence: int
    cursor: Cursor
    slot: int
    made: Future  # -> (Batch, seconds it took)


class Producer:
    """Produces the stream `key` from `cursor` on into `slot_count` slots, with up to
    `read_ahead` batches (default: as many as the backend asks for, `read_ahead_batches`) in
    the works beyond the oldest unpublished one."""

    _ids = itertools.count()

    def __init__(
        self,
        *,
        key: StreamKey,
        dataset: Dataset,
        spec: AugmentSpec,
        split_ids: np.ndarray,
        output_size: tuple[int, int],
        cursor: Cursor,
        slot_count: int,
        backend: Backend,
        scheduler: FairScheduler,
        headers: HeaderCache,
        counters: Counters,
        group_wait_seconds: float,
        wake_manager: threading.Event,
        expected_members: int = 1,
        read_ahead: int | None = None,
    ) -> None:
        self.id = next(self._ids)
        self.condition = threading.Condition()
        self.key = key
        self.dataset = dataset
        self.spec = spec
        self.split_ids = split_ids
        self.output_size = output_size
        self.layout = EpochLayout(
            shard_samples(len(split_ids), key.shard_index, key.shard_count), key.batch_size, key.drop_last
        )
        self.slot_bytes = key.batch_size * output_size[0] * output_size[1] * 3
        self.ring = SlotRing(slot_count, self.slot_bytes, key.shared_memory)
        self.slots = SlotTable(slot_count)
        self.members: list[Session] = []
        self.expected_members = expected_members
        self.cursor = cursor
        self.next_sequence = 0
        self.error: BaseException | None = None
        self.stopped = False  # asked to stop, or done
        self.finished = False  # the thread has returned: the ring is no longer written
        self.blocked = False  # members need batches but every slot is held
        self._holdings: dict[str, set[int]] = {}  # session id -> sequences it still references
        self._epoch_skipped: dict[int, int] = {}
        self._order_epoch = -1
        self._order = np.empty(0, np.int64)
        self._backend = backend
        self._scheduler = scheduler
        self._headers = headers
        self._counters = counters
        self._policy = BadImagePolicy(key.on_bad_image, key.max_decoded_pixels)
        self._group_wait_seconds = group_wait_seconds
        self._wake_manager = wake_manager
        self._created = time.monotonic()
        read_ahead = read_ahead_batches(backend) if read_ahead is None else read_ahead
        if read_ahead < 0:
            raise ValueError(f"read_ahead: {read_ahead} is below 0")
        self._read_ahead = read_ahead
        self._dispatched: deque[Dispatched] = deque()  # in sequence order
        self._dispatch_cursor = cursor  # where the next batch handed to a worker starts
        self._workers = ThreadPoolExecutor(read_ahead + 1, thread_name_prefix=f"augserve-producer-{self.id}-batch")
        self._thread = threading.Thread(target=self._run, name=f"augserve-producer-{self.id}", daemon=True)

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def start(self) -> None:
        self._thread.start()

    # --- who holds what (the caller holds the condition) ---

    def hold(self, session_id: str, sequence: int) -> None:
        self.slots.reference(sequence)
        self._holdings.setdefault(session_id, set()).add(sequence)

    def drop(self, session_id: str, sequence: int) -> None:
        held = self._holdings.get(session_id)
        if held is not None and sequence in held:
            held.discard(sequence)
            self.slots.release(sequence)

    def drop_from(self, session_id: str, first_sequence: int) -> None:
        """Drop the session's references to batches from `first_sequence` on (not yet sent)."""
        for sequence in [s for s in self._holdings.get(session_id, ()) if s >= first_sequence]:
            self.drop(session_id, sequence)

    def drop_all(self, session_id: str) -> None:
        for sequence in list(self._holdings.pop(session_id, ())):
            self.slots.release(sequence)

    def holds(self, session_id: str, sequence: int) -> bool:
        return sequence in self._holdings.get(session_id, ())

    def sequence_at(self, cursor: Cursor) -> int | None:
        """The sequence of the batch starting at `cursor`, if still buffered or next."""
        if self.cursor == cursor:
            return self.next_sequence
        return self.slots.sequence_at(cursor)

    def cursor_of(self, sequence: int) -> Cursor:
        """Where the batch `sequence` starts (it is buffered, or the next to make)."""
        batch = self.slots.get(sequence)
        return self.cursor if batch is None else batch.cursor

    def images_of(self, batch: ProducedBatch) -> np.ndarray:
        """[N, H, W, 3] uint8 view of a buffered batch's slot."""
        return self.ring.view(batch.slot, (len(batch.sample_ids), *self.output_size, 3))

    def close_ring(self) -> None:
        """Free the ring (unlink its shared-memory file); only once the thread has returned."""
        self.ring.close()

    # --- the production loop ---

    def _may_dispatch(self) -> bool:
        """Whether the next batch may go to a worker now (the caller holds the condition)."""
        return len(self._dispatched) <= self._read_ahead and groups.may_produce(
            members=len(self.members),
            expected_members=self.expected_members,
            produced=self.next_sequence + len(self._dispatched),
            waited_seconds=time.monotonic() - self._created,
            group_wait_seconds=self._group_wait_seconds,
            needed_until_epoch=groups.needed_until([member.end_epoch for member in self.members]),
            cursor_epoch=self._dispatch_cursor[0],
            has_slot=self.slots.has_slot(),
        )

    def _order_for(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            key = self.key
            shuffle = key.split != "validation"
            self._order = epoch_order(self.split_ids, key.seed, epoch, key.shard_index, key.shard_count, shuffle)
            self._order_epoch = epoch
        return self._order

    def _dispatch(self) -> None:
        """Hand the batch at the dispatch cursor to a worker, with a slot (condition held)."""
        slot = self.slots.take_slot()
        cursor = self._dispatch_cursor
        ids = self._order_for(cursor[0])[cursor[1] : cursor[1] + self.key.batch_size]
        sequence = self.next_sequence + len(self._dispatched)
        self._dispatch_cursor = self.layout.next_cursor(cursor)
        made = self._workers.submit(self._make, slot, cursor[0], ids.tolist())
        self._dispatched.append(Dispatched(sequence, cursor, slot, made))

    def _make(self, slot: int, epoch: int, ids: list[int]) -> tuple[Batch, float] | None:
        """One batch into its slot, on a worker: read the files, then augment at a turn. None
        when the producer stopped before the backend took it (nobody waits for it then)."""
        started = time.perf_counter()
        if self.stopped:
            return None
        sources = read_sources(self.dataset.manifest, ids)
        out = self.ring.view_for_writing(slot, (len(ids), *self.output_size, 3))
        with self._scheduler.turn():
            if self.stopped:
                return None
            batch = augment_batch(
                self._backend, self.spec, self.key.seed, epoch, sources, self._policy,
                out=out, headers=self._headers,
            )
        return batch, time.perf_counter() - started

    def _run(self) -> None:
        try:
            while True:
                with self.condition:
                    while not self.stopped and self._may_dispatch():
                        self._dispatch()
                    if not self._dispatched:
                        if self.stopped:
                            return
                        blocked = bool(self.members) and not self.slots.has_slot()
                        if blocked and not self.blocked:
                            self._wake_manager.set()
                        self.blocked = blocked
                        self.condition.wait(timeout=WAIT_SECONDS)
                        continue
                    self.blocked = False
                    oldest = self._dispatched[0]
                try:
                    made = oldest.made.result()
                except BaseException as error:
                    with self.condition:
                        self.error = error
                        self.condition.notify_all()
                    if isinstance(error, AugserveError):
                        log.warning("producer %d stopped: %s", self.id, error)
                    else:
                        log.exception("producer %d failed", self.id, exc_info=error)
                    return
                if made is None:
                    return  # stopped: what is still in the works is given back unpublished
                batch, production_seconds = made
                with self.condition:
                    self._dispatched.popleft()
                    self._publish(oldest.sequence, oldest.cursor, oldest.slot, batch)
                    self.condition.notify_all()
                self._counters.observe_production(production_seconds)
                self._counters.add(images_skipped=len(batch.skipped))
        finally:
            self._settle()
            with self.condition:
                self.stopped = True
                self.finished = True
                self.condition.notify_all()
            self._wake_manager.set()

    def _settle(self) -> None:
        """Wait for the batches still in the works (they write into ring slots) and give their
        slots back unpublished; then end the workers."""
        for item in self._dispatched:
            try:
                item.made.result()
            except BaseException as error:  # the first failure in order is the stream's error
                log.debug("producer %d: batch %d, made after the stream's end, failed: %s", self.id, item.sequence, error)
        with self.condition:
            for item in self._dispatched:
                self.slots.give_back(item.slot)
            self._dispatched.clear()
        self._workers.shutdown(wait=True)

    def _publish(self, sequence: int, cursor: Cursor, slot: int, batch: Batch) -> None:
        """Put a made batch in its slot's table and give every member that needs it a reference."""
        epoch, position = cursor
        next_cursor = self.layout.next_cursor(cursor)
        skipped_total = self._epoch_skipped.get(epoch, 0) + len(batch.skipped)
        self._epoch_skipped[epoch] = skipped_total
        produced = ProducedBatch(
            sequence=sequence,
            epoch=epoch,
            position=position,
            slot=slot,
            sample_ids=batch.sample_ids,
            labels=batch.labels,
            skipped=[f"{item.source}: {item.reason}" for item in batch.skipped],
            next_cursor=next_cursor,
            end_of_epoch=next_cursor[0] != epoch,
            epoch_skipped=skipped_total,
            produced_at=time.monotonic(),
        )
        self.slots.add(produced)
        for member in self.members:
            if member.next_sequence <= sequence:
                self.hold(member.id, sequence)
        self.next_sequence += 1
        self.cursor = next_cursor
