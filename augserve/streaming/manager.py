"""Sessions, the producers that feed them, and the limits that keep the server healthy.

A producer makes the batches of one stream (dataset, split, spec, seed, batch size, shard,
bad-image policy, memory kind) from a start cursor, writing each batch once into a slot of its
ring. Sessions are its members: each has a read position in the producer's sequence, credits
granted by its client, and references to the slots it has not yet released. A slot is reused
when every member has released it, so the ring bounds memory and a slow member holds its
group back (lockstep) until it is detached onto a producer of its own, which continues with the
same batches because plans and order are pure functions of the stream and the cursor.

Released batches stay in the ring until their slot is needed, so a session that opens a little
after its group can still join at its own start; one that comes later starts a producer of its
own at its own cursor. A session may ask the new group to wait for `group_size` members (a
sweep knows how many of its trainers share a stream) before producing.

One lock and condition guard all of this state; the expensive work (reading files, augmenting)
runs outside it. Producers take turns at the backend through a `FairScheduler`.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from augserve._proto.augserve.v1 import augserve_pb2 as pb
from augserve.backends.base import Backend
from augserve.data.datasets import Dataset, epoch_order
from augserve.core.errors import BadImageError, LimitError, NotFoundError, SpecError, UnavailableError
from augserve.core.images import HeaderCache
from augserve.backends.batch import SourceImage, augment_batch
from augserve.core.policy import BadImagePolicy
from augserve.streaming.scheduler import FairScheduler
from augserve.core.spec import MAX_OPS, AugmentSpec
from augserve.transport.ring import SlotRing, probe_matches, shared_memory_available
from augserve.rpc.convert import ResumeToken, SessionRequest, fill_tensor, stream_hash

log = logging.getLogger(__name__)

BATCH_OVERHEAD_BYTES = 1 << 20  # room for labels, ids, tokens and skipped names in a message


@dataclass(frozen=True)
class Limits:
    """Server limits. Each one exceeded is answered with a clear status."""

    max_sessions: int = 64
    max_batch_size: int = 1024
    max_output_pixels: int = 4096 * 4096  # per image
    max_spec_ops: int = MAX_OPS
    max_prefetch: int = 16
    default_prefetch: int = 4
    max_batch_bytes: int = 256 << 20  # images of one batch
    max_buffer_bytes: int = 4 << 30  # all producers' rings together
    max_decoded_pixels: int = 40_000_000  # per source image (decompression bombs)
    group_window: int = 8  # slots beyond a producer's prefetch, for members to drift apart
    stall_seconds: float = 30.0  # a lockstep member that long without progress is detached
    group_wait_seconds: float = 30.0  # longest a new group waits for its announced members

    def __post_init__(self) -> None:
        for name in ("max_sessions", "max_batch_size", "max_output_pixels", "max_prefetch", "default_prefetch"):
            if getattr(self, name) < 1:
                raise SpecError(name, "must be at least 1")
        if self.default_prefetch > self.max_prefetch:
            raise SpecError("default_prefetch", f"is over max_prefetch {self.max_prefetch}")
        if self.group_window < 1:
            raise SpecError("group_window", "must be at least 1")

    @property
    def max_message_bytes(self) -> int:
        return self.max_batch_bytes + BATCH_OVERHEAD_BYTES

    def to_proto(self) -> pb.Limits:
        return pb.Limits(
            max_sessions=self.max_sessions,
            max_batch_size=self.max_batch_size,
            max_output_pixels=self.max_output_pixels,
            max_spec_ops=self.max_spec_ops,
            max_prefetch=self.max_prefetch,
            max_message_bytes=self.max_message_bytes,
            max_buffer_bytes=self.max_buffer_bytes,
        )


@dataclass(frozen=True)
class StreamKey:
    """What makes two sessions' batches identical (so they can share one producer)."""

    dataset: str
    fingerprint: str
    split: str
    spec_json: str
    seed: int
    batch_size: int
    shard_index: int
    shard_count: int
    drop_last: bool
    on_bad_image: str
    max_decoded_pixels: int
    shared_memory: bool

    @property
    def token_hash(self) -> str:
        """Identity for resume tokens: everything but the memory kind (transport may change)."""
        parts = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "shared_memory"}
        return stream_hash(parts)


