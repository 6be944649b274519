"""Delivered images per second from an augserve server to one consumer, with both in containers
(the server image, and the trainer image in the server's IPC namespace, as deploy/compose.yaml
runs them) or both as processes on the host, over shared memory and in-band gRPC.

    python benchmarks/bench_containers.py [--seconds S] [--rounds R] [--json PATH]

Needs root, podman and the images (`python scripts/containers.py build`).

Servers: one server container (`--read-only --network host --ipc shareable --shm-size 1g`, the
demo dataset in a volume) and one host process (`python -m augserve serve --demo` from this
checkout, tests/servers.py's ServerProcess), both with the OpenCV backend on 2 threads, on
127.0.0.1. Consumers: the same script,
run by the trainer image's Python in a container that joins the server's IPC namespace
(`--ipc container:SERVER`, so its /dev/shm), or by this Python on the host. A consumer opens a
stream (demo dataset, `random_resized_crop` to the output size, horizontal flip, brightness
±0.2, batches of 64, endless), takes WARMUP_BATCHES batches, then counts the images of the
batches it receives in `--seconds`, touching one byte of every 64-byte cache line of each batch
(all of it crosses the memory bus, nothing is written). It checks that the server granted the
transport asked for.

A cell is one (output size, transport, where). Rounds take the cells of a row in turn, container
and host alternating first; a cell's rate is the mean over rounds. Before each cell the run
waits, at most `--quiet-budget` seconds, for a second in which the whole machine is busy less
than QUIET_CORES. "Other load" is the
machine's busy cores during a cell's windows (/proc/stat) less what the server (its process,
from /proc/PID/stat: a container's server is a host process too) and the consumer
(`time.process_time` over its window) took: work of other users of the machine, which that
cell's numbers suffered. The table gives each cell's mean over all rounds and over its quiet
rounds (other load at most QUIET_CORES), with their number.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = (64, 224)
TRANSPORTS = ("shared_memory", "inband")
PLACES = ("containers", "host")
BATCH_SIZE = 64
WARMUP_BATCHES = 8
THREADS = 2  # as tests/servers.py's ServerProcess
QUIET_CORES = 0.25

CONSUMER = """
import json, sys, time
from augserve.client import Client
from augserve.core.spec import AugmentSpec
address, transport, size, batch_size, warmup, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
spec = AugmentSpec.from_dict({"ops": [{"random_resized_crop": {"size": size}}, {"flip": {}}, {"brightness": {"factor": 0.2}}]})
with Client(address, timeout=120) as client, client.stream("demo", spec=spec, batch_size=batch_size, epochs=0, transport=transport) as stream:
    batches = iter(stream)
    for _ in range(warmup):
        next(batches)
    print("window", flush=True)
    images, touched, started, cpu = 0, 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        batch = next(batches)
        touched += int(batch.images.reshape(-1)[::64].sum())
        images += len(batch.labels)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    print(json.dumps({"transport": stream.facts.transport, "images": images, "seconds": elapsed, "cpu_seconds": cpu}), flush=True)
    sys.stdin.readline()  # the window's figures are read before the stream closes
"""


def load_containers():
    spec = importlib.util.spec_from_file_location("augserve_containers", ROOT / "scripts" / "containers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot, from /proc/stat."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds of process `pid` and its threads (host pid), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def wait_for_quiet(budget_seconds: float) -> None:
    """Wait, at most `budget_seconds`, for a second in which the machine is busy less than
    QUIET_CORES (the servers idle between cells): other users' work disturbs a cell less."""
    deadline = time.monotonic() + budget_seconds
    while time.monotonic() < deadline:
        busy = machine_busy_seconds()
        time.sleep(1.0)
        if machine_busy_seconds() - busy < QUIET_CORES:
            return


@dataclass
class Cell:
    size: int
    transport: str
    place: str
    rates: list[float]
    other_cores: list[float]  # the machine's busy cores less the server's and the consumer's

    @property
    def rate(self) -> float:
        return statistics.fmean(self.rates)

    def quiet(self) -> str:
        """The mean over rounds whose other load stayed at or below QUIET_CORES, and how many."""
        rates = [rate for rate, other in zip(self.rates, self.other_cores) if other <= QUIET_CORES]
        return f"{statistics.fmean(rates):,.0f} ({len(rates)})" if rates else "– (0)"


