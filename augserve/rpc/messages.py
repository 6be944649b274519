"""Server messages built from the streaming layer's plain events and facts (server side)."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from augserve._proto.augserve.v1 import augserve_pb2 as pb
from augserve.core.targets import SampleTargets
from augserve.rpc.compression import ChunkEncoder
from augserve.rpc.convert import TRANSPORT_VALUES
from augserve.streaming.limits import Limits
from augserve.streaming.session import Delivery, EpochEnded, Event, StreamEnded, StreamFacts


# In-band pixels travel in chunks just under 4 MiB: every gRPC client's default receive limit
# takes them, and buffers of that size are reused by the allocator instead of being mapped and
# page-faulted afresh (as messages over 32 MiB are).
DEFAULT_CHUNK_BYTES = (4 << 20) - (16 << 10)
MIN_CHUNK_BYTES = 64 << 10
MAX_CHUNK_BYTES = 64 << 20


def limits_to_proto(limits: Limits) -> pb.Limits:
    return pb.Limits(
        max_sessions=limits.max_sessions,
        max_batch_size=limits.max_batch_size,
        max_output_pixels=limits.max_output_pixels,
        max_spec_ops=limits.max_spec_ops,
        max_prefetch=limits.max_prefetch,
        max_message_bytes=limits.max_message_bytes,
        max_buffer_bytes=limits.max_buffer_bytes,
    )


def session_info(facts: StreamFacts, backend: str) -> pb.ServerMessage:
    start_epoch, start_position = facts.start_cursor
    return pb.ServerMessage(
        info=pb.SessionInfo(
            session_id=facts.session_id,
            samples_per_epoch=facts.samples_per_epoch,
            batches_per_epoch=facts.batches_per_epoch,
            classes=list(facts.classes),
            backend=backend,
            output_size=list(facts.output_size),
            transport=TRANSPORT_VALUES[facts.transport],
            shm_name=facts.shm_name,
            cuda_ipc_handle=facts.cuda_ipc_handle,
            cuda_device_uuid=facts.cuda_device_uuid,
            slot_bytes=facts.slot_bytes,
            slot_count=facts.slot_count,
            prefetch=facts.prefetch,
            start_epoch=start_epoch,
            start_position=start_position,
            shared=facts.shared,
        )
    )


def event_messages(
    event: Event, chunk_bytes: int = DEFAULT_CHUNK_BYTES, encoder: ChunkEncoder | None = None
) -> Iterator[pb.ServerMessage]:
    """The messages of one event: an in-band batch is its Batch, then its pixels in Chunks of at
    most `chunk_bytes` each (before encoding), each copied once from the slot into its message,
    or with an `encoder` encoded once from the slot (raw where encoding would not shrink it)."""
    if isinstance(event, Delivery):
        yield _batch_message(event, chunk_bytes)
        start = 0
        for payload in _payload(event):  # the images, then the masks: one run of offsets
            flat = payload.reshape(-1)
            for offset in range(0, flat.size, chunk_bytes):
                pixels = flat[offset : offset + chunk_bytes]
                message = pb.ServerMessage()
                chunk = message.chunk
                chunk.sequence = event.sequence
                chunk.offset = start + offset
                encoded = None if encoder is None else encoder.encode(memoryview(pixels))
                if encoded is None:
                    chunk.data = pixels.tobytes()
                else:
                    chunk.data = encoded
                    chunk.compression = encoder.wire
                    chunk.decoded_length = pixels.size
                yield message
            start += flat.size
    elif isinstance(event, EpochEnded):
        yield pb.ServerMessage(epoch_end=pb.EpochEnd(epoch=event.epoch, samples=event.samples, skipped=event.skipped))
    elif isinstance(event, StreamEnded):
        yield pb.ServerMessage(end=pb.End(reason=event.reason))
    else:
        raise TypeError(f"not a stream event: {event!r}")


def _payload(delivery: Delivery) -> list[np.ndarray]:
    """What an in-band batch's chunks carry, in order (nothing on shared memory)."""
    if delivery.images is None:
        return []
    return [delivery.images] if delivery.masks is None else [delivery.images, delivery.masks]


def _chunk_count(payload: list[np.ndarray], chunk_bytes: int) -> int:
    return sum(-(-array.nbytes // chunk_bytes) for array in payload)


def _targets_message(targets: list[SampleTargets], message: pb.BatchTargets) -> None:
    """Ragged per-image instances as offsets and concatenated values."""
    counts = [len(item) for item in targets]
    message.box_offsets.extend(np.concatenate([[0], np.cumsum(counts)]).astype(int).tolist())
    keypoint_count = max((item.keypoints.shape[1] for item in targets), default=0)
    boxes = np.concatenate([item.boxes for item in targets]) if targets else np.zeros((0, 4), np.float32)
    keypoints = (
        np.concatenate([item.keypoints for item in targets]) if targets and keypoint_count else np.zeros((len(boxes), 0, 3), np.float32)
    )
    for tensor, array in ((message.boxes, boxes), (message.keypoints, keypoints)):
        tensor.shape.extend(array.shape)
        tensor.dtype = "float32"
        tensor.data = np.ascontiguousarray(array, np.float32).tobytes()
    if targets:
        message.box_labels.extend(np.concatenate([item.labels for item in targets]).tolist())


def _batch_message(delivery: Delivery, chunk_bytes: int) -> pb.ServerMessage:
    """Built in place (a nested message given to a constructor is copied)."""
    server_message = pb.ServerMessage()
    message = server_message.batch
    message.sequence = delivery.sequence
    message.epoch = delivery.epoch
    message.position = delivery.position
    message.count = delivery.count
    message.labels.extend(delivery.labels.tolist())
    message.sample_ids.extend(delivery.sample_ids.tolist())
    message.resume_token = delivery.resume_token
    message.skipped.extend(delivery.skipped)
    if delivery.images is None:
        message.slot = delivery.slot
        message.shm_name = delivery.shm_name
        message.cuda_ipc_handle = delivery.cuda_ipc_handle
    else:
        message.images.shape.extend(delivery.images.shape)
        message.images.dtype = delivery.images.dtype.name
        message.chunks = _chunk_count(_payload(delivery), chunk_bytes)
    if delivery.targets is not None:
        _targets_message(delivery.targets, message.targets)
    if delivery.masks_offset is not None:
        height, width = delivery.owner.output_size
        message.masks.shape.extend((delivery.count, height, width))
        message.masks.dtype = "uint8"
        message.masks_offset = delivery.masks_offset
    return server_message