@dataclass
class ProducedBatch:
    sequence: int
    epoch: int
    position: int
    slot: int
    sample_ids: np.ndarray
    labels: np.ndarray
    skipped: list[str]
    next_cursor: tuple[int, int]
    end_of_epoch: bool
    epoch_skipped: int
    references: int = 0


PRODUCTION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Counters:
    """Totals since the server started (read by GetServerInfo and the metrics endpoint)."""

    batches_produced: int = 0
    batches_delivered: int = 0
    images_delivered: int = 0
    images_skipped: int = 0
    sessions_opened: int = 0
    detached: int = 0
    # Seconds from a producer's turn at the backend to its batch being ready, as a histogram.
    production_bucket_counts: list[int] = field(default_factory=lambda: [0] * (len(PRODUCTION_BUCKETS) + 1))
    production_seconds_sum: float = 0.0

    def observe_production(self, seconds: float) -> None:
        index = next((i for i, bound in enumerate(PRODUCTION_BUCKETS) if seconds <= bound), len(PRODUCTION_BUCKETS))
        self.production_bucket_counts[index] += 1
        self.production_seconds_sum += seconds


class Producer:
    """Produces one stream's batches into a ring, from `cursor` on, in its own thread."""

    _ids = itertools.count()

    def __init__(
        self,
        manager: SessionManager,
        key: StreamKey,
        dataset: Dataset,
        spec: AugmentSpec,
        split_ids: np.ndarray,
        output_size: tuple[int, int],
        cursor: tuple[int, int],
        slot_count: int,
    ) -> None:
        self.id = next(self._ids)
        self.manager = manager
        self.key = key
        self.dataset = dataset
        self.spec = spec
        self.split_ids = split_ids
        self.shuffle = key.split != "validation"
        self.output_size = output_size
        self.cursor = cursor
        self.slot_bytes = key.batch_size * output_size[0] * output_size[1] * 3
        self.ring = SlotRing(slot_count, self.slot_bytes, key.shared_memory)
        self.free_slots = list(range(slot_count))
        self.members: list[Session] = []
        self.expected_members = 1
        self.created = time.monotonic()
        self.batches: dict[int, ProducedBatch] = {}
        self.next_sequence = 0
        self.error: BaseException | None = None
        self.stopped = False
        self.epoch_skipped: dict[int, int] = {}
        self._order_epoch = -1
        self._order = np.empty(0, np.int64)
        self.thread = threading.Thread(target=self._run, name=f"augserve-producer-{self.id}", daemon=True)

    # --- cursor arithmetic (pure) ---

    @property
    def samples_per_epoch(self) -> int:
        return len(range(self.key.shard_index, len(self.split_ids), self.key.shard_count))

    def batch_count(self) -> int:
        samples = self.samples_per_epoch
        if self.key.drop_last:
            return samples // self.key.batch_size
        return math.ceil(samples / self.key.batch_size)

    def _order_for(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order = epoch_order(
                self.split_ids, self.key.seed, epoch, self.key.shard_index, self.key.shard_count, self.shuffle
            )
            self._order_epoch = epoch
        return self._order

    def _next_cursor(self, epoch: int, position: int) -> tuple[int, int]:
        following = position + self.key.batch_size
        if following >= self.samples_per_epoch or (self.key.drop_last and following + self.key.batch_size > self.samples_per_epoch):
            return (epoch + 1, 0)
        return (epoch, following)

    # --- the production loop ---

    def _end_epoch(self) -> int | None:
        """First epoch no member needs (None: some member is endless)."""
        ends = [member.end_epoch for member in self.members]
        return None if any(end is None for end in ends) else max(ends, default=0)

    def _may_produce(self) -> bool:
        end = self._end_epoch()
        gathering = (
            self.next_sequence == 0  # only before the first batch: members may leave later
            and len(self.members) < self.expected_members
            and time.monotonic() - self.created < self.manager.limits.group_wait_seconds
        )
        return bool(self.members) and not gathering and (end is None or self.cursor[0] < end) and self._has_slot()

    def _has_slot(self) -> bool:
        return bool(self.free_slots) or any(batch.references == 0 for batch in self.batches.values())

    def _take_slot(self) -> int:
        """A free slot, else the slot of the oldest batch nobody references any more."""
        if self.free_slots:
            return self.free_slots.pop(0)
        oldest = min(sequence for sequence, batch in self.batches.items() if batch.references == 0)
        return self.batches.pop(oldest).slot

    def _run(self) -> None:
        manager = self.manager
        try:
            while True:
                with manager.condition:
                    while not self.stopped and not self._may_produce():
                        manager.release_stragglers(self)
                        if self._may_produce():
                            break
                        manager.condition.wait(timeout=1.0)
                    if self.stopped:
                        return
                    slot = self._take_slot()
                    epoch, position = self.cursor
                    sequence = self.next_sequence
                    ids = self._order_for(epoch)[position : position + self.key.batch_size]
                try:
                    started = time.perf_counter()
                    batch = self._produce(epoch, ids, slot)
                    production_seconds = time.perf_counter() - started
                except BaseException as error:
                    with manager.condition:
                        self.error = error
                        self.free_slots.append(slot)
                        manager.condition.notify_all()
                    if not isinstance(error, BadImageError):
                        log.exception("producer %d failed", self.id)
                    return
                with manager.condition:
                    next_cursor = self._next_cursor(epoch, position)
                    skipped_total = self.epoch_skipped.get(epoch, 0) + len(batch.skipped)
                    self.epoch_skipped[epoch] = skipped_total
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
                    )
                    self.batches[sequence] = produced
                    for member in self.members:
                        if member.next_sequence <= sequence:
                            member.take(self, produced)
                    self.next_sequence += 1
                    self.cursor = next_cursor
                    manager.counters.batches_produced += 1
                    manager.counters.images_skipped += len(batch.skipped)
                    manager.counters.observe_production(production_seconds)
                    manager.condition.notify_all()
        finally:
            with manager.condition:
                self.stopped = True
                manager.producer_finished(self)
                manager.condition.notify_all()
            self.ring.close()

    def _produce(self, epoch: int, ids: np.ndarray, slot: int):
        manifest = self.dataset.manifest
        sources = []
        for sample_id in ids.tolist():
            path = manifest.path(sample_id)
            identity = None
            try:
                with open(path, "rb") as handle:
                    status = os.fstat(handle.fileno())
                    identity = (status.st_size, status.st_mtime_ns)
                    data = handle.read()
            except OSError as error:
                data = b""  # an unreadable file is a bad image: policy decides
                log.warning("cannot read %s: %s", path, error)
            sources.append(SourceImage(sample_id, int(manifest.labels[sample_id]), path, data, identity))
        out = self.ring.view(slot, (len(ids), *self.output_size, 3))
        policy = self.manager.request_policy(self.key)
        with self.manager.scheduler.turn():
            return augment_batch(
                self.manager.backend, self.spec, self.key.seed, epoch, sources, policy, out=out, headers=self.manager.headers
            )

    # --- references (called with the manager's lock held) ---

    def release(self, sequence: int) -> None:
        """One reference fewer; at none the batch stays readable until its slot is reused."""
        batch = self.batches.get(sequence)
        if batch is not None and batch.references > 0:
            batch.references -= 1

    def cursor_of(self, sequence: int) -> tuple[int, int] | None:
        if sequence == self.next_sequence:
            return self.cursor
        batch = self.batches.get(sequence)
        return None if batch is None else (batch.epoch, batch.position)

    def images_of(self, batch: ProducedBatch) -> np.ndarray:
        return self.ring.view(batch.slot, (len(batch.sample_ids), *self.output_size, 3))


