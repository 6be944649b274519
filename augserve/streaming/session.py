"""One client stream: a member of a producer, with its credits and the batches it was sent.

A session's state is guarded by the condition of the producer it is a member of at the time
(`with session.locked() as producer:`); the manager moves it to another producer while holding
the old one's condition, and a waiting session notices and follows. The stream of events it
yields (`Delivery`, `EpochEnded`, `StreamEnded`) is plain data: the rpc layer turns it into
messages.
"""

from __future__ import annotations

import itertools
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from augserve.core.errors import IdleError, SpecError, UnavailableError
from augserve.streaming.counters import Counters
from augserve.streaming.credits import CreditWindow
from augserve.streaming.cursor import Cursor
from augserve.streaming.keys import ResumeToken, StreamKey
from augserve.streaming.producer import Producer
from augserve.streaming.request import SessionRequest
from augserve.streaming.slots import ProducedBatch

WAIT_SECONDS = 1.0  # longest a waiting session sleeps before it looks again


@dataclass(frozen=True)
class StreamFacts:
    """What a client is told when its session opens."""

    session_id: str
    samples_per_epoch: int
    batches_per_epoch: int
    classes: tuple[str, ...]
    output_size: tuple[int, int]
    transport: str  # inband | shared_memory | cuda_ipc
    shm_name: str  # shared memory: the ring's file; else ""
    slot_bytes: int
    slot_count: int
    prefetch: int
    start_cursor: Cursor
    shared: bool  # the stream is (or will be) shared with other sessions
    cuda_ipc_handle: bytes = b""  # CUDA IPC: the ring's handle, on the GPU `cuda_device_uuid`
    cuda_device_uuid: bytes = b""


@dataclass(frozen=True, eq=False)
class Delivery:
    """One batch for the client. `images` ([count, H, W, 3] uint8 view of the slot) is set for
    in-band sessions and valid until the consumer asks for the next event; shared-memory
    sessions get the slot and segment name instead, CUDA IPC ones the slot and ring handle."""

    sequence: int  # the session's own numbering, from 0
    epoch: int
    position: int
    sample_ids: np.ndarray
    labels: np.ndarray
    skipped: tuple[str, ...]
    resume_token: bytes
    images: np.ndarray | None
    slot: int
    shm_name: str
    cuda_ipc_handle: bytes
    end_of_epoch: bool
    epoch_skipped: int
    samples_per_epoch: int
    owner: Producer
    owner_sequence: int
    # With targets asked for: per image its instances, and in-band the [count, H, W] label maps
    # (a view of the slot, as `images`); masks_offset: where they start in the slot (shared
    # memory) or in the chunks' payload (in-band: right after the images); None without masks.
    targets: list | None = None
    masks: np.ndarray | None = None
    masks_offset: int | None = None

    @property
    def count(self) -> int:
        return len(self.sample_ids)


@dataclass(frozen=True)
class EpochEnded:
    epoch: int
    samples: int
    skipped: int


@dataclass(frozen=True)
class StreamEnded:
    reason: str


Event = Delivery | EpochEnded | StreamEnded


