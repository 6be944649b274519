"""The images, built and run. tests/test_deploy.py checks the container files offline; here podman
builds the server and trainer images (scripts/containers.py) and runs them the way
deploy/compose.yaml and the Kubernetes pod in deploy/kubernetes/sweep-job.yaml do:

- both images build: from a Debian base made locally from Debian's packages (no container
  registry is reachable here), the trainer's torch from the CPU wheel in pip's find-links where
  this machine keeps one; in Docker format, which keeps the HEALTHCHECK;
- the server runs read-only (`--read-only`, a volume for its cache) and its health check passes,
  from the image (Docker format) and, for an OCI image that has none, given at run time;
- two trainer containers in the server's IPC namespace share one stream over shared memory:
  the server delivers every batch it produces twice, and logs both sessions as shared memory;
- servers in other containers (other PID namespaces) that share that /dev/shm leave a live
  server's segments alone and remove those of a killed one, whatever pids their names carry;
- `podman stop` (SIGTERM) ends a live stream with UNAVAILABLE and a resume token that another
  server container continues byte for byte, and the container exits 0.

Needs root, and podman, runc and debootstrap: where they are missing and apt-get exists they are
installed (`apt-get install podman runc debootstrap`). The base image's root file system is
cached under $AUGSERVE_CACHE/containers (default ~/.cache/augserve/containers), the images'
layers in podman's storage: a second run rebuilds only what changed. It skips, saying why, only
where it cannot run: not root, no apt-get, or the packages cannot be installed.

The sweep's rule itself (a segment is live while a server holds its lock) is checked first
without containers, on plain files in /dev/shm.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import re
import secrets
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import grpc
import pytest
import yaml

from augserve.client import AugserveClientError, Client, Reconnect
from augserve.transport.ring import SEGMENT_PATTERN, SHM_DIR, SlotRing, remove_stale_segments

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "deploy" / "compose.yaml"
TOOLS = ("podman", "runc", "debootstrap")
IMAGE_USER = 10001  # the Dockerfile's USER of both images
# A cold run builds the base (about 2 minutes) and both images (about 5 more); pytest-timeout's
# 300 s covers a warm one.
pytestmark = pytest.mark.timeout(1500)


def load_containers() -> ModuleType:
    """scripts/containers.py as a module (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("augserve_containers", ROOT / "scripts" / "containers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# --- the sweep's rule, without containers ---------------------------------------------------


def planted_segment(pid: int) -> Path:
    path = SHM_DIR / f"augserve-{os.getuid()}-{pid}-test{secrets.token_hex(4)}"
    path.write_bytes(b"ring")
    path.chmod(0o400)
    return path


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_the_sweep_keeps_a_locked_segment_whatever_pid_its_name_carries():
    """A server in another PID namespace: the pid in its segment's name is dead here."""
    path = planted_segment(dead_pid())
    try:
        fd = os.open(path, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_SH)  # what that server holds for as long as it lives
        try:
            remove_stale_segments()
            assert path.exists(), "a live server's segment was removed"
        finally:
            os.close(fd)  # the server dies: the kernel drops its lock
        remove_stale_segments()
        assert not path.exists(), "a dead server's segment was kept"
    finally:
        path.unlink(missing_ok=True)


def test_the_sweep_removes_an_unlocked_segment_even_if_its_pid_is_alive():
    """A restarted container's server is pid 1 again, like the dead one before it: the name's
    pid is alive, its server is not."""
    path = planted_segment(os.getpid())
    try:
        remove_stale_segments()
        assert not path.exists(), "a dead server's segment was kept because its pid lives here"
    finally:
        path.unlink(missing_ok=True)


def test_a_ring_is_locked_until_it_is_closed():
    ring = SlotRing(2, 4096, shared=True)
    path = SHM_DIR / ring.name
    try:
        remove_stale_segments()
        assert path.exists()
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    finally:
        ring.close()
    assert not path.exists()


# --- building the images --------------------------------------------------------------------


def container_refusal() -> str | None:
    """Why podman cannot run containers here, after installing what is missing; None if it can."""
    if os.geteuid() != 0:
        return "building and running images with podman needs root here"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not missing:
        return None
    if shutil.which("apt-get") is None:
        return f"{', '.join(missing)} missing and no apt-get to install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *TOOLS]):
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, check=False)
        if result.returncode != 0:
            return f"{' '.join(command)} failed: {(result.stderr or result.stdout)[-1000:]}"
    return None


@dataclass(frozen=True)
class Images:
    tools: ModuleType
    base: str
    seconds: dict[str, float]


@pytest.fixture(scope="module")
def images() -> Images:
    reason = container_refusal()
    if reason:
        pytest.skip(reason)
    tools = load_containers()
    seconds = {}
    started = time.monotonic()
    suite = tools.host_release()
    base = tools.ensure_base_image(tools.BaseRecipe(suite, tools.apt_mirror(suite)))
    seconds["base"] = time.monotonic() - started
    seconds["server"] = tools.build_image("server", tools.SERVER_IMAGE, base)
    wheels, version = tools.local_torch_wheels(tools.TORCH_VERSION) or (None, None)  # else PyPI's
    seconds["trainer"] = tools.build_image("trainer", tools.TRAINER_IMAGE, base, torch_wheels=wheels,
                                           torch_version=version)
    print(f"\nimages ready: {', '.join(f'{name} {value:.0f} s' for name, value in seconds.items())}")
    return Images(tools, base, seconds)


@pytest.fixture
def names(images: Images) -> Iterator[dict[str, list[str]]]:
    """Containers and volumes a test creates, removed after it whatever happened."""
    created: dict[str, list[str]] = {"containers": [], "volumes": []}
    yield created
    images.tools.remove_containers(*reversed(created["containers"]))
    images.tools.remove_volumes(*created["volumes"])


def unique(prefix: str) -> str:
    return f"augserve-test-{prefix}-{secrets.token_hex(3)}"


@dataclass
class ServerContainer:
    name: str
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_server(images: Images, names: dict[str, list[str]], cache: str, **options: object) -> ServerContainer:
    name = unique("server")
    names["containers"].append(name)
    port = images.tools.free_port()
    images.tools.run_server(name, port, cache, **options)
    images.tools.wait_healthy(name)
    return ServerContainer(name, port)


def new_volume(images: Images, names: dict[str, list[str]], prefix: str) -> str:
    name = unique(prefix)
    images.tools.podman("volume", "create", name)
    names["volumes"].append(name)
    return name


# --- health, read-only, two trainers on one stream over shared memory ------------------------


def compose_trainer_arguments(port: int) -> dict[str, list[str]]:
    """The trainers of deploy/compose.yaml, pointed at 127.0.0.1:`port`, for one epoch."""
    services = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]
    trainers = {}
    for name, service in services.items():
        if service.get("build", {}).get("target") != "trainer":
            continue
        arguments = list(service["command"])
        arguments[arguments.index("--endpoint") + 1] = f"127.0.0.1:{port}"
        arguments[arguments.index("--epochs") + 1] = "1"
        trainers[name] = [*arguments, "--no-validate", "--threads", "1"]
    return trainers


