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

Decoding: with a backend that decodes apart from augmenting (OpenCV), each batch's images come
through a `BatchDecode`: from the producer's decode group (producers of other specs on the same
dataset order, one of which decoded the batch), the decoded-image cache, or its own decode.

A producer made for a detached member (`ceiling_source`: the group it left) makes only the
batches that group no longer holds: once it reaches the group's oldest buffered batch it waits,
and the manager moves the member back to the group (a rejoin).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from augserve.backends.base import Backend, decodes_apart, read_ahead_batches, writes_to_device
from augserve.backends.batch import Batch, finish_batch, load_targets, prepare_batch, run_batch
from augserve.core.errors import AugserveError
from augserve.core.images import HeaderCache
from augserve.core.policy import BadImagePolicy
from augserve.core.spec import AugmentSpec
from augserve.data.datasets import Dataset, epoch_order
from augserve.data.decoded import DecodedCache
from augserve.data.reading import read_sources
from augserve.streaming import groups
from augserve.streaming.counters import Counters
from augserve.streaming.cursor import Cursor, EpochLayout, shard_samples
from augserve.streaming.decoding import BatchDecode, DecodeGroup, DecodeTally
from augserve.streaming.keys import StreamKey
from augserve.streaming.scheduler import FairScheduler
from augserve.streaming.slots import ProducedBatch, SlotTable
from augserve.transport.cuda_ipc import CudaIpcRing
from augserve.transport.ring import SlotRing

if TYPE_CHECKING:
    from augserve.streaming.session import Session

log = logging.getLogger(__name__)

WAIT_SECONDS = 1.0  # longest a waiting producer sleeps before it looks again (gathering deadline)
SHARING_READ_AHEAD = 2  # batches a producer of a decode group with others reads and plans ahead