class Session:
    """A stream of one client from `start_cursor` until `end_epoch` (None: endless)."""

    _ids = itertools.count(1)

    def __init__(
        self,
        request: SessionRequest,
        key: StreamKey,
        start_cursor: Cursor,
        end_epoch: int | None,
        prefetch: int,
        counters: Counters,
        idle_seconds: float = float("inf"),
        max_pause_seconds: float = 600.0,
    ) -> None:
        self.id = f"s{next(self._ids)}"
        self.request = request
        self.key = key
        self.start_cursor = start_cursor
        self.end_epoch = end_epoch
        self.prefetch = prefetch
        self.producer: Producer | None = None
        self.next_sequence = 0  # in the producer's numbering
        self.credits = CreditWindow(granted=prefetch)
        self.images_sent = 0
        # Shared memory: batches sent and not yet released, by the session's sequence number.
        # At most `prefetch` of them: what a client holds is bounded whatever credit it grants.
        self.outstanding: dict[int, tuple[Producer, int]] = {}
        self.last_token = b""
        self.last_consumed = time.monotonic()
        self.last_activity = self.last_consumed  # any client message or delivery
        self.idle_seconds = idle_seconds
        # A pause the client announced ends here (time.monotonic()); in the past: not paused.
        self.paused_until = 0.0
        self.max_pause_seconds = max_pause_seconds
        # The group this session was detached from, while it may go back to it (the manager's).
        self.detached_from: Producer | None = None
        self.detached_at = 0.0  # time.monotonic() of the latest detach
        self.cancelled = False
        self.failure: Exception | None = None
        self.facts: StreamFacts | None = None
        self._counters = counters

    # --- membership (the caller holds the condition of `producer`) ---

    def attach(self, producer: Producer, sequence: int) -> None:
        """Become a member of `producer` from its batch `sequence` on, taking references to
        the batches from there that are still buffered."""
        self.producer = producer
        self.next_sequence = sequence
        for later, _ in sorted(producer.slots.batches.items()):
            if later >= sequence:
                producer.hold(self.id, later)
        producer.members.append(self)

    @contextmanager
    def locked(self) -> Iterator[Producer]:
        """Hold the condition that guards this session now (it moves when the session does)."""
        while True:
            producer = self.producer
            with producer.condition:
                if self.producer is producer:
                    yield producer
                    return

    # --- what the client says (reader thread, grpc callbacks, the manager) ---

    def grant(self, batches: int) -> None:
        with self.locked() as producer:
            self.credits.grant(batches)
            self.last_activity = time.monotonic()
            producer.condition.notify_all()

    def release_slot(self, session_sequence: int) -> None:
        """The client is done with a shared-memory batch: its slot may be reused."""
        with self.locked() as producer:
            owner = self.outstanding.pop(session_sequence, None)
            self.last_activity = time.monotonic()
            if owner is not None:
                self.last_consumed = self.last_activity
            if owner is not None and owner[0] is producer:
                producer.drop(self.id, owner[1])
                producer.condition.notify_all()
                return
        if owner is not None:  # sent by a producer this session has since left
            with owner[0].condition:
                owner[0].drop(self.id, owner[1])
                owner[0].condition.notify_all()

    def pause(self, seconds: float) -> None:
        """The client stops reading for up to `seconds` (validation, a checkpoint; 0: the
        server's `max_pause_seconds`): its group waits for it rather than detaching it as
        stalled. A pause ends at most `max_pause_seconds` after the session last consumed a
        batch, however often it is renewed, so no client holds its group back for longer."""
        if not math.isfinite(seconds) or seconds < 0:
            raise SpecError("pause.seconds", f"{seconds} is not a number of seconds >= 0")
        with self.locked() as producer:
            now = time.monotonic()
            length = self.max_pause_seconds if seconds == 0 else min(seconds, self.max_pause_seconds)
            self.paused_until = min(now + length, self.last_consumed + self.max_pause_seconds)
            self.last_activity = now
            self._counters.add(pauses=1)
            producer.condition.notify_all()

    def resume(self) -> None:
        """The client reads again: a pause in progress ends now (its stall clock starts now)."""
        with self.locked() as producer:
            now = time.monotonic()
            self.paused_until = min(self.paused_until, now)
            self.last_activity = now
            producer.condition.notify_all()

    def paused(self, now: float) -> bool:
        return self.paused_until > now

    def fail(self, error: Exception) -> None:
        """End the stream with `error` at its next step."""
        with self.locked() as producer:
            if self.failure is None:
                self.failure = error
            producer.condition.notify_all()

    def cancel(self) -> None:
        with self.locked() as producer:
            self.cancelled = True
            producer.condition.notify_all()

    # --- the stream (handler thread) ---

    def events(self) -> Iterator[Event]:
        """Deliveries, epoch ends and the end; raises the error that ends the stream."""
        if self.end_epoch is not None and self.start_cursor[0] >= self.end_epoch:
            yield StreamEnded(f"finished {self.end_epoch} epochs")
            return
        while True:
            delivery = self._next_delivery()
            if delivery is None:
                return
            yield delivery
            if delivery.images is not None:  # in-band: the consumer has copied the pixels
                with delivery.owner.condition:
                    delivery.owner.drop(self.id, delivery.owner_sequence)
                    delivery.owner.condition.notify_all()
            if delivery.end_of_epoch:
                yield EpochEnded(delivery.epoch, delivery.samples_per_epoch, delivery.epoch_skipped)
                if self.end_epoch is not None and delivery.epoch + 1 >= self.end_epoch:
                    if self._await_releases():
                        yield StreamEnded(f"finished {self.end_epoch} epochs")
                    return

    def _await_releases(self) -> bool:
        """Before a shared-memory or CUDA IPC stream ends, wait until the client has released
        every slot it was sent. The ring is freed with the session, and a client maps a ring by
        name only when it reads the message naming it, which may be after a short stream has
        been produced and sent whole. A client releases a batch when it asks for the next one,
        so this costs the end of a stream one round trip. True when the stream may end (also
        after `idle_seconds` without word from the client), False if it was cancelled; raises
        the failure that ends it meanwhile (a bad message, the server shutting down)."""
        if not self.key.slotted:
            return True
        while True:
            producer = self.producer
            with producer.condition:
                while self.producer is producer:
                    if self.cancelled:
                        return False
                    if self.failure is not None:
                        raise self.failure
                    if not self.outstanding or self._idle_expired(time.monotonic()):
                        return True
                    producer.condition.wait(timeout=min(WAIT_SECONDS, self.idle_seconds))

    def _idle_expired(self, now: float) -> bool:
        """No word from the client, nor a pause covering the silence, for `idle_seconds`."""
        return now - max(self.last_activity, self.paused_until) > self.idle_seconds

    def _next_delivery(self) -> Delivery | None:
        while True:
            producer = self.producer
            with producer.condition:
                while self.producer is producer:
                    if self.cancelled:
                        return None
                    if self.failure is not None:
                        raise self.failure
                    ready = producer.slots.get(self.next_sequence)
                    if ready is not None and self.credits.may_send and len(self.outstanding) < self.prefetch:
                        return self._deliver(producer, ready)
                    if ready is None and producer.error is not None:
                        raise producer.error
                    if ready is None and producer.stopped:
                        raise UnavailableError("the producer of this stream stopped; reconnect with the last resume token")
                    if ready is not None and self._idle_expired(time.monotonic()):
                        raise IdleError(
                            f"closed: batches were ready but no credit came for {self.idle_seconds:g} s "
                            "(limit idle_session_seconds); reopen with the last resume token"
                        )
                    producer.condition.wait(timeout=min(WAIT_SECONDS, self.idle_seconds))

    def _deliver(self, producer: Producer, batch: ProducedBatch) -> Delivery:
        sequence = self.credits.sent
        self.credits.use()
        self.next_sequence += 1
        self.last_activity = time.monotonic()
        token = ResumeToken(self.key.token_hash, *batch.next_cursor).encode()
        self.last_token = token
        slotted = self.key.slotted
        if slotted:
            self.outstanding[sequence] = (producer, batch.sequence)
        else:
            self.last_consumed = time.monotonic()  # in-band, a batch sent is a batch taken
        count = len(batch.sample_ids)
        self.images_sent += count
        self._counters.add(batches_delivered=1, images_delivered=count)
        return Delivery(
            sequence=sequence,
            epoch=batch.epoch,
            position=batch.position,
            sample_ids=batch.sample_ids,
            labels=batch.labels,
            skipped=tuple(batch.skipped),
            resume_token=token,
            images=None if slotted else producer.images_of(batch),
            slot=batch.slot,
            shm_name=producer.ring.name or "",
            cuda_ipc_handle=producer.cuda_ipc_handle,
            targets=batch.targets,
            masks=None if slotted else producer.masks_of(batch),
            masks_offset=self._masks_offset(producer, count),
            end_of_epoch=batch.end_of_epoch,
            epoch_skipped=batch.epoch_skipped,
            samples_per_epoch=producer.layout.samples_per_epoch,
            owner=producer,
            owner_sequence=batch.sequence,
        )

    def _masks_offset(self, producer: Producer, count: int) -> int | None:
        """Where a batch's label maps start: in the slot (shared memory), or after the images in
        the chunks' payload (in-band); None without masks."""
        if not self.key.targets.masks:
            return None
        if self.key.shared_memory:
            return producer.masks_offset
        return count * producer.output_size[0] * producer.output_size[1] * 3

    def take_outstanding(self) -> dict[int, tuple[Producer, int]]:
        """Forget the sent, unreleased batches (closing); the caller drops their references."""
        outstanding, self.outstanding = self.outstanding, {}
        return outstanding