def test_two_trainer_containers_share_one_stream_over_shared_memory(images: Images, names):
    tools = images.tools
    cache, runs = new_volume(images, names, "cache"), new_volume(images, names, "runs")
    server = start_server(images, names, cache)  # healthy: the image's HEALTHCHECK passed
    inspected = json.loads(tools.podman("inspect", server.name).stdout)[0]
    assert inspected["HostConfig"]["ReadonlyRootfs"] is True
    assert inspected["Config"]["User"].split(":")[0] == str(IMAGE_USER)
    with Client(server.address, timeout=60) as client:
        before = client.server_info()
    trainers = compose_trainer_arguments(server.port)
    assert len(trainers) == 2
    started = {}
    for service, arguments in trainers.items():
        name = unique(service)
        names["containers"].append(name)
        tools.run_trainer(name, server.name, runs, arguments)
        started[name] = arguments
    for name in started:
        code = tools.wait_exit(name, timeout=600)
        assert code == 0, f"{name} exited with {code}:\n{tools.logs(name)[-4000:]}"
    with Client(server.address, timeout=60) as client:
        after = client.server_info()
    produced = after.batches_produced - before.batches_produced
    delivered = after.batches_delivered - before.batches_delivered
    assert produced > 0 and delivered == 2 * produced, (produced, delivered)

    opened = re.findall(r"session \S+ opened: .* transport=(\w+)", tools.logs(server.name))
    assert opened == ["shared_memory", "shared_memory"], f"the trainers' sessions: {opened}"
    for arguments in started.values():
        output = tools.volume_path(runs) / Path(arguments[arguments.index("--output") + 1]).relative_to("runs")
        assert (output / "config.yaml").is_file(), f"no outputs in {output}"


def test_an_oci_image_is_health_checked_with_the_command_given_at_run_time(images: Images, names, tmp_path):
    """podman builds OCI images by default, and the OCI format has no HEALTHCHECK: the image's
    command, given as --health-cmd, checks it. The OCI image here is the server image's layers
    under an OCI manifest (a FROM of it built with --format oci), which drops the HEALTHCHECK
    as a whole `podman build --format oci` does."""
    tools = images.tools
    oci_tag = f"{tools.SERVER_IMAGE}-oci"
    (tmp_path / "Containerfile").write_text(f"FROM {tools.SERVER_IMAGE}\nLABEL io.augserve.format=oci\n")
    tools.podman("build", "--format", "oci", "--tag", oci_tag, str(tmp_path))
    try:
        manifest, health = tools.podman("image", "inspect", "--format", "{{.ManifestType}} {{.Config.Healthcheck}}",
                                        oci_tag).stdout.split(maxsplit=1)
        assert manifest == "application/vnd.oci.image.manifest.v1+json" and health.strip() == "<nil>", (manifest, health)
        cache = new_volume(images, names, "cache")
        name = unique("oci")
        names["containers"].append(name)
        tools.run_server(name, tools.free_port(), cache, image=oci_tag, health_command=tools.health_command())
        tools.wait_healthy(name)
    finally:
        tools.remove_containers(*names["containers"])
        names["containers"].clear()
        tools.podman("rmi", oci_tag, check=False)