class Session:
    """One client stream: a member of a producer, with credits and slot references."""

    _ids = itertools.count(1)

    def __init__(
        self,
        manager: SessionManager,
        request: SessionRequest,
        key: StreamKey,
        start_cursor: tuple[int, int],
        end_epoch: int | None,
    ) -> None:
        self.id = f"s{next(self._ids)}"
        self.start_cursor = start_cursor
        self.manager = manager
        self.request = request
        self.key = key
        self.end_epoch = end_epoch
        self.prefetch = request.prefetch or manager.limits.default_prefetch
        self.producer: Producer | None = None
        self.next_sequence = 0  # in the producer's numbering
        self.granted = self.prefetch  # batches the client has room for, in total
        self.sent = 0  # batches sent; also the session's own sequence number
        self.images_sent = 0
        self.held: dict[tuple[int, int], None] = {}  # (producer id, sequence) still referenced
        self.outstanding: dict[int, tuple[Producer, int]] = {}  # shm: session sequence -> slot owner
        self.last_token = b""
        self.last_progress = time.monotonic()
        self.cancelled = False
        self.protocol_error: SpecError | None = None

    # --- called with the manager's lock held ---

    def take(self, producer: Producer, batch: ProducedBatch) -> None:
        batch.references += 1
        self.held[(producer.id, batch.sequence)] = None

    def release_all(self) -> None:
        for (producer_id, sequence) in list(self.held):
            producer = self.manager.producers.get(producer_id)
            if producer is not None:
                producer.release(sequence)
        self.held.clear()
        self.outstanding.clear()

    def release_unsent(self) -> None:
        """Drop references to batches not yet sent (before moving to another producer)."""
        producer = self.producer
        for key in [key for key in self.held if key[0] == producer.id and key[1] >= self.next_sequence]:
            del self.held[key]
            producer.release(key[1])

    # --- client messages (reader thread) ---

    def grant(self, batches: int) -> None:
        with self.manager.condition:
            # More credit than the prefetch window past what was sent is pointless: cap it.
            self.granted = min(self.granted + batches, self.sent + self.manager.limits.max_prefetch)
            self.last_progress = time.monotonic()
            self.manager.condition.notify_all()

    def release_slot(self, session_sequence: int) -> None:
        with self.manager.condition:
            owner = self.outstanding.pop(session_sequence, None)
            if owner is None:
                return  # unknown or already released: harmless
            producer, sequence = owner
            if self.held.pop((producer.id, sequence), "absent") is None:
                producer.release(sequence)
            self.last_progress = time.monotonic()
            self.manager.condition.notify_all()

    def fail(self, error: SpecError) -> None:
        with self.manager.condition:
            self.protocol_error = error
            self.manager.condition.notify_all()

    def cancel(self) -> None:
        with self.manager.condition:
            self.cancelled = True
            self.manager.condition.notify_all()

    # --- the stream of server messages (handler thread) ---

    def info(self) -> pb.SessionInfo:
        producer = self.producer
        start_epoch, start_position = self.start_cursor
        return pb.SessionInfo(
            session_id=self.id,
            samples_per_epoch=producer.samples_per_epoch,
            batches_per_epoch=producer.batch_count(),
            classes=list(producer.dataset.manifest.classes),
            backend=self.manager.backend.name,
            output_size=list(producer.output_size),
            transport=pb.TRANSPORT_SHARED_MEMORY if self.key.shared_memory else pb.TRANSPORT_INBAND,
            shm_name=producer.ring.name or "",
            slot_bytes=producer.slot_bytes,
            slot_count=producer.ring.slot_count,
            prefetch=self.prefetch,
            start_epoch=start_epoch,
            start_position=start_position,
            shared=len(producer.members) > 1 or producer.expected_members > 1,
        )

    def messages(self) -> Iterator[pb.ServerMessage]:
        """Batch, EpochEnd and End messages; raises the error that ends the stream."""
        manager = self.manager
        if self.end_epoch is not None and self.start_cursor[0] >= self.end_epoch:
            yield pb.ServerMessage(end=pb.End(reason=f"finished {self.end_epoch} epochs"))
            return
        while True:
            with manager.condition:
                while True:
                    producer = self.producer
                    if self.cancelled:
                        return
                    if self.protocol_error is not None:
                        raise self.protocol_error
                    ready = producer.batches.get(self.next_sequence)
                    if ready is not None and self.sent < self.granted:
                        break
                    if ready is None and producer.error is not None:
                        raise producer.error
                    if manager.shutting_down:
                        raise UnavailableError("server is shutting down; reconnect with the last resume token")
                    if ready is None and producer.stopped:
                        raise UnavailableError("the producer of this stream stopped")
                    manager.condition.wait(timeout=1.0)
                batch = ready
                self.next_sequence += 1
                self.last_progress = time.monotonic()
                message = self._batch_message(producer, batch)
                self.sent += 1
                self.images_sent += len(batch.sample_ids)
                manager.counters.batches_delivered += 1
                manager.counters.images_delivered += len(batch.sample_ids)
            if not self.key.shared_memory:
                # Copy the pixels outside the lock (the reference keeps the slot), then let go.
                fill_tensor(message.batch.images, producer.images_of(batch))
                with manager.condition:
                    if self.held.pop((producer.id, batch.sequence), "absent") is None:
                        producer.release(batch.sequence)
                    manager.condition.notify_all()
            yield message
            if batch.end_of_epoch:
                yield pb.ServerMessage(
                    epoch_end=pb.EpochEnd(epoch=batch.epoch, samples=producer.samples_per_epoch, skipped=batch.epoch_skipped)
                )
                if self.end_epoch is not None and batch.epoch + 1 >= self.end_epoch:
                    yield pb.ServerMessage(end=pb.End(reason=f"finished {self.end_epoch} epochs"))
                    return

    def _batch_message(self, producer: Producer, batch: ProducedBatch) -> pb.ServerMessage:
        """The batch's message, built in place (a nested message given to a constructor is
        copied); in-band pixels are added by the caller, outside the lock."""
        token = ResumeToken(self.key.token_hash, *batch.next_cursor).encode()
        self.last_token = token
        server_message = pb.ServerMessage()
        message = server_message.batch
        message.sequence = self.sent
        message.epoch = batch.epoch
        message.position = batch.position
        message.count = len(batch.sample_ids)
        message.labels.extend(batch.labels.tolist())
        message.sample_ids.extend(batch.sample_ids.tolist())
        message.resume_token = token
        message.skipped.extend(batch.skipped)
        if self.key.shared_memory:
            message.slot = batch.slot
            message.shm_name = producer.ring.name or ""
            self.outstanding[self.sent] = (producer, batch.sequence)
        return server_message


