"""The session manager: every session and producer of a server, admission and one budget.

It opens sessions (checking the request against the server's limits and the memory budget),
joins them to a producer of the same stream where the stream's buffered batches still reach the
session's start, closes them, and carries out the group decisions (`groups.stragglers`,
`groups.rejoins`) in a supervisor thread of its own: producers only report that they are
blocked or that a detached member reached its old group. Producers of one dataset order (any
spec) share a `DecodeGroup`, and every producer the decoded-image cache. Its lock guards the
registries and the budget; each producer's condition guards that producer and its members
(lock order: manager, then producer; two producers' conditions only in id order, the older
first: a group before the producer made for a member detached from it).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from augserve.backends.base import Backend
from augserve.core.errors import LimitError, NotFoundError, SpecError, UnavailableError
from augserve.core.images import HeaderCache
from augserve.core.plan import MAX_EPOCH
from augserve.data.datasets import Dataset
from augserve.data.decoded import CacheStats, DecodedCache
from augserve.streaming import groups
from augserve.streaming.counters import CounterValues, Counters
from augserve.streaming.cursor import Cursor, shard_samples
from augserve.streaming.decoding import ByteBudget, DecodeGroup
from augserve.streaming.keys import StreamKey
from augserve.streaming.limits import Limits
from augserve.streaming.producer import Producer
from augserve.streaming.request import SessionRequest
from augserve.streaming.scheduler import FairScheduler
from augserve.streaming.session import Session, StreamFacts
from augserve.transport.cuda_ipc import CudaIpcDevice, DeviceRingExhausted
from augserve.transport.ring import SharedMemoryExhausted, probe_matches, shared_memory_available

log = logging.getLogger(__name__)

SUPERVISE_SECONDS = 0.25  # how often the supervisor looks at groups even when nobody woke it
# An in-band batch exists up to this many times while it is sent (the bytes taken from the slot,
# the message's copy, its serialization, gRPC's buffers); the budget reserves that per session.
INBAND_COPIES = 4


@dataclass(frozen=True)
class SessionSnapshot:
    session_id: str
    dataset: str
    images_sent: int
    batches_sent: int
    queue_depth: int  # batches made for it and not yet sent
    credits: int  # granted and not yet used


@dataclass(frozen=True)
class ProducerSnapshot:
    producer_id: int
    dataset: str
    members: int
    paused_members: int = 0
    detaches: int = 0  # members detached from it
    rejoins: int = 0  # detached members that came back to it
    batches_produced: int = 0
    images_decoded: int = 0  # decodes it ran itself
    decode_shared: int = 0  # images it took from another producer's decode (its decode group's)
    decode_cached: int = 0  # images it took from the decoded-image cache
    decode_producers: int = 1  # producers in its decode group (itself included)


@dataclass(frozen=True)
class ManagerSnapshot:
    """The manager's state at one moment, for GetServerInfo and the metrics endpoint."""

    sessions: tuple[SessionSnapshot, ...]
    producers: tuple[ProducerSnapshot, ...]
    counters: CounterValues
    buffer_bytes: int
    decoded_cache: CacheStats | None = None
    decode_share_bytes: int = 0  # decoded batches the decode groups keep for their producers


