"""Open sessions on the client side: one server's stream, or several servers' shards."""

from __future__ import annotations

import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import grpc
import numpy as np

from augserve._proto.augserve.v1 import augserve_pb2 as pb
from augserve._proto.augserve.v1 import augserve_pb2_grpc as pb_grpc
from augserve.client.errors import AugserveClientError
from augserve.client.tensors import IMAGENET_MEAN, IMAGENET_STD, targets_to_torch, to_torch, tv_tensors_module
from augserve.rpc.compression import ChunkDecoder, CodecUnavailable, CorruptChunk
from augserve.rpc.convert import TRANSPORT_NAMES, tensor_from_proto
from augserve.transport.cuda_ipc import CudaError, CudaIpcMapping, CudaSlot, RingHandle
from augserve.transport.ring import SHM_DIR, SlotReader, remove_probe, write_probe

if TYPE_CHECKING:
    from augserve.client.connection import Client


@dataclass(frozen=True)
class SessionFacts:
    """What the server said about a session when it opened."""

    session_id: str
    samples_per_epoch: int
    batches_per_epoch: int
    classes: tuple[str, ...]
    backend: str
    output_size: tuple[int, int]
    transport: str
    prefetch: int
    start_epoch: int
    start_position: int
    shared: bool


@dataclass
class ReceivedBatch:
    """One batch. `images` is [count, H, W, 3] uint8 RGB; with shared memory it maps the
    server's slot and stays valid until the next batch is requested (copy it to keep it).
    Over CUDA IPC it is a `CudaSlot` on the trainer's GPU (`__cuda_array_interface__`, and
    `to_host()`), valid as long and only to be read: GPU work reading it must be done before the
    next batch is requested (`to_torch` and `stream.torch()` copy it into a tensor of the
    trainer's own first, on a side stream they wait for).

    With targets asked for (`Client.stream(targets=...)`), per image i: `boxes[i]` [M, 4]
    float32 (x_min, y_min, x_max, y_max in output pixels), `box_labels[i]` [M] int64 (indices
    into the session's classes), `keypoints[i]` [M, K, 3] float32 (x, y, visibility); and
    `masks` [count, H, W] uint8 label maps (0 background, class + 1, 255 ignore), valid as
    long as `images`."""

    sequence: int
    epoch: int
    position: int
    images: np.ndarray | CudaSlot
    labels: np.ndarray
    sample_ids: np.ndarray
    resume_token: bytes
    skipped: list[str] = field(default_factory=list)
    boxes: list[np.ndarray] | None = None
    box_labels: list[np.ndarray] | None = None
    keypoints: list[np.ndarray] | None = None
    masks: np.ndarray | None = None


@dataclass(frozen=True)
class EpochSummary:
    epoch: int
    samples: int
    skipped: int


@dataclass(frozen=True)
class Reconnect:
    """How a stream outlives a server restart or a network blip: after UNAVAILABLE mid-stream it
    opens again with its last resume token, up to `attempts` times in a row, waiting `first_delay`
    seconds, doubling up to `max_delay`. attempts=0 turns it off."""

    attempts: int = 10
    first_delay: float = 0.1
    max_delay: float = 5.0

    def delays(self) -> Iterator[float]:
        delay = self.first_delay
        for _ in range(self.attempts):
            yield delay
            delay = min(delay * 2, self.max_delay)


RETRIED_CODES = (grpc.StatusCode.UNAVAILABLE,)


def mapped(mappings: dict[Any, Any], key: Any, open_mapping: Any) -> Any:
    """The mapping of the ring `key` (a segment name, a CUDA IPC handle), opened at first sight:
    a session's first, or a new one when the server moved it to a producer of its own."""
    mapping = mappings.get(key)
    if mapping is None:
        mapping = mappings[key] = open_mapping(key)
    return mapping


