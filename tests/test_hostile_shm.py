"""Hostile clients and hostile hosts through /dev/shm, each against a real server on 127.0.0.1:
a /dev/shm too small for a ring, a member that truncates its segment, names planted in /dev/shm
before the server starts, probe names that are FIFOs, symlinks or another user's files, a
client of another user, a segment that cannot be mapped. After each, a control client still
gets the batches an unharmed server gives, byte for byte.

/dev/shm is shared by everything on the host, so nothing here fills it: the exhaustion tests
run their server and clients in a mount namespace of their own over a 4 MiB tmpfs. Names
planted in the real /dev/shm carry pids that cannot be alive and are removed afterwards.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from servers import ServerProcess, running_server, segments_of, wait_until

from augserve.client import AugserveClientError, Client, Reconnect
from augserve.core.spec import AugmentSpec
from augserve.data.demo import DemoConfig, ensure_demo_dataset
from augserve.rpc.server import DatasetConfig
from augserve.streaming.limits import Limits
from augserve.transport.ring import SHM_DIR

ROOT = Path(__file__).resolve().parent.parent
SPEC = AugmentSpec.from_dict({"ops": [{"rotate": {"degrees": 10}}, {"flip": {}}, {"random_resized_crop": {"size": 24}}]})
# 16 images of 192 x 192 x 3: 1.7 MiB a slot, 12 slots (prefetch 4 + group window 8) 20 MiB,
# and two epochs of the demo's 40 images write 6 of them: past a 4 MiB /dev/shm either way.
BIG_SPEC = AugmentSpec.from_dict({"ops": [{"random_resized_crop": {"size": 192}}]})
NOBODY = 65534
PRIVATE_SHM_SIZE = "4m"
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (chown to another uid, setuid)")

CONTROL_OPTIONS = {"batch_size": 4, "seed": 5, "epochs": 1}
# The scripts below run in other processes (a private /dev/shm, another uid) and import their
# helpers from this module: run from the repository root, tests/ is on their path.
SCRIPT_PRELUDE = """
import json, os, sys
sys.path.insert(0, "tests")
from test_hostile_shm import BIG_SPEC, CONTROL_OPTIONS, NOBODY, SPEC, batch_digests, control_digests
from augserve.client import AugserveClientError, Client
"""


def batch_digests(stream) -> list[str]:
    """sha256 of each batch's images and labels."""
    return [hashlib.sha256(batch.images.tobytes() + batch.labels.tobytes()).hexdigest() for batch in stream]


def control_digests(client: Client, transport: str) -> list[str]:
    """The control stream: one epoch of SPEC, batches of 4, seed 5."""
    with client.stream("shapes", spec=SPEC, transport=transport, **CONTROL_OPTIONS) as stream:
        return batch_digests(stream)


