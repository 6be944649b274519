"""Conversions between wire messages and augserve's own types, shared by the server and the client.

Specs travel as a generic list of ops with named parameters (the op registry stays the one
definition of ops; the proto does not repeat it). Every check here raises `SpecError` naming
the message field, which the server turns into INVALID_ARGUMENT.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from augserve._proto.augserve.v1 import augserve_pb2 as pb
from augserve.core.errors import SpecError
from augserve.core.spec import AugmentSpec
from augserve.core.targets import TargetRequest

SPLIT_NAMES = {pb.SPLIT_UNSPECIFIED: "train", pb.SPLIT_TRAIN: "train", pb.SPLIT_VALIDATION: "validation", pb.SPLIT_ALL: "all"}
SPLIT_VALUES = {"train": pb.SPLIT_TRAIN, "validation": pb.SPLIT_VALIDATION, "all": pb.SPLIT_ALL}
TRANSPORT_NAMES = {
    pb.TRANSPORT_UNSPECIFIED: "auto",
    pb.TRANSPORT_INBAND: "inband",
    pb.TRANSPORT_SHARED_MEMORY: "shared_memory",
    pb.TRANSPORT_CUDA_IPC: "cuda_ipc",
}
TRANSPORT_VALUES = {name: value for value, name in TRANSPORT_NAMES.items()}
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


def enum_name(field: str, value: int, names: dict[int, str]) -> str:
    if value not in names:
        raise SpecError(field, f"unknown enum value {value}")
    return names[value]


# ---- specs ----


def param_to_proto(value: Any) -> pb.ParamValue:
    if isinstance(value, bool):
        return pb.ParamValue(flag=value)
    if isinstance(value, (int, float)):
        return pb.ParamValue(number=float(value))
    if isinstance(value, str):
        return pb.ParamValue(text=value)
    return pb.ParamValue(numbers=pb.NumberList(values=[float(v) for v in value]))


def _plain_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def param_from_proto(value: pb.ParamValue) -> Any:
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
            entry.params[key].CopyFrom(param_to_proto(value))
    return message


def spec_from_proto(message: pb.AugmentSpec, field: str = "open.spec") -> AugmentSpec:
    """Validate a wire spec through the op registry; errors name e.g. open.spec.ops[0].rotate.degrees."""
    data = {
        "ops": [{op.name: {key: param_from_proto(value) for key, value in op.params.items()}} for op in message.ops],
        "fill_mode": message.fill_mode or "constant",
        "fill_value": int(message.fill_value),
    }
    try:
        return AugmentSpec.from_dict(data)
    except SpecError as error:
        raise SpecError(f"{field}.{error.field}", error.message) from None


# ---- tensors ----


def targets_to_proto(targets: TargetRequest) -> pb.TargetRequest:
    return pb.TargetRequest(
        boxes=targets.boxes, keypoints=targets.keypoints, masks=targets.masks, min_area=targets.min_area,
        min_visibility=targets.min_visibility, erase_marks_ignore=targets.erase_marks_ignore,
    )


def tensor_from_proto(message: pb.Tensor) -> np.ndarray:
    """A read-only view of the message's bytes (no copy)."""
    return np.frombuffer(message.data, dtype=np.dtype(message.dtype)).reshape(tuple(message.shape))
