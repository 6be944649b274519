"""Parsing an OpenSession into a `SessionRequest`, with field-named validation (server side).

Every check raises `SpecError` naming the message field, which the server turns into
INVALID_ARGUMENT.
"""

from __future__ import annotations

from typing import Callable

from augserve._proto.augserve.v1 import augserve_pb2 as pb
from augserve.core.errors import SpecError
from augserve.core.plan import MAX_SEED
from augserve.core.policy import BadImagePolicy
from augserve.core.spec import AugmentSpec
from augserve.core.targets import TargetRequest
from augserve.rpc.compression import (
    CODECS,
    COMPRESSION_NAMES,
    NONE,
    CodecUnavailable,
    Compression,
    available_codecs,
)
from augserve.rpc.convert import (
    BAD_IMAGE_NAMES,
    GROUP_POLICY_NAMES,
    SPLIT_NAMES,
    TRANSPORT_NAMES,
    enum_name,
    spec_from_proto,
)
from augserve.rpc.messages import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES
from augserve.streaming.keys import ResumeToken
from augserve.streaming.request import SessionRequest
from augserve.transport.cuda_ipc import UUID_BYTES


def parse_open(
    message: pb.OpenSession, eval_spec_for: Callable[[tuple[int, int]], AugmentSpec], max_pixels: int
) -> SessionRequest:
    """Validate an OpenSession; `eval_spec_for((h, w))` gives the default validation spec."""
    if not message.dataset:
        raise SpecError("open.dataset", "required: the name of a dataset this server serves")
    if len(message.dataset) > 256:
        raise SpecError("open.dataset", "longer than 256 characters")
    split = enum_name("open.split", message.split, SPLIT_NAMES)
    if message.HasField("spec"):
        spec = spec_from_proto(message.spec)
    elif split == "validation" and message.eval_size:
        if len(message.eval_size) != 2 or not all(1 <= side <= 8192 for side in message.eval_size):
            raise SpecError("open.eval_size", "expected [height, width], each in [1, 8192]")
        spec = eval_spec_for(tuple(message.eval_size))
    else:
        spec = AugmentSpec()
    if message.batch_size < 1:
        raise SpecError("open.batch_size", "must be at least 1")
    shard_count = message.shard_count or 1
    if message.shard_index >= shard_count:
        raise SpecError("open.shard_index", f"{message.shard_index} is not below shard_count {shard_count}")
    if message.epochs > 1_000_000:
        raise SpecError("open.epochs", f"{message.epochs} is over 1000000 (0 means endless)")
    if message.seed > MAX_SEED:
        raise SpecError("open.seed", f"{message.seed} is over the largest seed {MAX_SEED}")
    if message.max_chunk_bytes and not MIN_CHUNK_BYTES <= message.max_chunk_bytes <= MAX_CHUNK_BYTES:
        raise SpecError("open.max_chunk_bytes", f"{message.max_chunk_bytes} is outside [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}] (0: the default)")
    if message.cuda_device_uuid and len(message.cuda_device_uuid) != UUID_BYTES:
        raise SpecError("open.cuda_device_uuid", f"{len(message.cuda_device_uuid)} bytes, a GPU's UUID has {UUID_BYTES}")
    resume = ResumeToken.decode(message.resume_token) if message.resume_token else None
    return SessionRequest(
        dataset=message.dataset,
        split=split,
        spec=spec,
        batch_size=message.batch_size,
        seed=message.seed,
        epochs=message.epochs,
        shard_index=message.shard_index,
        shard_count=shard_count,
        transport=enum_name("open.transport", message.transport, TRANSPORT_NAMES),
        prefetch=message.prefetch,
        resume=resume,
        bad_image_policy=BadImagePolicy(enum_name("open.on_bad_image", message.on_bad_image, BAD_IMAGE_NAMES), max_pixels),
        drop_last=message.drop_last,
        group_policy=enum_name("open.group_policy", message.group_policy, GROUP_POLICY_NAMES),
        group_size=message.group_size,
        shm_probe_name=message.shm_probe_name,
        shm_probe_nonce=message.shm_probe_nonce,
        max_chunk_bytes=message.max_chunk_bytes or DEFAULT_CHUNK_BYTES,
        decode_group_size=message.decode_group_size,
        targets=parse_targets(message.targets),
        cuda_device_uuid=message.cuda_device_uuid,
    )


def parse_targets(message: pb.TargetRequest) -> TargetRequest:
    """OpenSession.targets as a TargetRequest (unset fields take its defaults)."""
    rules = {}
    for name in ("min_area", "min_visibility"):
        if message.HasField(name):
            rules[name] = getattr(message, name)
    try:
        return TargetRequest(message.boxes, message.keypoints, message.masks, erase_marks_ignore=message.erase_marks_ignore, **rules)
    except SpecError as error:
        raise SpecError(f"open.{error.field}", error.message) from None


def parse_compression(message: pb.OpenSession) -> Compression:
    """The session's in-band compression: a codec this server knows and can encode with (its
    library installed), at a level within the codec's."""
    name = enum_name("open.compression", message.compression, COMPRESSION_NAMES)
    try:
        compression = Compression(name, message.compression_level)
    except SpecError as error:
        raise SpecError(f"open.{error.field}", error.message) from None
    if name != NONE:
        try:
            CODECS[name].library()
        except CodecUnavailable as error:
            offered = ", ".join([NONE] + [codec.name for codec in available_codecs()])
            raise SpecError(
                "open.compression",
                f"{name} is not available on this server (it lacks the Python package {error.package}); "
                f"it offers {offered}",
            ) from None
    return compression
