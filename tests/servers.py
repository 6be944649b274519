"""Starting real augserve servers for tests: in this process, or as a separate process."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from augserve.rpc.server import AugserveServer, DatasetConfig, ServerConfig, create_server
from augserve.streaming.limits import Limits
from augserve.core.spec import AugmentSpec
from augserve.transport.ring import our_segments

T = TypeVar("T")


@contextmanager
def running_server(datasets: dict[str, DatasetConfig], backend: str = "opencv", **limits: object) -> Iterator[AugserveServer]:
    server = create_server(ServerConfig(backend=backend, threads=2, datasets=datasets, limits=Limits(**limits)))
    try:
        yield server
    finally:
        server.stop(grace=2.0)


class ServerProcess:
    """`augserve serve` in a child process on a free loopback port."""

    def __init__(self, tmp_path: Path, datasets: dict[str, str], extra: list[str] | None = None) -> None:
        port_file = tmp_path / f"port-{time.monotonic_ns()}"
        command = [sys.executable, "-m", "augserve", "serve", "--port", "0", "--port-file", str(port_file),
                   "--backend", "opencv", "--threads", "2"]
        for name, path in datasets.items():
            command += ["--dataset", f"{name}={path}"]
        self.log_path = tmp_path / f"server-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command + (extra or []), stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        self.address = f"127.0.0.1:{self.port}"

    def signal(self, number: int) -> None:
        self.process.send_signal(number)

    def wait(self, timeout: float = 30) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()


def segments_of(pid: int) -> list[Path]:
    return [path for path in our_segments() if path.name.split("-")[2] == str(pid)]


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll `predicate` every `interval` seconds until it is true; whether it was, within
    `timeout` seconds (it is asked once more at the deadline)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def wait_until_steady(read: Callable[[], T], quiet: float = 0.5, timeout: float = 30.0) -> T | None:
    """Read every `quiet` seconds until two readings in a row are equal (nothing changed for
    `quiet` seconds); that reading, or None if it still changed after `timeout` seconds. For
    waiting until something stops, which no event announces."""
    deadline = time.monotonic() + timeout
    previous = read()
    while True:
        time.sleep(quiet)  # the quiet period itself: readings taken closer say nothing
        current = read()
        if current == previous:
            return current
        if time.monotonic() > deadline:
            return None
        previous = current


def own_segments() -> list[Path]:
    return segments_of(os.getpid())


STREAMING_CLIENT = """
import json, sys, time
from augserve.client import Client
from augserve.core.spec import AugmentSpec
options = json.loads(sys.argv[2])
spec = AugmentSpec.from_json(options.pop("spec"))
batches = iter(Client(sys.argv[1]).stream(options.pop("dataset"), spec=spec, **options))
next(batches); next(batches)
print("streaming", flush=True)
time.sleep(600)
"""


def start_streaming_client(address: str, dataset: str, spec: AugmentSpec, **options: object) -> subprocess.Popen:
    """A client process that reads two batches, prints 'streaming' and waits to be killed.
    Use it as a context manager (closes its pipe)."""
    arguments = json.dumps({"dataset": dataset, "spec": spec.to_json(), **options})
    return subprocess.Popen([sys.executable, "-c", STREAMING_CLIENT, address, arguments], stdout=subprocess.PIPE, text=True)


# --- the metrics endpoint ---


def fetch(port: int, path: str = "/metrics", authorization: str | None = None) -> tuple[int, http.client.HTTPMessage, str]:
    """One GET on 127.0.0.1: status, headers and body, whatever the status."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers={"Authorization": authorization} if authorization else {})
        response = connection.getresponse()
        return response.status, response.headers, response.read().decode()
    finally:
        connection.close()


def scrape(port: int, token: str | None = None) -> dict[str, float]:
    status, _, text = fetch(port, authorization=f"Bearer {token}" if token else None)
    assert status == 200, (status, text)
    values = {}
    for line in text.splitlines():
        if line.startswith("augserve"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values
