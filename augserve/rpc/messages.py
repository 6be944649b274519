"""Server messages built from the streaming layer's plain events and facts (server side)."""

from __future__ import annotations

from augserve._proto.augserve.v1 import augserve_pb2 as pb
from augserve.rpc.convert import fill_tensor
from augserve.streaming.limits import Limits
from augserve.streaming.session import Delivery, EpochEnded, Event, StreamEnded, StreamFacts


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
            transport=pb.TRANSPORT_SHARED_MEMORY if facts.shared_memory else pb.TRANSPORT_INBAND,
            shm_name=facts.shm_name,
            slot_bytes=facts.slot_bytes,
            slot_count=facts.slot_count,
            prefetch=facts.prefetch,
            start_epoch=start_epoch,
            start_position=start_position,
            shared=facts.shared,
        )
    )


def event_message(event: Event) -> pb.ServerMessage:
    if isinstance(event, Delivery):
        return _batch_message(event)
    if isinstance(event, EpochEnded):
        return pb.ServerMessage(epoch_end=pb.EpochEnd(epoch=event.epoch, samples=event.samples, skipped=event.skipped))
    if isinstance(event, StreamEnded):
        return pb.ServerMessage(end=pb.End(reason=event.reason))
    raise TypeError(f"not a stream event: {event!r}")


def _batch_message(delivery: Delivery) -> pb.ServerMessage:
    """Built in place (a nested message given to a constructor is copied); in-band pixels are
    copied once, from the slot into the message."""
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
    else:
        fill_tensor(message.images, delivery.images)
    return server_message