def control_run(address: str, transport: str = "auto") -> list[str]:
    with Client(address, timeout=60) as client:
        return control_digests(client, transport)


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> Path:
    return ensure_demo_dataset(DemoConfig(images_per_class=8, image_size=32), root=tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def server(dataset_root):
    with running_server({"shapes": DatasetConfig(str(dataset_root))}) as server:
        yield server


@pytest.fixture(scope="module")
def baseline(server) -> list[str]:
    """The control stream from an unharmed server, before any attack."""
    digests = control_run(server.address, "inband")
    assert len(digests) > 1
    return digests


def segment_like(pid: int | str) -> Path:
    return SHM_DIR / f"augserve-{os.getuid()}-{pid}-planted{secrets.token_hex(4)}"


def probe_like() -> Path:
    return SHM_DIR / f"augserve-probe-{secrets.token_hex(16)}"


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def remove_planted(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    else:
        path.unlink(missing_ok=True)


# --- /dev/shm exhaustion, in a private tmpfs ---


@functools.cache
def private_shm_refused() -> str | None:
    """Why a private /dev/shm cannot be mounted here, or None where it can."""
    if not IS_ROOT:
        return "a private /dev/shm needs root (unshare -m and mount)"
    try:
        result = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
            capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unshare is not usable: {error}"
    return None if result.returncode == 0 else f"unshare/mount refused: {result.stderr.strip()}"


def run_with_private_shm(script: str, *arguments: str) -> dict:
    """Run a Python `script` in a mount namespace whose /dev/shm is a fresh 4 MiB tmpfs (the
    real one is never touched); the JSON object it prints last."""
    reason = private_shm_refused()
    if reason is not None:
        pytest.skip(reason)
    mount = f'mount -t tmpfs -o size={PRIVATE_SHM_SIZE} tmpfs /dev/shm && exec "$0" "$@"'
    command = ["unshare", "-m", "--propagation", "private", "sh", "-c", mount, sys.executable, "-c", script, *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=90, cwd=ROOT, check=False)
    if result.returncode < 0:
        pytest.fail(f"the script was killed by {signal.Signals(-result.returncode).name}:\n{result.stderr[-3000:]}")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


RING_IN_FULL_SHM = '''
import json, os
from augserve.core.errors import LimitError
from augserve.transport.ring import SHM_DIR, SharedMemoryExhausted, SlotRing, shared_memory_free_bytes
result = {"free": shared_memory_free_bytes()}
try:
    ring = SlotRing(8, 1 << 20, shared=True)  # 8 MiB into 4 MiB
    for slot in range(8):  # unreserved pages past the 4 MiB would be a SIGBUS
        ring.view_for_writing(slot, (1 << 20,))[:] = 1
    result["created"] = ring.name
except SharedMemoryExhausted as error:
    result.update(message=str(error), needed=error.needed_bytes, is_limit_error=isinstance(error, LimitError))
result["left_behind"] = os.listdir(SHM_DIR)
small = SlotRing(2, 1 << 20, shared=True)  # what fits is still served
small.view_for_writing(1, (1 << 20,))[:] = 7
result["small_ring_written"] = int(small.view(1, (1 << 20,)).min()) == 7
small.close()
print(json.dumps(result))
'''


def test_a_ring_larger_than_free_shm_is_refused_before_any_write():
    result = run_with_private_shm(RING_IN_FULL_SHM)
    assert "created" not in result, result
    assert result["is_limit_error"] and result["needed"] == 8 << 20
    message = result["message"]
    assert f"needs {8 << 20} bytes" in message and f"has {result['free']} bytes" in message, message
    assert 'transport="inband"' in message and "--shm-size" in message, message
    assert result["left_behind"] == [] and result["small_ring_written"]


SERVER_IN_FULL_SHM = SCRIPT_PRELUDE + '''
from servers import running_server
from augserve.rpc.server import DatasetConfig
from augserve.transport.ring import SHM_DIR

root = sys.argv[1]
segments = lambda: sorted(name for name in os.listdir(SHM_DIR) if name.startswith("augserve-"))
result = {}
with running_server({"shapes": DatasetConfig(root)}) as server, Client(server.address, timeout=60) as client:
    result["before"] = control_digests(client, "shared_memory")
    for transport in ("shared_memory", "auto"):
        try:
            with client.stream("shapes", spec=BIG_SPEC, batch_size=16, epochs=2, transport=transport) as stream:
                images = [batch.images.shape for batch in stream]
            result[transport] = {"transport": stream.facts.transport, "batches": len(images)}
        except AugserveClientError as error:
            result[transport] = {"code": error.code.name, "message": error.message}
        result[transport]["segments_after"] = segments()
    result["after"] = control_digests(client, "shared_memory")
    result["live_sessions"] = client.server_info().live_sessions
result["left_behind"] = segments()
print(json.dumps(result))
'''


@pytest.fixture(scope="module")
def full_shm_outcome(dataset_root) -> dict:
    """One server in a 4 MiB /dev/shm: a control stream, a 20 MiB ring's stream with each
    transport, the control stream again."""
    return run_with_private_shm(SERVER_IN_FULL_SHM, str(dataset_root))


def test_full_shm_is_resource_exhausted_for_explicit_shared_memory(full_shm_outcome, baseline):
    explicit = full_shm_outcome["shared_memory"]
    assert explicit.get("code") == "RESOURCE_EXHAUSTED", explicit
    assert "shared memory exhausted" in explicit["message"] and 'transport="inband"' in explicit["message"]
    assert explicit["segments_after"] == []  # the refused ring's file is gone
    # The server lives on, and shared memory still serves what fits.
    assert full_shm_outcome["before"] == full_shm_outcome["after"] == baseline
    assert full_shm_outcome["live_sessions"] == 0 and full_shm_outcome["left_behind"] == []


def test_full_shm_falls_back_to_inband_for_transport_auto(full_shm_outcome, baseline):
    automatic = full_shm_outcome["auto"]
    assert automatic.get("transport") == "inband" and automatic["batches"] > 0, automatic
    assert automatic["segments_after"] == []
    assert full_shm_outcome["after"] == baseline


# --- a member truncates its segment ---


def test_a_truncated_segment_ends_its_stream_with_unavailable(tmp_path, dataset_root, baseline):
    # A process of its own: before the fix, the server died of SIGBUS here, and pytest with it.
    process = ServerProcess(tmp_path, {"shapes": str(dataset_root)})
    try:
        prefetch = 1
        slot_count = prefetch + Limits().group_window
        # Without reconnecting, to see the status (a client that reconnects carries on with a new ring).
        with Client(process.address, timeout=60, reconnect=Reconnect(attempts=0)) as client:
            produced = client.server_info().batches_produced
            with client.stream(
                "shapes", spec=SPEC, batch_size=2, seed=5, epochs=0, prefetch=prefetch, transport="shared_memory"
            ) as stream:
                batches = iter(stream)
                first = next(batches)
                assert not first.images.flags.writeable  # the client maps the ring read-only
                tokens = [first.resume_token]
                del first
                # Every slot filled: the producer now waits for the client to release one.
                assert wait_until(lambda: client.server_info().batches_produced - produced >= slot_count)
                [segment] = segments_of(process.process.pid)
                assert segment.stat().st_mode & 0o777 == 0o400
                if not IS_ROOT:
                    segment.chmod(0o600)  # the owner may; root needs not
                os.truncate(segment, 0)
                with pytest.raises(AugserveClientError) as caught:
                    # Releasing a slot lets the producer write again. The batches still buffered
                    # arrive as references to truncated pages: their pixels are never touched.
                    for batch in batches:
                        tokens.append(batch.resume_token)
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE, caught.value
            assert "truncated by another process" in caught.value.message
            assert caught.value.resume_token == tokens[-1]
            assert control_run(process.address, "shared_memory") == baseline
            assert process.process.poll() is None
            assert wait_until(lambda: not segments_of(process.process.pid))
    finally:
        process.stop()


# --- names planted in /dev/shm before the server starts ---


def plant_huge_pid() -> Path:
    path = segment_like(10**20)  # os.kill(10**20, 0) overflows
    path.write_bytes(b"x")
    return path


def plant_directory() -> Path:
    path = segment_like(dead_pid())
    path.mkdir()
    return path


def plant_fifo() -> Path:
    path = segment_like(dead_pid())
    os.mkfifo(path, 0o600)
    return path


def plant_foreign_file() -> Path:
    path = segment_like(dead_pid())
    path.write_bytes(b"not yours")
    os.chown(path, NOBODY, NOBODY)
    return path


PLANTS = {
    "huge pid": plant_huge_pid,
    "directory": plant_directory,
    "fifo": plant_fifo,
    "file of another uid": pytest.param(plant_foreign_file, marks=needs_root),
}


@pytest.mark.parametrize("plant", PLANTS.values(), ids=PLANTS.keys())
def test_planted_names_are_logged_and_skipped_at_start(plant, dataset_root, baseline, caplog):
    path = plant()
    try:
        with caplog.at_level(logging.WARNING, logger="augserve.transport.ring"), running_server(
            {"shapes": DatasetConfig(str(dataset_root))}
        ) as server:
            assert control_run(server.address, "shared_memory") == baseline
        assert os.path.lexists(path)  # not ours to remove
        assert any(str(path) in record.getMessage() for record in caplog.records), caplog.text
    finally:
        remove_planted(path)


# --- hostile probe names ---


def fifo_probe(nonce: bytes, tmp_path: Path) -> Path:
    path = probe_like()
    os.mkfifo(path, 0o600)  # opening it for reading would wait for a writer
    return path


def symlink_probe(nonce: bytes, tmp_path: Path) -> Path:
    secret = tmp_path / "secret"  # stands for a file only the server's user can read
    secret.write_bytes(nonce)
    secret.chmod(0o600)
    path = probe_like()
    path.symlink_to(secret)
    return path


def foreign_probe(nonce: bytes, tmp_path: Path) -> Path:
    path = probe_like()
    path.write_bytes(nonce)
    path.chmod(0o600)
    os.chown(path, NOBODY, NOBODY)
    return path


def unblock_fifo(path: Path) -> None:
    """Let a reader blocked in open() of the FIFO `path` go (nothing happens without one)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


PROBES = {
    "fifo": fifo_probe,
    "symlink to a matching file": symlink_probe,
    "probe of another uid": pytest.param(foreign_probe, marks=needs_root),
}


@pytest.mark.parametrize("make_probe", PROBES.values(), ids=PROBES.keys())
def test_hostile_probe_names_get_inband_without_hanging(make_probe, server, baseline, tmp_path, monkeypatch):
    nonce = secrets.token_bytes(16)
    path = make_probe(nonce, tmp_path)
    monkeypatch.setattr("augserve.client.stream.write_probe", lambda: (path.name, nonce))
    monkeypatch.setattr("augserve.client.stream.remove_probe", lambda name: None)  # the test removes it
    try:
        # The deadline bounds the open: before the fix a FIFO held the RPC thread in open().
        with Client(server.address, timeout=10) as client, client.stream(
            "shapes", spec=SPEC, transport="auto", **CONTROL_OPTIONS
        ) as stream:
            assert stream.facts.transport == "inband"  # nothing confirmed
            digests = batch_digests(stream)
        assert digests == baseline
        monkeypatch.undo()
        assert control_run(server.address, "shared_memory") == baseline
    finally:
        if path.is_fifo():
            unblock_fifo(path)
        path.unlink(missing_ok=True)


# --- a client of another user ---

NOBODY_CLIENT = SCRIPT_PRELUDE + '''
client = Client(sys.argv[1], timeout=60)
client.server_info()  # connect, and load what streaming needs, while root may still read it
os.setgroups([])
os.setgid(NOBODY)
os.setuid(NOBODY)
result = {"uid": os.getuid()}
with client.stream("shapes", spec=SPEC, transport="auto", **CONTROL_OPTIONS) as stream:
    result["transport"] = stream.facts.transport
    result["batches"] = batch_digests(stream)
try:
    client.stream("shapes", spec=SPEC, transport="shared_memory", **CONTROL_OPTIONS)
except AugserveClientError as error:
    result["explicit"] = {"code": error.code.name, "message": error.message}
print(json.dumps(result))
'''


@needs_root
def test_a_client_of_another_user_gets_inband(server, baseline):
    # The interpreter lives under /root (0700 here), so the child starts as root and drops to
    # nobody once its modules are loaded; from then on it is an ordinary client of uid 65534.
    result = subprocess.run(
        [sys.executable, "-c", NOBODY_CLIENT, server.address],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["uid"] == NOBODY and outcome["transport"] == "inband"
    assert outcome["batches"] == baseline
    explicit = outcome["explicit"]
    assert explicit["code"] == "INVALID_ARGUMENT" and explicit["message"].startswith("open.transport"), explicit
    assert control_run(server.address, "shared_memory") == baseline


# --- a segment the client cannot map ---


def test_a_segment_the_client_cannot_map_is_a_client_error(server, baseline, monkeypatch):
    import augserve.client.stream as client_stream

    real_reader = client_stream.SlotReader
    names = []

    def removed_first(name: str, slot_bytes: int):
        """Another process removes the segment between the server's answer and the mapping."""
        names.append(name)
        (SHM_DIR / name).unlink()
        return real_reader(name, slot_bytes)

    monkeypatch.setattr(client_stream, "SlotReader", removed_first)
    with Client(server.address, timeout=30) as client:
        with pytest.raises(AugserveClientError) as caught:
            client.stream("shapes", spec=SPEC, transport="shared_memory", **CONTROL_OPTIONS)
        assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert names[0] in caught.value.message and 'transport="inband"' in caught.value.message, caught.value
        assert wait_until(lambda: client.server_info().live_sessions == 0)  # the session was closed
    monkeypatch.undo()
    assert control_run(server.address, "shared_memory") == baseline