class BatchStream:
    """An open session. Iterate it for `ReceivedBatch`es; close it (or use `with`) when done.

    `idle_timeout` (seconds) ends the stream with DEADLINE_EXCEEDED when no message arrives for
    that long while the caller waits for one (time the caller spends on a batch never counts).
    After UNAVAILABLE the stream reopens itself with its last resume token (`reconnect`), so
    the caller sees exactly the batches an uninterrupted stream would have given."""

    def __init__(
        self,
        stub: pb_grpc.AugmentStub,
        open_message: pb.OpenSession,
        *,
        shared_memory_probe: bool,
        idle_timeout: float | None,
        metadata: tuple[tuple[str, str], ...] = (),
        reconnect: Reconnect = Reconnect(),
    ) -> None:
        self._stub = stub
        self._open_message = open_message
        self._shared_memory_probe = shared_memory_probe
        self._idle_timeout = idle_timeout
        self._metadata = metadata
        self._reconnect = reconnect
        self._decoder = ChunkDecoder()
        self._readers: dict[str, SlotReader] = {}  # shared-memory segments by name
        self._device_rings: dict[bytes, CudaIpcMapping] = {}  # CUDA IPC rings by handle
        self._pending_release: int | None = None
        self._pause: tuple[float, float] | None = None  # (seconds asked for, when), until resume
        self._closed = False
        self._lock = threading.Lock()
        self._waiting_since: float | None = None  # when the caller began waiting for a message
        self._timed_out = False
        self.reconnects = 0
        self.last_resume_token: bytes = open_message.resume_token
        self.epochs: list[EpochSummary] = []
        self.end_reason: str | None = None
        try:
            self._open()  # a server that cannot be reached at all is the caller's to know at once
        except grpc.RpcError as error:
            raise AugserveClientError.from_rpc(error) from None
        if idle_timeout is not None:
            threading.Thread(target=self._watch_idle, name="augserve-stream-watchdog", daemon=True).start()

    # --- opening (again) ---

    def _open(self) -> None:
        """Open the session (from the last resume token) and read its SessionInfo."""
        self._outgoing: queue.Queue[pb.ClientMessage | None] = queue.Queue()
        message = pb.OpenSession()
        message.CopyFrom(self._open_message)
        message.resume_token = self.last_resume_token
        probe = None
        if self._shared_memory_probe:
            try:
                probe, nonce = write_probe()
            except OSError:
                probe = None  # /dev/shm full or read-only: no proof of a shared host, so in-band
            else:
                message.shm_probe_name, message.shm_probe_nonce = probe, nonce
        self._outgoing.put(pb.ClientMessage(open=message))
        self._repeat_pause()
        self._pending_release = None  # a new session: nothing of the old one to acknowledge
        self._call = self._stub.Stream(iter(self._outgoing.get, None), metadata=self._metadata)
        try:
            first = self._next_message()
        except grpc.RpcError:
            self._outgoing.put(None)
            raise
        finally:
            if probe is not None:
                remove_probe(probe)
        info = first.info
        self.facts = SessionFacts(
            session_id=info.session_id,
            samples_per_epoch=info.samples_per_epoch,
            batches_per_epoch=info.batches_per_epoch,
            classes=tuple(info.classes),
            backend=info.backend,
            output_size=(info.output_size[0], info.output_size[1]),
            transport=TRANSPORT_NAMES.get(info.transport, "inband"),
            prefetch=info.prefetch,
            start_epoch=info.start_epoch,
            start_position=info.start_position,
            shared=info.shared,
        )
        self._slot_bytes = info.slot_bytes
        self._slot_count = info.slot_count
        self._cuda_device_uuid = info.cuda_device_uuid
        if info.shm_name:
            mapped(self._readers, info.shm_name, self._map_segment)
        if info.cuda_ipc_handle:
            mapped(self._device_rings, info.cuda_ipc_handle, self._map_device_ring)

    def _next_message(self) -> pb.ServerMessage:
        """The call's next message; StopIteration at its end. The watchdog measures the wait."""
        self._waiting_since = time.monotonic()
        try:
            return next(self._call)
        finally:
            self._waiting_since = None

    def _watch_idle(self) -> None:
        interval = min(1.0, self._idle_timeout / 4)
        while not self._closed:
            time.sleep(interval)
            waiting_since = self._waiting_since
            if waiting_since is not None and time.monotonic() - waiting_since > self._idle_timeout:
                self._timed_out = True
                self._call.cancel()

    # --- reading ---

    def __iter__(self) -> Iterator[ReceivedBatch]:
        delays = self._reconnect.delays()
        try:
            while True:
                try:
                    for batch in self._batches():
                        delays = self._reconnect.delays()  # a batch came: the next failure starts afresh
                        yield batch
                        # The caller asked for the next batch: free this one before waiting.
                        self._acknowledge_previous()
                    return
                except grpc.RpcError as error:
                    if self._closed and error.code() == grpc.StatusCode.CANCELLED:
                        return
                    if self._timed_out:
                        raise AugserveClientError(
                            grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"no message from the server for {self._idle_timeout:g} s",
                            self.last_resume_token,
                        ) from None
                    if error.code() not in RETRIED_CODES:
                        raise AugserveClientError.from_rpc(error, self.last_resume_token) from None
                    self._reopen(error, delays)
        finally:
            self._acknowledge_previous()

    def _reopen(self, error: grpc.RpcError, delays: Iterator[float]) -> None:
        """Open again from the last resume token after `error`, waiting out the delays; raise
        AugserveClientError when they are used up or the server refuses for another reason."""
        self._outgoing.put(None)
        while True:
            delay = next(delays, None)
            if delay is None:
                raise AugserveClientError(
                    error.code(),
                    f"gave up after {self._reconnect.attempts} reconnect attempts: {error.details()}",
                    self.last_resume_token,
                ) from None
            time.sleep(delay)
            if self._closed:
                raise AugserveClientError(grpc.StatusCode.CANCELLED, "the stream was closed", self.last_resume_token)
            try:
                self._open()
            except grpc.RpcError as again:
                if again.code() not in RETRIED_CODES:
                    raise AugserveClientError.from_rpc(again, self.last_resume_token) from None
                error = again
                continue
            self.reconnects += 1
            return

    def _batches(self) -> Iterator[ReceivedBatch]:
        while True:
            try:
                message = self._next_message()
            except StopIteration:
                return
            kind = message.WhichOneof("kind")
            if kind == "batch":
                batch = self._receive(message.batch)
                self.last_resume_token = batch.resume_token
                yield batch
            elif kind == "epoch_end":
                end = message.epoch_end
                self.epochs.append(EpochSummary(end.epoch, end.samples, end.skipped))
            elif kind == "end":
                self.end_reason = message.end.reason

    def _receive(self, message: pb.Batch) -> ReceivedBatch:
        height, width = self.facts.output_size
        has_masks = message.HasField("masks")
        masks = None
        if message.shm_name:
            reader = mapped(self._readers, message.shm_name, self._map_segment)
            try:
                images = reader.view(message.slot, (message.count, height, width, 3))
                if has_masks:
                    masks = reader.view(message.slot, (message.count, height, width), message.masks_offset)
            except ValueError as error:
                raise self._data_loss(message, str(error)) from None
            self._pending_release = message.sequence
        elif message.cuda_ipc_handle:
            ring = mapped(self._device_rings, message.cuda_ipc_handle, self._map_device_ring)
            try:
                images = ring.slot(message.slot, (message.count, height, width, 3))
            except (IndexError, ValueError) as error:
                raise self._data_loss(message, str(error)) from None
            self._pending_release = message.sequence
        elif message.chunks:
            images, masks = self._assemble(message)
            self._pending_release = -1  # in-band: only a credit to send
        else:
            images = tensor_from_proto(message.images)
            self._pending_release = -1
        batch = ReceivedBatch(
            sequence=message.sequence,
            epoch=message.epoch,
            position=message.position,
            images=images,
            labels=np.array(message.labels, np.int64),
            sample_ids=np.array(message.sample_ids, np.int64),
            resume_token=message.resume_token,
            skipped=list(message.skipped),
            masks=masks,
        )
        if message.HasField("targets"):
            self._read_targets(message, batch)
        return batch

    def _read_targets(self, message: pb.Batch, batch: ReceivedBatch) -> None:
        """The ragged per-image boxes, labels and keypoints of `message`."""
        targets = message.targets
        offsets = list(targets.box_offsets)
        try:
            boxes = tensor_from_proto(targets.boxes).reshape(-1, 4)
            keypoints = tensor_from_proto(targets.keypoints)
        except (ValueError, TypeError) as error:
            raise self._data_loss(message, f"targets: {error}") from None
        labels = np.array(targets.box_labels, np.int64)
        total = len(boxes)
        if (
            len(offsets) != message.count + 1 or offsets[0] != 0 or offsets[-1] != total
            or any(b < a for a, b in zip(offsets, offsets[1:])) or len(labels) != total or len(keypoints) != total
        ):
            raise self._data_loss(message, f"targets: offsets {offsets[:4]}... do not cover {total} boxes of {message.count} images")
        spans = list(zip(offsets, offsets[1:]))
        batch.boxes = [boxes[a:b] for a, b in spans]
        batch.box_labels = [labels[a:b] for a, b in spans]
        batch.keypoints = [keypoints[a:b] for a, b in spans]

    def _assemble(self, message: pb.Batch) -> tuple[np.ndarray, np.ndarray | None]:
        """Read the batch's Chunk messages into one buffer (the images, then any masks): each raw
        chunk copied once into place, each encoded one decoded into place (zstd) or decoded and
        copied once (lz4)."""
        shape = tuple(message.images.shape)
        dtype = np.dtype(message.images.dtype or "uint8")
        image_bytes = int(np.prod(shape)) * dtype.itemsize
        mask_shape = tuple(message.masks.shape) if message.HasField("masks") else None
        if mask_shape is not None and (message.masks_offset != image_bytes or message.masks.dtype != "uint8"):
            raise self._data_loss(message, f"masks at offset {message.masks_offset}, expected uint8 right after {image_bytes} bytes of images")
        flat = np.empty(image_bytes + (0 if mask_shape is None else int(np.prod(mask_shape))), np.uint8)
        images = flat[:image_bytes].view(dtype).reshape(shape)
        masks = None if mask_shape is None else flat[image_bytes:].reshape(mask_shape)
        filled = 0
        for _ in range(message.chunks):
            received = self._next_message()
            chunk = received.chunk
            if received.WhichOneof("kind") != "chunk" or chunk.sequence != message.sequence or chunk.offset != filled:
                raise self._data_loss(message, "chunks out of order")
            encoded = chunk.compression not in (pb.COMPRESSION_UNSPECIFIED, pb.COMPRESSION_NONE)
            length = chunk.decoded_length if encoded else len(chunk.data)
            if filled + length > flat.size:
                raise self._data_loss(message, f"chunks hold more than its {flat.size} bytes")
            if not encoded:
                flat[filled : filled + length] = np.frombuffer(chunk.data, np.uint8)
            else:
                try:
                    self._decoder.decode_into(chunk.compression, chunk.data, memoryview(flat)[filled : filled + length])
                except CorruptChunk as error:
                    raise self._data_loss(message, f"chunk at offset {filled}: {error}") from None
                except CodecUnavailable as error:
                    raise AugserveClientError(
                        grpc.StatusCode.FAILED_PRECONDITION, f"batch {message.sequence}: decoding {error}", self.last_resume_token
                    ) from None
            filled += length
        if filled != flat.size:
            raise self._data_loss(message, f"{filled} of {flat.size} bytes came")
        return images, masks

    def _data_loss(self, message: pb.Batch, what: str) -> AugserveClientError:
        return AugserveClientError(grpc.StatusCode.DATA_LOSS, f"batch {message.sequence}: {what}", self.last_resume_token)

    def _map_segment(self, name: str) -> SlotReader:
        """Map the server's segment `name`, or close this stream and raise AugserveClientError
        (FAILED_PRECONDITION): the server judged this client on its host, yet the file cannot be
        opened (another user's private file, removed meanwhile, truncated to nothing)."""
        try:
            return SlotReader(name, self._slot_bytes)
        except (OSError, ValueError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            self.close()
            raise AugserveClientError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"cannot map the server's shared-memory segment {SHM_DIR / name} ({reason}); "
                'open the stream with transport="inband"',
                self.last_resume_token,
            ) from None

    def _map_device_ring(self, handle: bytes) -> CudaIpcMapping:
        """Open the server's CUDA IPC ring `handle`, or close this stream and raise
        AugserveClientError (FAILED_PRECONDITION): the GPU or the driver refuses it here (another
        container without the host's IPC namespace, a driver that cannot map it)."""
        try:
            return CudaIpcMapping(RingHandle(handle, self._cuda_device_uuid, self._slot_count, self._slot_bytes))
        except (OSError, CudaError, LookupError, ValueError) as error:
            self.close()
            raise AugserveClientError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"cannot open the server's CUDA IPC ring ({error}); open the stream with transport=\"shared_memory\"",
                self.last_resume_token,
            ) from None

    def _acknowledge_previous(self) -> None:
        """The caller moved on: free the previous batch's slot and grant one more batch."""
        sequence, self._pending_release = self._pending_release, None
        if sequence is None or self._closed:
            return
        if sequence >= 0:
            self._outgoing.put(pb.ClientMessage(release=pb.ReleaseSlot(sequence=sequence)))
        self._outgoing.put(pb.ClientMessage(credit=pb.Credit(batches=1)))

    def torch(
        self,
        device: Any = "cpu",
        normalize: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> Iterator[tuple[Any, Any]]:
        """(images, labels) as torch tensors on `device`: float32 [N, 3, H, W] normalized by
        mean/std of [0, 1] pixels (or uint8 [N, H, W, 3] with normalize=False)."""
        for batch in self:
            yield to_torch(batch.images, batch.labels, device, normalize, mean, std)

    def torch_targets(
        self,
        device: Any = "cpu",
        normalize: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        use_tv_tensors: bool | None = None,
    ) -> Iterator[tuple[Any, list[dict[str, Any]]]]:
        """(images, targets): images as `torch` gives them, targets per image as a dict of
        tensors on `device` (`targets_to_torch`: boxes, labels, keypoints, mask), as
        torchvision tv_tensors where torchvision imports (`use_tv_tensors` None) or asked to."""
        tv_tensors = tv_tensors_module() if use_tv_tensors in (None, True) else None
        if use_tv_tensors and tv_tensors is None:
            raise ImportError("use_tv_tensors=True needs torchvision (importable against the installed torch)")
        for batch in self:
            images, _ = to_torch(batch.images, batch.labels, device, normalize, mean, std)
            yield images, targets_to_torch(batch, device, tv_tensors)

    def pause(self, seconds: float = 0.0) -> None:
        """Tell the server this stream stops being read for a while (validation, a checkpoint):
        its group waits for it instead of detaching it as stalled, for up to `seconds` (0: the
        server's longest pause, max_pause_seconds) or until `resume`."""
        if not seconds >= 0:
            raise ValueError(f"seconds: expected a number >= 0, got {seconds!r}")
        if not self._closed:
            self._pause = (seconds, time.monotonic())
            self._outgoing.put(pb.ClientMessage(pause=pb.Pause(seconds=seconds)))

    def resume(self) -> None:
        """The stream is read again: the pause `pause` announced ends."""
        self._pause = None
        if not self._closed:
            self._outgoing.put(pb.ClientMessage(resume=pb.Resume()))

    def _repeat_pause(self) -> None:
        """A pause outlives a reconnect: the new session is told what is left of it."""
        if self._pause is None:
            return
        seconds, since = self._pause
        left = seconds - (time.monotonic() - since) if seconds else 0.0
        if seconds and left <= 0:
            self._pause = None
            return
        self._outgoing.put(pb.ClientMessage(pause=pb.Pause(seconds=left)))

    @contextmanager
    def paused(self, seconds: float = 0.0) -> Iterator[None]:
        """`pause` for the time of a `with` block (e.g. validating between epochs), then `resume`."""
        self.pause(seconds)
        try:
            yield
        finally:
            self.resume()

    @property
    def resume_tokens(self) -> list[bytes]:
        return [self.last_resume_token]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._call.cancel()
        self._outgoing.put(None)
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        for ring in self._device_rings.values():
            try:
                ring.close()
            except CudaError:
                pass  # the driver is going away with the process
        self._device_rings.clear()

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ShardedStream:
    """Batches of several servers, each streaming its own shard, interleaved round-robin within
    each epoch (a batch of epoch e+1 waits until every server has finished epoch e)."""

    def __init__(self, streams: list[BatchStream]) -> None:
        self.streams = streams
        # Tokens of the batches handed out, not of those fetched ahead and still pending.
        self._tokens = [stream.last_resume_token for stream in streams]
        first = streams[0].facts
        self.facts = SessionFacts(
            session_id=",".join(stream.facts.session_id for stream in streams),
            samples_per_epoch=sum(stream.facts.samples_per_epoch for stream in streams),
            batches_per_epoch=sum(stream.facts.batches_per_epoch for stream in streams),
            classes=first.classes,
            backend=first.backend,
            output_size=first.output_size,
            transport=first.transport,
            prefetch=first.prefetch,
            start_epoch=min(stream.facts.start_epoch for stream in streams),
            start_position=first.start_position,
            shared=all(stream.facts.shared for stream in streams),
        )

    def __iter__(self) -> Iterator[ReceivedBatch]:
        iterators = [iter(stream) for stream in self.streams]
        pending: list[ReceivedBatch | None] = [None] * len(iterators)
        alive = [True] * len(iterators)
        while True:
            for index, iterator in enumerate(iterators):
                if pending[index] is None and alive[index]:
                    pending[index] = next(iterator, None)
                    alive[index] = pending[index] is not None
            live = [index for index in range(len(iterators)) if pending[index] is not None]
            if not live:
                return
            epoch = min(pending[index].epoch for index in live)
            for index in live:
                if pending[index].epoch == epoch:
                    batch, pending[index] = pending[index], None
                    self._tokens[index] = batch.resume_token
                    yield batch

    torch = BatchStream.torch
    paused = BatchStream.paused

    def pause(self, seconds: float = 0.0) -> None:
        for stream in self.streams:
            stream.pause(seconds)

    def resume(self) -> None:
        for stream in self.streams:
            stream.resume()

    @property
    def resume_tokens(self) -> list[bytes]:
        return list(self._tokens)

    def close(self) -> None:
        for stream in self.streams:
            stream.close()

    def __enter__(self) -> ShardedStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_stream(
    clients: Sequence[Client],
    dataset: str,
    *,
    rank: int = 0,
    world_size: int = 1,
    resume_tokens: Sequence[bytes] = (),
    **options: Any,
) -> BatchStream | ShardedStream:
    """A stream over one or several servers for data-parallel rank `rank` of `world_size`:
    server i of n serves shard rank * n + i of world_size * n, so ranks and servers together
    read disjoint shards that cover the split. `options` are `Client.stream`'s."""
    count = len(clients)
    tokens = list(resume_tokens) or [b""] * count
    if len(tokens) != count:
        raise ValueError(f"resume_tokens: {len(tokens)} tokens for {count} servers")
    streams: list[BatchStream] = []
    try:
        for index, client in enumerate(clients):
            streams.append(
                client.stream(
                    dataset,
                    shard_index=rank * count + index,
                    shard_count=world_size * count,
                    resume_token=tokens[index],
                    **options,
                )
            )
    except BaseException:
        for stream in streams:
            stream.close()
        raise
    return streams[0] if count == 1 else ShardedStream(streams)
