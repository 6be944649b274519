"""Conversions between wire messages and augserve's own types, with field-named validation.

Specs travel as a generic list of ops with named parameters (the op registry stays the one
definition of ops; the proto does not repeat it). Every check here raises `SpecError` naming
the message field, which the server turns into INVALID_ARGUMENT.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from augserve._proto.augserve.v1 import augserve_pb2 as pb
from augserve.core.errors import SpecError
from augserve.core.plan import MAX_EPOCH, MAX_SAMPLE_ID, MAX_SEED
from augserve.core.policy import BadImagePolicy
from augserve.core.spec import AugmentSpec

SPLIT_NAMES = {pb.SPLIT_UNSPECIFIED: "train", pb.SPLIT_TRAIN: "train", pb.SPLIT_VALIDATION: "validation", pb.SPLIT_ALL: "all"}
SPLIT_VALUES = {"train": pb.SPLIT_TRAIN, "validation": pb.SPLIT_VALIDATION, "all": pb.SPLIT_ALL}
TRANSPORT_NAMES = {
    pb.TRANSPORT_UNSPECIFIED: "auto",
    pb.TRANSPORT_INBAND: "inband",
    pb.TRANSPORT_SHARED_MEMORY: "shared_memory",
}
TRANSPORT_VALUES = {"auto": pb.TRANSPORT_UNSPECIFIED, "inband": pb.TRANSPORT_INBAND, "shared_memory": pb.TRANSPORT_SHARED_MEMORY}
BAD_IMAGE_NAMES = {
    pb.BAD_IMAGE_POLICY_UNSPECIFIED: "skip",
    pb.BAD_IMAGE_POLICY_SKIP: "skip",
    pb.BAD_IMAGE_POLICY_FAIL: "fail",
}
BAD_IMAGE_VALUES = {"skip": pb.BAD_IMAGE_POLICY_SKIP, "fail": pb.BAD_IMAGE_POLICY_FAIL}
GROUP_POLICY_NAMES = {
    pb.GROUP_POLICY_UNSPECIFIED: "lockstep",
    pb.GROUP_POLICY_LOCKSTEP: "lockstep",
    pb.GROUP_POLICY_DETACH: "detach",
    pb.GROUP_POLICY_ALONE: "alone",
}
GROUP_POLICY_VALUES = {"lockstep": pb.GROUP_POLICY_LOCKSTEP, "detach": pb.GROUP_POLICY_DETACH, "alone": pb.GROUP_POLICY_ALONE}
RESUME_METADATA_KEY = "augserve-resume-token-bin"
TOKEN_VERSION = 1


def _enum_name(field: str, value: int, names: dict[int, str]) -> str:
    if value not in names:
        raise SpecError(field, f"unknown enum value {value}")
    return names[value]


# ---- specs ----


def _param_to_proto(value: Any) -> pb.ParamValue:
    if isinstance(value, bool):
        return pb.ParamValue(flag=value)
    if isinstance(value, (int, float)):
        return pb.ParamValue(number=float(value))
    if isinstance(value, str):
        return pb.ParamValue(text=value)
    return pb.ParamValue(numbers=pb.NumberList(values=[float(v) for v in value]))


def _plain_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _param_from_proto(value: pb.ParamValue) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "flag":
        return value.flag
    if kind == "number":
        return _plain_number(value.number)
    if kind == "text":
        return value.text
    if kind == "numbers":
        return [_plain_number(v) for v in value.numbers.values]
    return None


def spec_to_proto(spec: AugmentSpec) -> pb.AugmentSpec:
    message = pb.AugmentSpec(fill_mode=spec.fill_mode, fill_value=spec.fill_value)
    for op in spec.ops:
        entry = message.ops.add(name=op.name)
        for key, value in op.params:
            entry.params[key].CopyFrom(_param_to_proto(value))
    return message


def spec_from_proto(message: pb.AugmentSpec, field: str = "open.spec") -> AugmentSpec:
    """Validate a wire spec through the op registry; errors name e.g. open.spec.ops[0].rotate.degrees."""
    data = {
        "ops": [{op.name: {key: _param_from_proto(value) for key, value in op.params.items()}} for op in message.ops],
        "fill_mode": message.fill_mode or "constant",
        "fill_value": int(message.fill_value),
    }
    try:
        return AugmentSpec.from_dict(data)
    except SpecError as error:
        raise SpecError(f"{field}.{error.field}", error.message) from None


# ---- tensors ----


def fill_tensor(message: pb.Tensor, array: np.ndarray) -> None:
    """Write `array` into a (nested) Tensor message in place: one copy of the pixels."""
    message.shape.extend(array.shape)
    message.dtype = array.dtype.name
    message.data = np.ascontiguousarray(array).tobytes()


def tensor_from_proto(message: pb.Tensor) -> np.ndarray:
    """A read-only view of the message's bytes (no copy)."""
    return np.frombuffer(message.data, dtype=np.dtype(message.dtype)).reshape(tuple(message.shape))