def consume(command: list[str], server_pid: int, transport: str, size: int, seconds: float) -> tuple[float, float]:
    """Run one consumer: its images/s, and the cores other work took during its window."""
    arguments = [transport, str(size), str(BATCH_SIZE), str(WARMUP_BATCHES), str(seconds)]
    with subprocess.Popen([*command, *arguments], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as process:
        try:
            if process.stdout.readline().strip() != "window":
                raise RuntimeError(f"consumer failed ({' '.join(command[:6])} ...):\n{process.stderr.read()[-3000:]}")
            machine, server = machine_busy_seconds(), process_cpu_seconds(server_pid)
            line = process.stdout.readline()
            machine, server = machine_busy_seconds() - machine, process_cpu_seconds(server_pid) - server
            process.stdin.close()
            if process.wait(120) != 0 or not line:
                raise RuntimeError(f"consumer failed ({' '.join(command[:6])} ...):\n{process.stderr.read()[-3000:]}")
        finally:
            if process.poll() is None:
                process.kill()
    outcome = json.loads(line)
    if outcome["transport"] != transport:
        raise RuntimeError(f"asked for {transport}, the server granted {outcome['transport']}")
    other = (machine - server - outcome["cpu_seconds"]) / outcome["seconds"]
    return outcome["images"] / outcome["seconds"], max(0.0, other)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="counted seconds per cell and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quiet-budget", type=float, default=15.0,
                        help="longest wait, before each cell, for other users of the machine to be quiet (seconds)")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    arguments = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from servers import ServerProcess  # `augserve serve` in a child process, as the tests start it

    tools = load_containers()
    refusal = tools.base_refusal()
    if refusal:
        raise SystemExit(refusal)
    for tag in (tools.SERVER_IMAGE, tools.TRAINER_IMAGE):
        if tools.podman("image", "exists", tag, check=False).returncode != 0:
            raise SystemExit(f"no image {tag}: python scripts/containers.py build")

    suffix = os.urandom(3).hex()
    server_name, cache = f"augserve-bench-server-{suffix}", f"augserve-bench-cache-{suffix}"
    cells = {(size, transport, place): Cell(size, transport, place, [], [])
             for size in SIZES for transport in TRANSPORTS for place in PLACES}
    with tempfile.TemporaryDirectory(prefix="augserve-bench-") as folder:
        tools.podman("volume", "create", cache)
        host = None
        try:
            port = tools.free_port()
            tools.run_server(server_name, port, cache, arguments=("--demo", "--backend", "opencv"), threads=THREADS)
            tools.wait_healthy(server_name)
            host = ServerProcess(Path(folder), {}, extra=["--demo"])  # OpenCV, 2 threads, as the container
            server_pids = {"containers": int(tools.podman("inspect", "--format", "{{.State.Pid}}", server_name).stdout),
                           "host": host.process.pid}
            consumers = {
                "containers": [*tools.podman_command(), "run", "--rm", "--network", "host", "--read-only",
                               *tools.ulimit_arguments(), "--ipc", f"container:{server_name}", "--entrypoint", "python",
                               tools.TRAINER_IMAGE, "-c", CONSUMER, f"127.0.0.1:{port}"],
                "host": [sys.executable, "-c", CONSUMER, host.address],
            }
            for round_index in range(arguments.rounds):
                places = PLACES if round_index % 2 == 0 else tuple(reversed(PLACES))
                for size in SIZES:
                    for transport in TRANSPORTS:
                        for place in places:
                            wait_for_quiet(arguments.quiet_budget)
                            rate, other = consume(consumers[place], server_pids[place], transport, size,
                                                  arguments.seconds)
                            cell = cells[(size, transport, place)]
                            cell.rates.append(rate)
                            cell.other_cores.append(other)
                            print(f"round {round_index + 1}: {size}x{size} {transport:13} {place:10} {rate:8.0f} images/s"
                                  f"  (other load {other:.2f} cores)", flush=True)
        finally:
            if host is not None:
                host.stop()
            tools.remove_containers(server_name)
            tools.remove_volumes(cache)

    print(f"\nbatches of {BATCH_SIZE}, {arguments.rounds} rounds of {arguments.seconds:g} s, "
          f"images of {tools.SERVER_IMAGE} / {tools.TRAINER_IMAGE}\n")
    print("| output | transport | containers (images/s) | host processes (images/s) | containers / host "
          "| quiet rounds: containers, host (images/s) | other load, cores (containers, host) |")
    print("|---|---|---|---|---|---|---|")
    for size in SIZES:
        for transport in TRANSPORTS:
            inside, outside = cells[(size, transport, "containers")], cells[(size, transport, "host")]
            print(f"| {size}×{size} | {transport.replace('_', ' ')} | {inside.rate:,.0f} | {outside.rate:,.0f} | "
                  f"{inside.rate / outside.rate:.0%} | {inside.quiet()}, {outside.quiet()} | "
                  f"{statistics.fmean(inside.other_cores):.2f}, {statistics.fmean(outside.other_cores):.2f} |")
    if arguments.json:
        arguments.json.write_text(json.dumps([asdict(cell) for cell in cells.values()], indent=1))


if __name__ == "__main__":
    main()