class _Stopped(Exception):
    """The producer stopped before its batch's turn at the backend came."""


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
        decode_group: DecodeGroup | None = None,
        decoded_cache: DecodedCache | None = None,
        expected_order_sessions: int = 0,
        cuda_ipc_device: int | None = None,
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
        # A slot: the batch's images, then (with masks asked for) its label maps from masks_offset.
        self.masks_offset = key.batch_size * output_size[0] * output_size[1] * 3
        self.slot_bytes = key.batch_size * output_size[0] * output_size[1] * key.targets.pixel_bytes
        self.ring = SlotRing(slot_count, self.slot_bytes, key.shared_memory)
        # CUDA IPC: the slots clients read are on the GPU. A backend that writes there itself
        # (DALI on that GPU) leaves the host ring untouched (never paged in); any other backend
        # writes the host slot and the batch is copied up once.
        self.device_ring = None if cuda_ipc_device is None else CudaIpcRing(slot_count, self.slot_bytes, cuda_ipc_device)
        self._writes_device = self.device_ring is not None and writes_to_device(backend, self.device_ring.device)
        self.slots = SlotTable(slot_count)
        self.members: list[Session] = []
        self.expected_members = expected_members
        self.cursor = cursor
        self.next_sequence = 0
        self.error: BaseException | None = None
        self.stopped = False  # asked to stop, or done
        self.finished = False  # the thread has returned: the ring is no longer written
        self.blocked = False  # members need batches but every slot is held
        self.at_ceiling = False  # a detached member's producer whose member waits at its old group's window
        # Cursor of the oldest batch still in the ring (else the next to make): where a detached
        # member may rejoin. Replaced whole (a tuple) under the condition; read without it.
        self.window_start: Cursor = cursor
        self.ceiling_source: Producer | None = None  # the group a detached member may rejoin
        self.decode_group = decode_group
        self.expected_order_sessions = expected_order_sessions
        self.decode_tally = DecodeTally()
        self.detaches = 0  # members moved off this producer (metrics; manager lock held)
        self.rejoins = 0  # detached members that came back to it
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
        self._decoded_cache = decoded_cache if decoded_cache is not None and decoded_cache.enabled else None
        self._decodes_apart = decodes_apart(backend)
        self._created = time.monotonic()
        read_ahead = read_ahead_batches(backend) if read_ahead is None else read_ahead
        if read_ahead < 0:
            raise ValueError(f"read_ahead: {read_ahead} is below 0")
        self._read_ahead = read_ahead
        # Sharing decodes, a producer reads and plans one batch ahead at least, so that it is
        # registered with the batch's decoder before the decoder's turn comes (decode groups).
        self._sharing_read_ahead = max(read_ahead, SHARING_READ_AHEAD) if self._decodes_apart else read_ahead
        self._dispatched: deque[Dispatched] = deque()  # in sequence order
        self._dispatch_cursor = cursor  # where the next batch handed to a worker starts
        self._workers = ThreadPoolExecutor(
            self._sharing_read_ahead + 1, thread_name_prefix=f"augserve-producer-{self.id}-batch"
        )
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

    def masks_of(self, batch: ProducedBatch) -> np.ndarray | None:
        """[N, H, W] uint8 view of a buffered batch's label maps (None without masks)."""
        if not self.key.targets.masks:
            return None
        return self.ring.view(batch.slot, (len(batch.sample_ids), *self.output_size), self.masks_offset)

    @property
    def cuda_ipc_handle(self) -> bytes:
        """The device ring's CUDA IPC handle (b"" without one)."""
        return b"" if self.device_ring is None else self.device_ring.handle.ipc_handle

    def close_ring(self) -> None:
        """Free the ring (unlink its shared-memory file, free its device memory); only once
        the thread has returned."""
        self.ring.close()
        if self.device_ring is not None:
            self.device_ring.close()

    # --- the production loop ---

    def held_up(self) -> bool:
        """Whether it cannot make its next batch now, its members holding every slot (read
        without the condition: a hint for decode groups)."""
        return self.blocked

    def ceiling(self) -> Cursor | None:
        """The first cursor this producer leaves to its member's old group (None: all)."""
        source = self.ceiling_source
        if source is None or source.stopped:
            return None
        return source.window_start

    def _may_dispatch(self) -> bool:
        """Whether the next batch may go to a worker now (the caller holds the condition)."""
        below = groups.below_ceiling(self._dispatch_cursor, self.ceiling())
        # Its member took everything up to the group's window: the group can take it back now.
        waiting = not below and not self._dispatched and bool(self.members) and all(
            member.next_sequence >= self.next_sequence for member in self.members
        )
        if waiting and not self.at_ceiling:
            self._wake_manager.set()
        self.at_ceiling = waiting
        group = self.decode_group
        sharing = group is not None and group.producers > 1
        read_ahead = self._sharing_read_ahead if sharing else self._read_ahead
        return len(self._dispatched) <= read_ahead and groups.may_produce(
            members=len(self.members),
            expected_members=self.expected_members,
            produced=self.next_sequence + len(self._dispatched),
            waited_seconds=time.monotonic() - self._created,
            group_wait_seconds=self._group_wait_seconds,
            needed_until_epoch=groups.needed_until([member.end_epoch for member in self.members]),
            cursor_epoch=self._dispatch_cursor[0],
            has_slot=self.slots.has_slot(),
            order_sessions=0 if group is None else group.sessions_opened,
            expected_order_sessions=self.expected_order_sessions,
            below_ceiling=below,
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
        self._update_window_start()
        cursor = self._dispatch_cursor
        ids = self._order_for(cursor[0])[cursor[1] : cursor[1] + self.key.batch_size]
        sequence = self.next_sequence + len(self._dispatched)
        self._dispatch_cursor = self.layout.next_cursor(cursor)
        until = groups.needed_until([member.end_epoch for member in self.members])
        made = self._workers.submit(self._make, slot, cursor, ids.tolist(), until)
        self._dispatched.append(Dispatched(sequence, cursor, slot, made))

    def _update_window_start(self) -> None:
        oldest = self.slots.oldest()
        self.window_start = self.cursor if oldest is None else self.slots.get(oldest).cursor

    def _decode_step(self, cursor: Cursor, until_epoch: int | None) -> BatchDecode | None:
        """Where the batch at `cursor` takes its decoded images from (None: the backend
        decodes inside its own pipeline)."""
        if not self._decodes_apart:
            return None
        return BatchDecode(
            producer_id=self.id, cursor=cursor, following=self.layout.next_cursor(cursor), until_epoch=until_epoch,
            group=self.decode_group, cache=self._decoded_cache, tally=self.decode_tally, on_done=self._count_decodes,
        )

    def _count_decodes(self, decoded: int, shared: int, cached: int) -> None:
        self._counters.add(images_decoded=decoded, decode_shared=shared, decode_cached=cached)

    def _make(self, slot: int, cursor: Cursor, ids: list[int], until_epoch: int | None) -> tuple[Batch, float] | None:
        """One batch into its slot, on a worker: read the files (or take the read of the
        batch's decoder in the decode group) and draw the plans, then augment at a turn (or
        have the decoder augment it). None when the producer stopped before the backend took
        it (nobody waits for it then)."""
        started = time.perf_counter()
        if self.stopped:
            return None
        out = None if self._writes_device else self.ring.view_for_writing(slot, (len(ids), *self.output_size, 3))
        device_pointer = self.device_ring.slot_pointer(slot) if self._writes_device else None
        targets = self.key.targets
        masks_out = self.ring.view(slot, (len(ids), *self.output_size), self.masks_offset) if targets.masks else None
        decoded = self._decode_step(cursor, until_epoch)
        read_files = partial(read_sources, self.dataset.manifest, ids)
        try:
            sources = read_files() if decoded is None else decoded.read(read_files)
            prepared = prepare_batch(
                self.spec, self.key.seed, cursor[0], sources, self._policy, out=out, output_size=self.output_size, headers=self._headers
            )
            if targets.any:
                load_targets(prepared, self.dataset.manifest.targets, targets)
            result = run_batch(self._backend, prepared, decoded, self._turn, device_pointer)
        except _Stopped:
            return None
        finally:
            if decoded is not None:
                decoded.close()
        batch = finish_batch(prepared, result, masks_out)
        if self.device_ring is not None and not self._writes_device and len(batch.sample_ids):
            self.device_ring.write(slot, batch.images)
        if decoded is None:
            self._counters.add(images_decoded=len(batch.sample_ids))
        return batch, time.perf_counter() - started

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """A fair turn at the backend; _Stopped instead when the producer stopped meanwhile."""
        with self._scheduler.turn():
            if self.stopped:
                raise _Stopped
            yield

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
            if self.decode_group is not None:
                self.decode_group.leave(self.id)
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
            targets=batch.targets,
        )
        self.slots.add(produced)
        for member in self.members:
            if member.next_sequence <= sequence:
                self.hold(member.id, sequence)
        self.next_sequence += 1
        self.cursor = next_cursor
        self._update_window_start()
