"""Bad requests get clear statuses while others keep streaming; disconnects, SIGKILL and
SIGTERM release everything; a restarted server resumes a stream byte-identically."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType

import grpc
import numpy as np
import pytest

from augserve._proto.augserve.v1 import augserve_pb2 as pb
from augserve._proto.augserve.v1 import augserve_pb2_grpc as pb_grpc
from augserve.client import AugserveClientError, Client, Reconnect
from augserve.data.demo import DemoConfig, ensure_demo_dataset
from augserve.rpc.server import DatasetConfig
from augserve.core.spec import AugmentSpec
from augserve.rpc.convert import spec_to_proto
from servers import ServerProcess, own_segments, running_server, segments_of, start_streaming_client, wait_until

SPEC = AugmentSpec.from_dict({"ops": [{"rotate": {"degrees": 15}}, {"random_resized_crop": {"size": 24}}]})
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> Path:
    return ensure_demo_dataset(DemoConfig(images_per_class=8, image_size=40), root=tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def server(dataset_root):
    with running_server({"shapes": DatasetConfig(str(dataset_root), 0.25)}, max_batch_size=32, max_prefetch=8) as server:
        yield server


class ControlClient:
    """Streams correct batches in a thread for as long as a test runs."""

    def __init__(self, address: str) -> None:
        self.client = Client(address, timeout=120)
        self.batches = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with self.client.stream("shapes", spec=SPEC, batch_size=4, epochs=0, transport="inband") as stream:
                for batch in stream:
                    assert batch.images.shape[1:] == (24, 24, 3) and len(batch.images) == len(batch.labels)
                    self.batches += 1
                    if self.stop.is_set():
                        return
        except BaseException as error:  # reported by finish()
            self.error = error

    def finish(self) -> int:
        self.stop.set()
        self.thread.join(30)
        self.client.close()
        assert self.error is None, self.error
        return self.batches


def open_message(**fields) -> pb.ClientMessage:
    base = dict(dataset="shapes", batch_size=4, epochs=1, transport=pb.TRANSPORT_INBAND)
    base.update(fields)
    spec = base.pop("spec", SPEC)
    message = pb.OpenSession(**base)
    if spec is not None:
        message.spec.CopyFrom(spec if isinstance(spec, pb.AugmentSpec) else spec_to_proto(spec))
    return pb.ClientMessage(open=message)


def raw_spec(**kwargs) -> pb.AugmentSpec:
    spec = pb.AugmentSpec(**{key: value for key, value in kwargs.items() if key != "ops"})
    for name, params in kwargs.get("ops", []):
        op = spec.ops.add(name=name)
        for key, value in params.items():
            op.params[key].CopyFrom(value)
    return spec


INVALID = Invalid = grpc.StatusCode.INVALID_ARGUMENT
CASES = {
    "empty dataset": ([open_message(dataset="")], INVALID, "open.dataset"),
    "unknown dataset": ([open_message(dataset="nope")], grpc.StatusCode.NOT_FOUND, "open.dataset"),
    "long dataset": ([open_message(dataset="x" * 300)], INVALID, "open.dataset"),
    "split enum": ([open_message(split=99)], INVALID, "open.split"),
    "unknown op": ([open_message(spec=raw_spec(ops=[("spin", {})]))], INVALID, "open.spec.ops[0]"),
    "param type": (
        [open_message(spec=raw_spec(ops=[("rotate", {"degrees": pb.ParamValue(text="ten")})]))],
        INVALID,
        "open.spec.ops[0].rotate.degrees",
    ),
    "param range": (
        [open_message(spec=raw_spec(ops=[("flip", {"horizontal": pb.ParamValue(number=7)})]))],
        INVALID,
        "open.spec.ops[0].flip.horizontal",
    ),
    "fill mode": ([open_message(spec=raw_spec(fill_mode="wrap"))], INVALID, "open.spec.fill_mode"),
    "fill value": ([open_message(spec=raw_spec(fill_value=999))], INVALID, "open.spec.fill_value"),
    "too many ops": ([open_message(spec=raw_spec(ops=[("flip", {})] * 40))], INVALID, "open.spec.ops"),
    "batch size zero": ([open_message(batch_size=0)], INVALID, "open.batch_size"),
    "batch over limit": ([open_message(batch_size=10_000)], grpc.StatusCode.RESOURCE_EXHAUSTED, "open.batch_size"),
    "huge output": (
        [open_message(spec=AugmentSpec.from_dict({"ops": [{"resize": {"size": 8192}}]}))],
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "open.spec",
    ),
    "seed": ([open_message(seed=2**64 - 1)], INVALID, "open.seed"),
    "epochs": ([open_message(epochs=2**31)], INVALID, "open.epochs"),
    "shard index": ([open_message(shard_index=5, shard_count=2)], INVALID, "open.shard_index"),
    "empty shard": ([open_message(shard_index=999, shard_count=1000)], INVALID, "open.shard_count"),
    "transport enum": ([open_message(transport=42)], INVALID, "open.transport"),
    "shared memory without probe": ([open_message(transport=pb.TRANSPORT_SHARED_MEMORY)], INVALID, "open.transport"),
    "prefetch": ([open_message(prefetch=1000)], grpc.StatusCode.RESOURCE_EXHAUSTED, "open.prefetch"),
    "resume token": ([open_message(resume_token=b"\x00garbage")], INVALID, "open.resume_token"),
    "bad image enum": ([open_message(on_bad_image=7)], INVALID, "open.on_bad_image"),
    "group enum": ([open_message(group_policy=12)], INVALID, "open.group_policy"),
    "eval size": ([open_message(split=pb.SPLIT_VALIDATION, spec=None, eval_size=[0])], INVALID, "open.eval_size"),
    "drop last": ([open_message(batch_size=32, drop_last=True, shard_count=2)], INVALID, "open.drop_last"),
    "credit before open": ([pb.ClientMessage(credit=pb.Credit(batches=1))], INVALID, "credit"),
    "release before open": ([pb.ClientMessage(release=pb.ReleaseSlot(sequence=3))], INVALID, "release"),
    "empty message": ([pb.ClientMessage()], INVALID, "message"),
    "second open": ([open_message(epochs=0), open_message()], INVALID, "open"),
    "empty second message": ([open_message(epochs=0), pb.ClientMessage()], INVALID, "message"),
}


def test_bad_requests_get_named_statuses_while_another_client_streams(server):
    control = ControlClient(server.address)
    assert wait_until(lambda: control.batches >= 3, timeout=30)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.AugmentStub(channel)
        for name, (messages, code, field) in CASES.items():
            with pytest.raises(grpc.RpcError) as caught:
                for _ in stub.Stream(iter(messages), timeout=30):
                    pass
            assert caught.value.code() == code, (name, caught.value.details())
            assert caught.value.details().startswith(field), (name, caught.value.details())
            assert "Traceback" not in caught.value.details()
    before = control.batches
    assert wait_until(lambda: control.batches > before + 3, timeout=30)
    assert control.finish() > 0
    assert wait_until(lambda: Client(server.address).server_info().live_sessions == 0)


def test_session_limit_is_resource_exhausted(dataset_root):
    with running_server({"shapes": DatasetConfig(str(dataset_root))}, max_sessions=1) as server, Client(server.address) as client:
        with client.stream("shapes", spec=SPEC, batch_size=2, epochs=0) as first:
            next(iter(first))
            with pytest.raises(AugserveClientError) as caught:
                client.stream("shapes", spec=SPEC, batch_size=2)
            assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_sessions" in caught.value.message


def test_client_disconnect_releases_session_and_slots(server):
    with Client(server.address) as client:
        stream = client.stream("shapes", spec=SPEC, batch_size=4, epochs=0, transport="shared_memory")
        iterator = iter(stream)
        next(iterator), next(iterator)
        assert own_segments()
        stream.close()
        assert wait_until(lambda: client.server_info().live_sessions == 0 and not own_segments())


@pytest.mark.parametrize("transport", ["shared_memory", "inband"])
def test_client_killed_with_sigkill_releases_everything(server, transport):
    child = start_streaming_client(server.address, "shapes", SPEC, batch_size=4, epochs=0, transport=transport)
    with child:
        assert child.stdout.readline().strip() == "streaming"
        with Client(server.address) as client:
            assert client.server_info().live_sessions == 1
            assert bool(own_segments()) == (transport == "shared_memory")
            child.kill()
            child.wait(10)
            assert wait_until(lambda: client.server_info().live_sessions == 0, timeout=20)
            assert wait_until(lambda: not own_segments())
            assert client.server_info().producers == 0


def test_sigterm_ends_streams_with_unavailable_and_a_resume_token(tmp_path, dataset_root):
    process = ServerProcess(tmp_path, {"shapes": str(dataset_root)})
    try:
        with Client(process.address, reconnect=Reconnect(attempts=0)) as client:
            stream = client.stream("shapes", spec=SPEC, batch_size=4, epochs=0, transport="shared_memory")
            received = []
            with pytest.raises(AugserveClientError) as caught:
                for batch in stream:
                    received.append(batch.resume_token)
                    if len(received) == 3:
                        assert segments_of(process.process.pid)
                        process.signal(signal.SIGTERM)
            stream.close()
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert caught.value.resume_token == received[-1]
        assert process.wait(30) == 0
        assert not segments_of(process.process.pid)
        assert "shutting down" in process.log_path.read_text()
    finally:
        process.stop()


def run_stream(address: str, batches: int | None, resume_token: bytes = b"") -> tuple[list[np.ndarray], bytes]:
    images = []
    with Client(address) as client, client.stream(
        "shapes", spec=SPEC, batch_size=5, epochs=2, seed=21, resume_token=resume_token, transport="shared_memory"
    ) as stream:
        for batch in stream:
            images.append(batch.images.copy())
            if batches is not None and len(images) == batches:
                return images, batch.resume_token
    return images, b""


def test_restarted_server_resumes_byte_identically(tmp_path, dataset_root):
    first = ServerProcess(tmp_path, {"shapes": str(dataset_root)})
    try:
        head, token = run_stream(first.address, 5)
        # Hold a session open so the crash leaves a segment behind.
        client = Client(first.address)
        holder = client.stream("shapes", spec=SPEC, batch_size=4, epochs=0, transport="shared_memory")
        next(iter(holder))
        stale = segments_of(first.process.pid)
        assert stale
        first.signal(signal.SIGKILL)
        first.wait(10)
        client.close()
        assert all(path.exists() for path in stale)
    finally:
        first.stop()
    second = ServerProcess(tmp_path, {"shapes": str(dataset_root)})
    try:
        assert not any(path.exists() for path in stale)  # removed at the next start
        tail, _ = run_stream(second.address, None, resume_token=token)
        whole, _ = run_stream(second.address, None)
        with Client(second.address) as client, pytest.raises(AugserveClientError) as caught:
            client.stream("shapes", spec=SPEC, batch_size=6, epochs=2, seed=21, resume_token=token)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and caught.value.message.startswith("open.resume_token")
    finally:
        second.stop()
    assert len(head) + len(tail) == len(whole) == 16  # 40 images, batches of 5, 2 epochs
    assert all(a.tobytes() == b.tobytes() for a, b in zip(head + tail, whole))


def load_generator() -> ModuleType:
    """scripts/generate_protos.py as a module (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("generate_protos", ROOT / "scripts" / "generate_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_stubs_are_current(tmp_path):
    generator = load_generator()
    installed, pinned = generator.installed_generator_version(), generator.pinned_generator_version()
    # Another grpcio-tools writes other text from the same protos: name the fix, not a diff.
    assert installed == pinned, generator.generator_mismatch(installed, pinned)
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_protos.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    # The stubs and the descriptor set reflection serves (generator.GENERATED_GLOBS).
    def generated_under(root: Path) -> set[Path]:
        folder = root / "augserve" / "_proto"
        return {path.relative_to(root) for pattern in generator.GENERATED_GLOBS for path in folder.rglob(pattern)}

    generated, checked_in = generated_under(tmp_path), generated_under(ROOT)
    # Equal sets: a stub nobody regenerates, or a run that wrote nothing, is stale too.
    assert generated and generated == checked_in, (sorted(map(str, generated)), sorted(map(str, checked_in)))
    for relative in sorted(generated):
        assert (ROOT / relative).read_text() == (tmp_path / relative).read_text(), (
            f"{relative} is stale: run scripts/generate_protos.py"
        )


def test_the_stub_generator_refuses_another_grpcio_tools(tmp_path, monkeypatch):
    generator = load_generator()
    assert generator.generator_mismatch("1.85.1", "1.85.1") is None
    monkeypatch.setattr(generator, "installed_generator_version", lambda: "0.0.1")
    with pytest.raises(SystemExit, match=r"0\.0\.1 is installed, but pyproject.toml pins grpcio-tools=="):
        generator.generate(tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before writing anything
    for installed, found in (("1.80.0", "1.80.0 is installed"), (None, "is not installed")):
        message = generator.generator_mismatch(installed, "1.85.1")
        assert found in message and "pip install 'grpcio-tools==1.85.1'" in message, message
    # The pin is read from pyproject.toml's test extra, whatever else it lists.
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project.optional-dependencies]\ntest = ["pytest>=8", "grpcio_tools == 1.2.3"]\n')
    assert generator.pinned_generator_version(pyproject) == "1.2.3"
    pyproject.write_text('[project.optional-dependencies]\ntest = ["grpcio-tools>=1.2"]\n')
    with pytest.raises(SystemExit, match="pin the stub generator exactly once"):
        generator.pinned_generator_version(pyproject)


def test_stale_probe_files_are_removed_at_start(tmp_path):
    import os
    import time

    from augserve.transport.ring import SHM_DIR, remove_stale_segments, write_probe

    old_name, _ = write_probe()
    fresh_name, _ = write_probe()
    long_ago = time.time() - 3600
    os.utime(SHM_DIR / old_name, (long_ago, long_ago))
    try:
        remove_stale_segments()
        assert not (SHM_DIR / old_name).exists() and (SHM_DIR / fresh_name).exists()
    finally:
        (SHM_DIR / fresh_name).unlink(missing_ok=True)
        (SHM_DIR / old_name).unlink(missing_ok=True)