# ---- resume tokens ----


@dataclass(frozen=True)
class ResumeToken:
    """Where a stream continues: the next sample (`position` in `epoch`'s shard order) of the
    stream whose parameters hash to `stream_hash`."""

    stream_hash: str
    epoch: int
    position: int

    def encode(self) -> bytes:
        text = json.dumps({"v": TOKEN_VERSION, "stream": self.stream_hash, "epoch": self.epoch, "position": self.position})
        return base64.urlsafe_b64encode(text.encode())

    @classmethod
    def decode(cls, data: bytes, field: str = "open.resume_token") -> ResumeToken:
        try:
            fields = json.loads(base64.urlsafe_b64decode(data))
            if fields["v"] != TOKEN_VERSION:
                raise ValueError("version")
            token = cls(str(fields["stream"]), int(fields["epoch"]), int(fields["position"]))
        except Exception:
            raise SpecError(field, "not a resume token issued by an augserve server") from None
        if not 0 <= token.epoch <= MAX_EPOCH or not 0 <= token.position <= MAX_SAMPLE_ID:
            raise SpecError(field, "not a resume token issued by an augserve server")
        return token


def stream_hash(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


# ---- opening a session ----


@dataclass(frozen=True)
class SessionRequest:
    """A validated OpenSession. Limits that depend on the server are checked by the sessions
    module."""

    dataset: str
    split: str
    spec: AugmentSpec
    batch_size: int
    seed: int
    epochs: int  # 0: endless
    shard_index: int
    shard_count: int
    transport: str
    prefetch: int  # 0: the server's default
    resume: ResumeToken | None
    bad_image_policy: BadImagePolicy
    drop_last: bool
    group_policy: str
    group_size: int
    shm_probe_name: str
    shm_probe_nonce: bytes


def parse_open(message: pb.OpenSession, eval_spec_for, max_pixels: int) -> SessionRequest:
    """Validate an OpenSession; `eval_spec_for((h, w))` gives the default validation spec."""
    if not message.dataset:
        raise SpecError("open.dataset", "required: the name of a dataset this server serves")
    if len(message.dataset) > 256:
        raise SpecError("open.dataset", "longer than 256 characters")
    split = _enum_name("open.split", message.split, SPLIT_NAMES)
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
        transport=_enum_name("open.transport", message.transport, TRANSPORT_NAMES),
        prefetch=message.prefetch,
        resume=resume,
        bad_image_policy=BadImagePolicy(_enum_name("open.on_bad_image", message.on_bad_image, BAD_IMAGE_NAMES), max_pixels),
        drop_last=message.drop_last,
        group_policy=_enum_name("open.group_policy", message.group_policy, GROUP_POLICY_NAMES),
        group_size=message.group_size,
        shm_probe_name=message.shm_probe_name,
        shm_probe_nonce=message.shm_probe_nonce,
    )