# --- the stale sweep across PID namespaces ----------------------------------------------------

HOLDER = """
import json, sys
from augserve.client import Client
client = Client("127.0.0.1:" + sys.argv[1], timeout=60)
stream = client.stream("demo", batch_size=8, epochs=0, transport="shared_memory")
next(iter(stream))
print(json.dumps({"transport": stream.facts.transport}), flush=True)
sys.stdin.readline()
"""


@contextmanager
def holding_a_session(images: Images, server: ServerContainer) -> Iterator[None]:
    """A client inside the server's container holds a shared-memory session open."""
    command = [*images.tools.podman_command(), "exec", "--interactive", server.name, "python", "-c", HOLDER,
               str(server.port)]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as process:
        try:
            ready, _, _ = select.select([process.stdout], [], [], 120)
            line = process.stdout.readline() if ready else ""
            assert line, f"the holder did not start: {process.stderr.read() if process.poll() is not None else 'no answer'}"
            assert json.loads(line)["transport"] == "shared_memory"
            yield
        finally:
            process.stdin.close()  # the holder reads EOF and ends its session
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def segments_by_pid(images: Images, container: str) -> dict[int, set[str]]:
    """The augserve segments in `container`'s /dev/shm, by the pid their names carry."""
    listing = images.tools.podman("exec", container, "ls", "/dev/shm").stdout.split()
    found: dict[int, set[str]] = {}
    for name in listing:
        match = SEGMENT_PATTERN.match(name)
        if match and int(match.group(1)) == IMAGE_USER:
            found.setdefault(int(match.group(2)), set()).add(name)
    return found


def test_servers_sharing_dev_shm_from_other_pid_namespaces_sweep_only_dead_segments(images: Images, names):
    """Server A runs under an init process, so its pid is not 1, a pid that no process has in
    the other containers when their servers start; B and then C join A's IPC namespace, so its
    /dev/shm, as pid 1 of their own PID namespaces."""
    tools = images.tools
    cache = new_volume(images, names, "cache")
    first = start_server(images, names, cache, init=True)
    with holding_a_session(images, first):
        live = segments_by_pid(images, first.name)
        [pid] = live
        assert pid != 1, live
        second = start_server(images, names, cache, ipc=f"container:{first.name}")  # B's start swept
        assert segments_by_pid(images, first.name).get(pid) == live[pid], "B removed A's live segment"
        with holding_a_session(images, second):
            killed = segments_by_pid(images, first.name).get(1)
            assert killed, "B made no segment"
            tools.podman("kill", "--signal", "KILL", second.name)
            tools.wait_exit(second.name, timeout=60)
        assert segments_by_pid(images, first.name).get(1) == killed  # a killed server removes nothing
        start_server(images, names, cache, ipc=f"container:{first.name}")  # C: pid 1, like B was
        after = segments_by_pid(images, first.name)
        assert not after.get(1, set()) & killed, "C kept the killed server's segment"
        assert after.get(pid) == live[pid], "C removed A's live segment"


# --- SIGTERM: drain with resume tokens --------------------------------------------------------


def batch_digest(batch) -> str:
    return hashlib.sha256(batch.images.tobytes() + batch.labels.tobytes()).hexdigest()


STREAM = {"batch_size": 16, "epochs": 1, "seed": 3, "transport": "inband"}


def test_sigterm_ends_streams_with_a_resume_token_that_another_container_continues(images: Images, names):
    tools = images.tools
    cache = new_volume(images, names, "cache")
    server = start_server(images, names, cache)
    received = []
    stopped = threading.Thread(target=tools.podman, args=("stop", "--time", "30", server.name), daemon=True)
    with Client(server.address, timeout=60, reconnect=Reconnect(attempts=0)) as client:
        stream = client.stream("demo", **STREAM)
        with pytest.raises(AugserveClientError) as caught:
            for batch in stream:
                received.append((batch_digest(batch), batch.resume_token))
                if len(received) == 3:
                    stopped.start()
        stream.close()
    stopped.join(60)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE, caught.value
    assert caught.value.resume_token == received[-1][1]
    assert tools.wait_exit(server.name, timeout=60) == 0
    assert "shutting down" in tools.logs(server.name)

    successor = start_server(images, names, cache)
    with Client(successor.address, timeout=60) as client:
        with client.stream("demo", resume_token=caught.value.resume_token, **STREAM) as stream:
            tail = [batch_digest(batch) for _, batch in zip(range(3), stream)]
        with client.stream("demo", **STREAM) as stream:
            whole = [batch_digest(batch) for _, batch in zip(range(len(received) + 3), stream)]
    assert [digest for digest, _ in received] + tail == whole, "the resumed stream is not the uninterrupted one"