@dataclass
class SessionManager:
    """All sessions and producers of a server, the backend they share, and the limits."""

    backend: Backend
    datasets: dict[str, Dataset]
    limits: Limits = field(default_factory=Limits)
    scheduler: FairScheduler = field(default_factory=FairScheduler)
    condition: threading.Condition = field(default_factory=threading.Condition)
    sessions: dict[str, Session] = field(default_factory=dict)
    producers: dict[int, Producer] = field(default_factory=dict)
    counters: Counters = field(default_factory=Counters)
    headers: HeaderCache = field(default_factory=HeaderCache)
    shutting_down: bool = False

    # --- opening ---

    def open(self, request: SessionRequest) -> Session:
        dataset = self.datasets.get(request.dataset)
        if dataset is None:
            raise NotFoundError(f"open.dataset: no dataset named {request.dataset!r}; this server serves {sorted(self.datasets)}")
        limits = self.limits
        if request.batch_size > limits.max_batch_size:
            raise LimitError(f"open.batch_size: {request.batch_size} is over the limit of {limits.max_batch_size}")
        if request.prefetch > limits.max_prefetch:
            raise LimitError(f"open.prefetch: {request.prefetch} is over the limit of {limits.max_prefetch}")
        if request.group_size > limits.max_sessions:
            raise LimitError(f"open.group_size: {request.group_size} is over the limit of {limits.max_sessions} sessions")
        if len(request.spec.ops) > limits.max_spec_ops:
            raise LimitError(f"open.spec.ops: {len(request.spec.ops)} ops is over the limit of {limits.max_spec_ops}")
        split_ids = dataset.split_ids(request.split)
        output_size = request.spec.fixed_output_size or dataset.manifest.uniform_size(split_ids)
        if output_size is None:
            raise SpecError(
                "open.spec.ops",
                f"images of dataset {request.dataset!r} differ in size and the spec does not fix an output size; "
                "add crop, resize or random_resized_crop",
            )
        if output_size[0] * output_size[1] > limits.max_output_pixels:
            raise LimitError(f"open.spec: output {output_size[0]}x{output_size[1]} is over the limit of {limits.max_output_pixels} pixels")
        batch_bytes = request.batch_size * output_size[0] * output_size[1] * 3
        if batch_bytes > limits.max_batch_bytes:
            raise LimitError(f"open.batch_size: a batch of {batch_bytes} bytes is over the limit of {limits.max_batch_bytes}")
        shard_samples = len(range(request.shard_index, len(split_ids), request.shard_count))
        if shard_samples == 0:
            raise SpecError("open.shard_count", f"shard {request.shard_index} of {request.shard_count} has no samples of split {request.split!r}")
        if request.drop_last and shard_samples < request.batch_size:
            raise SpecError("open.drop_last", f"the shard has {shard_samples} samples, fewer than one batch of {request.batch_size}")
        shared_memory = self._wants_shared_memory(request)
        key = StreamKey(
            dataset=request.dataset,
            fingerprint=dataset.manifest.fingerprint,
            split=request.split,
            spec_json=request.spec.to_json(),
            seed=request.seed,
            batch_size=request.batch_size,
            shard_index=request.shard_index,
            shard_count=request.shard_count,
            drop_last=request.drop_last,
            on_bad_image=request.bad_image_policy.on_bad_image,
            max_decoded_pixels=request.bad_image_policy.max_pixels,
            shared_memory=shared_memory,
        )
        cursor = (0, 0)
        if request.resume is not None:
            if request.resume.stream_hash != key.token_hash:
                raise SpecError(
                    "open.resume_token",
                    "issued for a different stream (dataset, its files, split, spec, seed, batch size, shard or policy differ)",
                )
            if request.resume.position >= shard_samples:
                raise SpecError("open.resume_token", f"position {request.resume.position} is past the shard's {shard_samples} samples")
            cursor = (request.resume.epoch, request.resume.position)
        end_epoch = request.epochs or None
        with self.condition:
            if self.shutting_down:
                raise UnavailableError("server is shutting down")
            if len(self.sessions) >= limits.max_sessions:
                raise LimitError(f"server is full: {limits.max_sessions} sessions are open (limit max_sessions)")
            session = Session(self, request, key, cursor, end_epoch)
            producer = None if request.group_policy == "alone" else self._joinable(key, cursor)
            if producer is None:
                slot_count = session.prefetch + limits.group_window
                needed = slot_count * batch_bytes
                if self.buffer_bytes + needed > limits.max_buffer_bytes:
                    raise LimitError(
                        f"server memory budget exhausted: this stream needs {needed} bytes of batch buffers, "
                        f"{limits.max_buffer_bytes - self.buffer_bytes} are left (limit max_buffer_bytes)"
                    )
                producer = Producer(self, key, dataset, request.spec, split_ids, output_size, cursor, slot_count)
                producer.expected_members = max(1, request.group_size)
                self.producers[producer.id] = producer
                self._attach(session, producer, producer.next_sequence)
                producer.thread.start()
            else:
                self._attach(session, producer, self._sequence_at(producer, cursor))
            self.sessions[session.id] = session
            self.counters.sessions_opened += 1
            self.condition.notify_all()
        log.info(
            "session %s opened: dataset=%s split=%s batch=%d seed=%d shard=%d/%d transport=%s producer=%d%s",
            session.id, key.dataset, key.split, key.batch_size, key.seed, key.shard_index, key.shard_count,
            "shared_memory" if shared_memory else "inband", producer.id, " (shared)" if len(producer.members) > 1 else "",
        )
        return session

    @staticmethod
    def _wants_shared_memory(request: SessionRequest) -> bool:
        """auto: shared memory when the client proved it shares this host's /dev/shm."""
        if request.transport == "inband":
            return False
        possible = shared_memory_available() and probe_matches(request.shm_probe_name, request.shm_probe_nonce)
        if request.transport == "shared_memory" and not possible:
            raise SpecError("open.transport", "shared memory needs the client on the server's host (its probe file was not found)")
        return possible

    def _joinable(self, key: StreamKey, cursor: tuple[int, int]) -> Producer | None:
        for producer in self.producers.values():
            if producer.key == key and not producer.stopped and producer.error is None and producer.members:
                if self._sequence_at(producer, cursor) is not None:
                    return producer
        return None

    @staticmethod
    def _sequence_at(producer: Producer, cursor: tuple[int, int]) -> int | None:
        """The sequence of the batch starting at `cursor`, if still buffered or next."""
        if producer.cursor == cursor:
            return producer.next_sequence
        for sequence, batch in producer.batches.items():
            if (batch.epoch, batch.position) == cursor:
                return sequence
        return None

    def _attach(self, session: Session, producer: Producer, sequence: int) -> None:
        session.producer = producer
        session.next_sequence = sequence
        for later, batch in sorted(producer.batches.items()):
            if later >= sequence:
                session.take(producer, batch)
        producer.members.append(session)

    # --- stragglers (called by producers waiting for a slot, lock held) ---

    def release_stragglers(self, producer: Producer) -> None:
        """Detach members that hold the group back: detach-policy members a window behind, and
        any member without progress for `stall_seconds`."""
        if producer._has_slot() or len(producer.members) < 2 or not producer.batches:
            return
        oldest = min(producer.batches)
        now = time.monotonic()
        for member in list(producer.members):
            if (producer.id, oldest) not in member.held:
                continue
            behind = producer.next_sequence - member.next_sequence
            too_far = member.request.group_policy == "detach" and behind >= self.limits.group_window
            stalled = now - member.last_progress > self.limits.stall_seconds
            if too_far or stalled:
                self.detach(member, "fell behind its group" if too_far else "stalled")

    def detach(self, member: Session, reason: str) -> None:
        old = member.producer
        cursor = old.cursor_of(member.next_sequence)
        member.release_unsent()
        old.members.remove(member)
        slot_count = member.prefetch + self.limits.group_window
        producer = Producer(self, old.key, old.dataset, old.spec, old.split_ids, old.output_size, cursor, slot_count)
        self.producers[producer.id] = producer
        self._attach(member, producer, 0)
        self.counters.detached += 1
        producer.thread.start()
        log.info("session %s %s: detached from producer %d onto producer %d at epoch %d position %d",
                 member.id, reason, old.id, producer.id, *cursor)
        self.condition.notify_all()

    # --- closing ---

    def close(self, session: Session) -> None:
        with self.condition:
            if self.sessions.pop(session.id, None) is None:
                return
            session.release_all()
            producer = session.producer
            if producer is not None and session in producer.members:
                producer.members.remove(session)
                if not producer.members:
                    producer.stopped = True
            self.condition.notify_all()
        log.info("session %s closed after %d batches", session.id, session.sent)

    def producer_finished(self, producer: Producer) -> None:
        self.producers.pop(producer.id, None)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Refuse new sessions, end live ones with UNAVAILABLE, and wait for producers to stop."""
        with self.condition:
            self.shutting_down = True
            self.condition.notify_all()
            deadline = time.monotonic() + timeout
            while self.sessions and time.monotonic() < deadline:
                self.condition.wait(timeout=0.1)
            for producer in self.producers.values():
                producer.stopped = True
            self.condition.notify_all()
            threads = [producer.thread for producer in self.producers.values()]
        for thread in threads:
            thread.join(timeout=max(0.1, deadline - time.monotonic()))

    # --- facts ---

    @staticmethod
    def request_policy(key: StreamKey) -> BadImagePolicy:
        return BadImagePolicy(key.on_bad_image, key.max_decoded_pixels)

    @property
    def buffer_bytes(self) -> int:
        return sum(producer.ring.slot_count * producer.slot_bytes for producer in self.producers.values())