@dataclass
class SessionManager:
    """All sessions and producers of a server, the backend they share, and the limits."""

    backend: Backend
    datasets: dict[str, Dataset]
    limits: Limits = field(default_factory=Limits)
    scheduler: FairScheduler = field(default_factory=FairScheduler)
    sessions: dict[str, Session] = field(default_factory=dict)
    producers: dict[int, Producer] = field(default_factory=dict)
    counters: Counters = field(default_factory=Counters)
    headers: HeaderCache = field(default_factory=HeaderCache)
    cuda_ipc_device: CudaIpcDevice | None = None  # the GPU CUDA IPC rings live on; None: no CUDA IPC
    shutting_down: bool = False

    def __post_init__(self) -> None:
        self.decoded_cache = DecodedCache(self.limits.decoded_cache_bytes)
        self.decode_groups: dict[tuple, DecodeGroup] = {}  # by StreamKey.order_key
        self._decode_budget = ByteBudget(self.limits.decode_share_bytes)
        self._lock = threading.Lock()
        self._inband_bytes: dict[str, int] = {}  # per session: INBAND_COPIES batches, or 0
        self._wake = threading.Event()
        self._closed = False
        self._supervisor = threading.Thread(target=self._supervise, name="augserve-groups", daemon=True)
        self._supervisor.start()

    # --- opening ---

    def open(self, request: SessionRequest) -> Session:
        dataset, split_ids, output_size, shard_size = self._admit(request)
        transport = self._choose_transport(request)
        try:
            return self._open_on(request, dataset, split_ids, output_size, shard_size, transport)
        except SharedMemoryExhausted as error:
            if transport != "shared_memory" or request.transport != "auto":
                raise
            log.warning("%s; this session goes in-band", error)
            return self._open_on(request, dataset, split_ids, output_size, shard_size, "inband")
        except DeviceRingExhausted as error:
            if request.transport != "auto":
                raise
            log.warning("%s; this session goes over shared memory", error)
            return self._open_on(request, dataset, split_ids, output_size, shard_size, "shared_memory")

    def _open_on(
        self,
        request: SessionRequest,
        dataset: Dataset,
        split_ids,
        output_size: tuple[int, int],
        shard_size: int,
        transport: str,
    ) -> Session:
        """Open the session with the transport decided: join a producer of its stream, or
        start one within the budget."""
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
            shared_memory=transport == "shared_memory",
            targets=request.targets,
            cuda_ipc=transport == "cuda_ipc",
        )
        cursor = self._start_cursor(request, key, shard_size)
        prefetch = request.prefetch or self.limits.default_prefetch
        # Endless streams end after the last epoch plans can number.
        end_epoch = request.epochs or MAX_EPOCH + 1
        inband_bytes = 0 if key.slotted else INBAND_COPIES * request.batch_size * output_size[0] * output_size[1] * key.targets.pixel_bytes
        with self._lock:
            self._reap()
            if self.shutting_down:
                raise UnavailableError("server is shutting down")
            if len(self.sessions) >= self.limits.max_sessions:
                raise LimitError(f"server is full: {self.limits.max_sessions} sessions are open (limit max_sessions)")
            self._check_budget(inband_bytes, "this stream's in-band messages")
            session = Session(
                request, key, cursor, end_epoch, prefetch, self.counters, self.limits.idle_session_seconds,
                self.limits.max_pause_seconds,
            )
            alone = request.group_policy == "alone"
            producer = None if alone else self._join(session, cursor)
            if producer is None:
                producer = self._new_producer(
                    key, dataset, request.spec, split_ids, output_size, cursor,
                    prefetch, max(1, request.group_size), "this stream", reserved=inband_bytes,
                    decode_group=None if alone else self._decode_group(key),
                    expected_order_sessions=request.decode_group_size,
                )
                with producer.condition:
                    session.attach(producer, 0)
                    session.facts = self._facts(session, producer)
                self.producers[producer.id] = producer
                producer.start()
            self.sessions[session.id] = session
            self._inband_bytes[session.id] = inband_bytes
            self.counters.add(sessions_opened=1)
            if producer.decode_group is not None:
                self._count_order_session(producer.decode_group)
        log.info(
            "session %s opened: dataset=%s split=%s batch=%d seed=%d shard=%d/%d transport=%s producer=%d%s",
            session.id, key.dataset, key.split, key.batch_size, key.seed, key.shard_index, key.shard_count,
            transport, producer.id, " (shared)" if session.facts.shared else "",
        )
        return session

    def _admit(self, request: SessionRequest) -> tuple[Dataset, object, tuple[int, int], int]:
        """Check a request against the datasets and the limits: (dataset, split ids, output
        size, samples of the shard)."""
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
        if request.decode_group_size > limits.max_sessions:
            raise LimitError(
                f"open.decode_group_size: {request.decode_group_size} is over the limit of {limits.max_sessions} sessions"
            )
        if len(request.spec.ops) > limits.max_spec_ops:
            raise LimitError(f"open.spec.ops: {len(request.spec.ops)} ops is over the limit of {limits.max_spec_ops}")
        self._check_targets(request, dataset)
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
        batch_bytes = request.batch_size * output_size[0] * output_size[1] * request.targets.pixel_bytes
        if batch_bytes > limits.max_batch_bytes:
            raise LimitError(f"open.batch_size: a batch of {batch_bytes} bytes is over the limit of {limits.max_batch_bytes}")
        shard_size = shard_samples(len(split_ids), request.shard_index, request.shard_count)
        if shard_size == 0:
            raise SpecError("open.shard_count", f"shard {request.shard_index} of {request.shard_count} has no samples of split {request.split!r}")
        if request.drop_last and shard_size < request.batch_size:
            raise SpecError("open.drop_last", f"the shard has {shard_size} samples, fewer than one batch of {request.batch_size}")
        return dataset, split_ids, output_size, shard_size

    @staticmethod
    def _check_targets(request: SessionRequest, dataset: Dataset) -> None:
        """The targets asked for are ones the dataset's annotations have."""
        wanted = request.targets
        annotations = dataset.manifest.targets
        for name, asked, has in (
            ("boxes", wanted.boxes and not wanted.keypoints, annotations is not None and annotations.has_boxes),
            ("keypoints", wanted.keypoints, annotations is not None and annotations.has_keypoints),
            ("masks", wanted.masks, annotations is not None and annotations.has_masks),
        ):
            if asked and not has:
                kind = "no annotations" if annotations is None else f"annotations of kind {annotations.kind!r}"
                raise SpecError(f"open.targets.{name}", f"dataset {request.dataset!r} has {kind}, without {name}")

    @staticmethod
    def _start_cursor(request: SessionRequest, key: StreamKey, shard_size: int) -> Cursor:
        if request.resume is None:
            return (0, 0)
        if request.resume.stream_hash != key.token_hash:
            raise SpecError(
                "open.resume_token",
                "issued for a different stream (dataset, its files, split, spec, seed, batch size, shard or policy differ)",
            )
        if request.resume.position >= shard_size:
            raise SpecError("open.resume_token", f"position {request.resume.position} is past the shard's {shard_size} samples")
        return (request.resume.epoch, request.resume.position)

    def _choose_transport(self, request: SessionRequest) -> str:
        """auto: CUDA IPC to a client on this host and GPU, else shared memory when the client
        proved it shares this host's /dev/shm, else in-band. A transport asked for by name that
        cannot be is a SpecError saying why."""
        if request.transport == "inband":
            return "inband"
        same_host = shared_memory_available() and probe_matches(request.shm_probe_name, request.shm_probe_nonce)
        if request.transport == "shared_memory" and not same_host:
            raise SpecError("open.transport", "shared memory needs the client on the server's host (its probe file was not found)")
        if request.transport in ("auto", "cuda_ipc"):
            refusal = self._cuda_ipc_refusal(request, same_host)
            if refusal is None:
                return "cuda_ipc"
            if request.transport == "cuda_ipc":
                raise SpecError("open.transport", f"CUDA IPC: {refusal}")
        return "shared_memory" if same_host else "inband"

    def _cuda_ipc_refusal(self, request: SessionRequest, same_host: bool) -> str | None:
        """Why this session cannot have CUDA IPC, or None when it can."""
        device = self.cuda_ipc_device
        if device is None:
            return "this server keeps no batches on a GPU (a CPU backend without cuda_ipc_device, or no CUDA driver)"
        if not request.cuda_device_uuid:
            return "the client named no GPU (open.cuda_device_uuid)"
        if request.cuda_device_uuid != device.uuid:
            return f"the client's GPU {request.cuda_device_uuid.hex()} is not the server's GPU {device.uuid.hex()}"
        if not same_host:
            return "the client is not on the server's host (its shared-memory probe was not found)"
        if request.targets.masks:
            return "label masks travel in-band or over shared memory only (open.targets.masks)"
        return None

    def _decode_group(self, key: StreamKey) -> DecodeGroup:
        """The decode group of `key`'s dataset order (manager lock held)."""
        group = self.decode_groups.get(key.order_key)
        if group is None:
            group = self.decode_groups[key.order_key] = DecodeGroup(key.order_key, self._decode_budget)
        return group

    def _count_order_session(self, group: DecodeGroup) -> None:
        """A session opened on `group`'s order: producers gathering for it look again (manager
        lock held)."""
        group.sessions_opened += 1
        for producer in self.producers.values():
            if producer.decode_group is group:
                with producer.condition:
                    producer.condition.notify_all()

    def _join(self, session: Session, cursor: Cursor) -> Producer | None:
        """Attach `session` to a live producer of its stream whose buffer still reaches
        `cursor` (manager lock held). A producer made for a detached member is not joined:
        it makes only what that member's old group no longer holds."""
        for producer in self.producers.values():
            if producer.key != session.key or producer.ceiling_source is not None:
                continue
            with producer.condition:
                if producer.stopped or producer.error is not None or not producer.members:
                    continue
                sequence = producer.sequence_at(cursor)
                if sequence is None:
                    continue
                session.attach(producer, sequence)
                session.facts = self._facts(session, producer)
                producer.condition.notify_all()
                return producer
        return None

    def _new_producer(
        self,
        key: StreamKey,
        dataset: Dataset,
        spec,
        split_ids,
        output_size: tuple[int, int],
        cursor: Cursor,
        prefetch: int,
        expected_members: int,
        purpose: str,
        reserved: int = 0,
        decode_group: DecodeGroup | None = None,
        expected_order_sessions: int = 0,
    ) -> Producer:
        """A producer (not started, not registered) within the memory budget, beside `reserved`
        bytes the caller is about to take, in `decode_group` from `cursor` on (manager lock
        held)."""
        slot_count = prefetch + self.limits.group_window
        self._check_budget(reserved + slot_count * key.batch_size * output_size[0] * output_size[1] * key.targets.pixel_bytes, purpose)
        producer = Producer(
            key=key, dataset=dataset, spec=spec, split_ids=split_ids, output_size=output_size,
            cursor=cursor, slot_count=slot_count, backend=self.backend, scheduler=self.scheduler,
            headers=self.headers, counters=self.counters, group_wait_seconds=self.limits.group_wait_seconds,
            wake_manager=self._wake, expected_members=expected_members, decode_group=decode_group,
            decoded_cache=self.decoded_cache, expected_order_sessions=expected_order_sessions,
            cuda_ipc_device=self.cuda_ipc_device.ordinal if key.cuda_ipc else None,
        )
        if decode_group is not None:
            decode_group.join(producer.id, cursor, producer.held_up)
        return producer

    def _check_budget(self, needed: int, purpose: str) -> None:
        """Refuse what would take the server past max_buffer_bytes (manager lock held)."""
        left = self.limits.max_buffer_bytes - self.buffer_bytes
        if needed > left:
            raise LimitError(
                f"server memory budget exhausted: {purpose} needs {needed} bytes of batch buffers, "
                f"{left} are left (limit max_buffer_bytes)"
            )

    def _facts(self, session: Session, producer: Producer) -> StreamFacts:
        return StreamFacts(
            session_id=session.id,
            samples_per_epoch=producer.layout.samples_per_epoch,
            batches_per_epoch=producer.layout.batches_per_epoch,
            classes=tuple(producer.dataset.manifest.classes),
            output_size=producer.output_size,
            transport=producer.key.transport,
            shm_name=producer.ring.name or "",
            cuda_ipc_handle=producer.cuda_ipc_handle,
            cuda_device_uuid=self.cuda_ipc_device.uuid if producer.key.cuda_ipc else b"",
            slot_bytes=producer.slot_bytes,
            slot_count=producer.ring.slot_count,
            prefetch=session.prefetch,
            start_cursor=session.start_cursor,
            shared=len(producer.members) > 1 or producer.expected_members > 1,
        )

    # --- groups (the supervisor thread) ---

    def _supervise(self) -> None:
        while not self._closed:
            self._wake.wait(timeout=SUPERVISE_SECONDS)
            self._wake.clear()
            with self._lock:
                if self._closed:
                    return
                self._reap()
                for producer in list(self.producers.values()):
                    self._release_stragglers(producer)
                self._rejoin_detached()

    def _release_stragglers(self, producer: Producer) -> None:
        """Carry out `groups.stragglers` for one producer (manager lock held)."""
        with producer.condition:
            if not producer.blocked or len(producer.members) < 2:
                return
            oldest_sequence = producer.slots.oldest()
            if oldest_sequence is None:
                return
            oldest = producer.slots.get(oldest_sequence)
            now = time.monotonic()
            views = [
                groups.MemberView(
                    session_id=member.id,
                    behind=producer.next_sequence - member.next_sequence,
                    holds_oldest=producer.holds(member.id, oldest_sequence),
                    policy=member.request.group_policy,
                    # A pause that ran out (or ended with a resume) starts the stall clock anew.
                    idle_seconds=now - max(member.last_consumed, oldest.produced_at, member.paused_until),
                    paused=member.paused(now),
                )
                for member in producer.members
            ]
            decisions = groups.stragglers(
                views, blocked=True, window=self.limits.group_window, stall_seconds=self.limits.stall_seconds
            )
            for decision in decisions:
                self._detach(producer, self.sessions[decision.session_id], decision.reason)

    def _detach(self, old: Producer, member: Session, reason: str) -> None:
        """Move `member` onto a producer of its own at its cursor, within the memory budget;
        past the budget its stream ends with RESOURCE_EXHAUSTED (manager lock and `old`'s
        condition held)."""
        cursor = old.cursor_of(member.next_sequence)
        old.drop_from(member.id, member.next_sequence)
        old.members.remove(member)
        old.detaches += 1
        old.condition.notify_all()
        try:
            producer = self._new_producer(
                old.key, old.dataset, old.spec, old.split_ids, old.output_size, cursor,
                member.prefetch, 1, f"detaching session {member.id} ({reason})", decode_group=old.decode_group,
            )
        except LimitError as error:
            # No longer a member (the group goes on); it still holds what it was sent until it
            # closes, and ends with the budget's status at its next step.
            member.failure = error
            log.warning("session %s %s and cannot be detached: %s", member.id, reason, error)
            return
        producer.ceiling_source = old  # it makes only what `old` no longer holds
        with producer.condition:
            member.attach(producer, 0)
            member.detached_from = old
            member.detached_at = time.monotonic()
        self.producers[producer.id] = producer
        self.counters.add(detached=1)
        producer.start()
        log.info(
            "session %s %s: detached from producer %d onto producer %d at epoch %d position %d",
            member.id, reason, old.id, producer.id, *cursor,
        )

    def _rejoin_detached(self) -> None:
        """Carry out `groups.rejoins`: detached members whose next batch their old group
        still holds go back to it (manager lock held)."""
        for session in list(self.sessions.values()):
            group = session.detached_from
            if group is None:
                continue
            with group.condition:
                own = session.producer
                with own.condition:
                    if session.producer is not own or session.detached_from is not group:
                        continue
                    alive = not group.stopped and group.error is None and bool(group.members)
                    cursor = own.cursor_of(session.next_sequence)
                    view = groups.DetachedView(
                        session_id=session.id,
                        policy=session.request.group_policy,
                        group_alive=alive,
                        sequence_in_group=group.sequence_at(cursor) if alive else None,
                        group_next_sequence=group.next_sequence,
                        consumed_since_detach=session.last_consumed > session.detached_at,
                    )
                    decisions = groups.rejoins([view], window=self.limits.group_window)
                    if not alive:
                        session.detached_from = None  # nothing to go back to: it goes on alone
                        own.ceiling_source = None
                    elif decisions:
                        self._rejoin(own, group, session, decisions[0].sequence, cursor)
                    own.condition.notify_all()  # a producer held at its ceiling looks again

    def _rejoin(self, own: Producer, group: Producer, member: Session, sequence: int, cursor: Cursor) -> None:
        """Move `member` from its own producer back to `group` at the group's batch
        `sequence` (manager lock and both conditions held, the group's first)."""
        own.drop_from(member.id, member.next_sequence)
        own.members.remove(member)
        if not own.members:
            own.stopped = True
        member.attach(group, sequence)
        member.detached_from = None
        group.rejoins += 1
        group.condition.notify_all()
        self.counters.add(rejoined=1)
        log.info(
            "session %s rejoined producer %d from producer %d at epoch %d position %d",
            member.id, group.id, own.id, *cursor,
        )

    # --- closing ---

    def close(self, session: Session) -> None:
        with self._lock:
            if self.sessions.pop(session.id, None) is None:
                return
            self._inband_bytes.pop(session.id, None)
            with session.locked() as producer:
                producer.drop_all(session.id)
                if session in producer.members:
                    producer.members.remove(session)
                if not producer.members:
                    producer.stopped = True
                outstanding = session.take_outstanding()
                producer.condition.notify_all()
            for owner in {owner for owner, _ in outstanding.values() if owner is not producer}:
                with owner.condition:
                    owner.drop_all(session.id)
                    owner.condition.notify_all()
            self._reap()
        log.info("session %s closed after %d batches", session.id, session.credits.sent)

    def _reap(self) -> None:
        """Free the rings of producers whose thread has returned and that no session needs
        (manager lock held)."""
        for producer_id, producer in list(self.producers.items()):
            with producer.condition:
                done = producer.finished and not producer.members
            if done:
                producer.close_ring()
                del self.producers[producer_id]
        in_use = {id(producer.decode_group) for producer in self.producers.values()}
        for order_key, group in list(self.decode_groups.items()):
            if id(group) not in in_use and group.producers == 0:
                del self.decode_groups[order_key]

    def shutdown(self, timeout: float = 10.0) -> None:
        """Refuse new sessions, end live ones with UNAVAILABLE (they keep their resume token),
        and wait for producers to stop."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self.shutting_down = True
            sessions = list(self.sessions.values())
        for session in sessions:
            session.fail(UnavailableError("server is shutting down; reconnect with the last resume token"))
        while self.sessions and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._lock:
            producers = list(self.producers.values())
        for producer in producers:
            with producer.condition:
                producer.stopped = True
                producer.condition.notify_all()
        for producer in producers:
            producer.thread.join(timeout=max(0.1, deadline - time.monotonic()))
        with self._lock:
            self._reap()
            self._closed = True
        self._wake.set()
        self._supervisor.join(timeout=5)

    # --- facts ---

    @property
    def buffer_bytes(self) -> int:
        """Bytes of every ring and of every in-band session's messages in flight."""
        rings = sum(producer.ring.slot_count * producer.slot_bytes for producer in self.producers.values())
        return rings + sum(self._inband_bytes.values())

    def snapshot(self) -> ManagerSnapshot:
        with self._lock:
            sessions = []
            for session in self.sessions.values():
                with session.locked() as producer:
                    sessions.append(
                        SessionSnapshot(
                            session_id=session.id,
                            dataset=session.key.dataset,
                            images_sent=session.images_sent,
                            batches_sent=session.credits.sent,
                            queue_depth=max(0, producer.next_sequence - session.next_sequence),
                            credits=session.credits.available,
                        )
                    )
            producers = []
            now = time.monotonic()
            for producer in self.producers.values():
                decoded, shared, cached = producer.decode_tally.values()
                group = producer.decode_group
                with producer.condition:
                    producers.append(ProducerSnapshot(
                        producer.id, producer.key.dataset, len(producer.members),
                        paused_members=sum(1 for member in producer.members if member.paused(now)),
                        detaches=producer.detaches, rejoins=producer.rejoins, batches_produced=producer.next_sequence,
                        images_decoded=decoded, decode_shared=shared, decode_cached=cached,
                        decode_producers=1 if group is None else max(1, group.producers),
                    ))
            share_bytes = sum(group.kept_bytes for group in self.decode_groups.values())
            return ManagerSnapshot(
                tuple(sessions), tuple(producers), self.counters.snapshot(), self.buffer_bytes,
                self.decoded_cache.stats(), share_bytes,
            )

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no session is open and every producer is gone; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                self._reap()
                if not self.sessions and not self.producers:
                    return True
            time.sleep(0.02)
        return False
