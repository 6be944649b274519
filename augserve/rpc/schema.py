"""The contract describing itself: DescribeOps messages from the op registry's schema, and the
descriptor pool that server reflection answers from.

Reflection (grpc_reflection) serves whatever pool it is given, and two things of protobuf's
pools (upb and pure Python alike) make the default one fall short:

- `FindFileContainingSymbol` resolves messages, fields, enums, enum values and services but
  not methods, so `grpcurl describe augserve.v1.Augment.Stream` got NOT_FOUND ("Symbol not
  found"; grpc/grpc#34743). `ReflectionPool` looks a method up through its service.
- grpc_reflection sends `FileDescriptor.CopyToProto()`, which drops source info, and the
  generated `_pb2` modules hold none anyway: no comments reached clients. `ReflectionPool`
  sends the FileDescriptorProtos of augserve/_proto/descriptor_set.py (generated with
  `--include_source_info`) as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor

from augserve._proto import descriptor_set
from augserve._proto.augserve.v1 import augserve_pb2 as pb
from augserve.core.ops.schema import OpSchema, ParamSchema, SpecSchema, registry_schema, spec_schema

# `param_to_proto` is how a spec's parameter values travel: a default sent the same way can be
# put into an Op as it is.
from augserve.rpc.convert import param_to_proto

PARAM_TYPES = {
    "float": pb.PARAM_TYPE_FLOAT,
    "int": pb.PARAM_TYPE_INT,
    "range": pb.PARAM_TYPE_RANGE,
    "size": pb.PARAM_TYPE_SIZE,
    "bool": pb.PARAM_TYPE_BOOL,
    "choice": pb.PARAM_TYPE_CHOICE,
}


# ---- DescribeOps ----


def param_schema_to_proto(param: ParamSchema) -> pb.ParamSchema:
    message = pb.ParamSchema(
        name=param.name,
        type=PARAM_TYPES[param.kind],
        doc=param.doc,
        unit=param.unit,
        required=param.required,
        choices=list(param.choices),
        summary=param.summary,
    )
    # Presence carries meaning (no bounds for bool and choice), so unset stays unset.
    if param.low is not None:
        message.low = param.low
    if param.high is not None:
        message.high = param.high
    if param.center is not None:
        message.center = param.center
    if param.default is not None:
        message.default_value.CopyFrom(param_to_proto(param.default))
    return message


def op_schema_to_proto(op: OpSchema) -> pb.OpSchema:
    return pb.OpSchema(
        name=op.name,
        category=op.category,
        doc=op.doc,
        fixes_size=op.fixes_size,
        params=[param_schema_to_proto(param) for param in op.params],
    )


def spec_schema_to_proto(spec: SpecSchema) -> pb.SpecSchema:
    return pb.SpecSchema(keys=[param_schema_to_proto(key) for key in spec.keys], max_ops=spec.max_ops)


def describe_ops_response() -> pb.DescribeOpsResponse:
    """The registry's ops and the spec-level keys, as DescribeOps answers."""
    return pb.DescribeOpsResponse(
        ops=[op_schema_to_proto(op) for op in registry_schema()],
        spec=spec_schema_to_proto(spec_schema()),
    )


# ---- reflection ----


@dataclass(frozen=True, eq=False)
class SourceFile:
    """A proto file as grpc_reflection reads one from a pool's answers: its `name`, its
    `dependencies` (SourceFiles) and `CopyToProto`, here the whole FileDescriptorProto with its
    source info rather than the descriptor's copy without it."""

    name: str
    dependencies: tuple[SourceFile, ...]
    proto: descriptor_pb2.FileDescriptorProto

    def CopyToProto(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        proto.CopyFrom(self.proto)


class ReflectionPool:
    """The pool interface grpc_reflection calls (`enable_server_reflection(..., pool=...)`),
    over protobuf's DescriptorPool, answering file requests with `SourceFile`s and resolving
    method names."""

    def __init__(self, files: Sequence[descriptor_pb2.FileDescriptorProto]) -> None:
        """`files` in dependency order (every file after those it imports), names unique."""
        self._pool = descriptor_pool.DescriptorPool()
        self._files: dict[str, SourceFile] = {}
        for proto in files:
            self._pool.Add(proto)
            dependencies = tuple(self._files[name] for name in proto.dependency)
            self._files[proto.name] = SourceFile(proto.name, dependencies, proto)

    def FindFileByName(self, name: str) -> SourceFile:
        return self._files[name]  # KeyError for an unknown file, as grpc_reflection expects

    def FindFileContainingSymbol(self, symbol: str) -> SourceFile:
        try:
            found: FileDescriptor = self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            found = self._file_of_method(symbol)
        return self._files[found.name]

    def _file_of_method(self, symbol: str) -> FileDescriptor:
        service_name, _, method = symbol.rpartition(".")
        try:
            service = self._pool.FindServiceByName(service_name)
        except KeyError:
            raise KeyError(symbol) from None
        if method not in service.methods_by_name:
            raise KeyError(symbol)
        return service.file

    def FindMessageTypeByName(self, name: str) -> Descriptor:
        return self._pool.FindMessageTypeByName(name)

    def FindExtensionByNumber(self, message: Descriptor, number: int) -> FieldDescriptor:
        return self._pool.FindExtensionByNumber(message, number)

    def FindAllExtensions(self, message: Descriptor) -> list[FieldDescriptor]:
        return self._pool.FindAllExtensions(message)


def _with_dependencies(file: FileDescriptor, seen: dict[str, descriptor_pb2.FileDescriptorProto]) -> None:
    """Add `file` and, first, what it imports to `seen` (dependency order)."""
    for dependency in file.dependencies:
        if dependency.name not in seen:
            _with_dependencies(dependency, seen)
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    seen[file.name] = proto


def reflection_pool(service_names: Iterable[str]) -> ReflectionPool:
    """A pool describing `service_names`: augserve's own files from the generated descriptor
    set (with comments), any other service (health, reflection) from the files its Python stubs
    registered in protobuf's default pool (without comments; their packages ship none)."""
    contract = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.SERIALIZED)
    files = {proto.name: proto for proto in contract.file}
    own_services = {f"{proto.package}.{service.name}" for proto in contract.file for service in proto.service}
    others: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    for name in service_names:
        if name not in own_services:
            _with_dependencies(descriptor_pool.Default().FindServiceByName(name).file, others)
    # A file both sets hold (a shared import such as google/protobuf/*.proto) comes from ours.
    return ReflectionPool(list(files.values()) + [proto for name, proto in others.items() if name not in files])
