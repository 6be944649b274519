#!/usr/bin/env python3
"""Build and run the augserve images with podman where no container registry is reachable.

    python scripts/containers.py base            # the base image, from Debian's packages
    python scripts/containers.py build           # base, then the server and the trainer image
    python scripts/containers.py build --torch-wheels /opt/wheels   # torch from a local wheel

The Dockerfile's base is an official Python image (`PYTHON_IMAGE`). Without a registry, `base`
makes one from Debian's own packages instead: `debootstrap --variant=minbase` of this machine's
Debian release, from the mirror its apt sources name, with python3, python3-venv,
python-is-python3 (the `python` command the Dockerfile calls) and ca-certificates; then this
machine's CA bundle is copied over Debian's, as the package index may be reached through a TLS
proxy whose CA only this machine trusts (pip inside the build is pointed at it by PIP_CERT);
apt lists, documentation, man pages and translations are removed; `podman import` makes it an
image. The root file system is cached as a tarball under `$AUGSERVE_CACHE/containers` (default
`~/.cache/augserve/containers`), keyed by release, mirror, packages and CA bundle: a second
`base` imports it in seconds, or reuses the image it made last time.

`build` runs `podman build` once per image, in Docker format (`--format docker`), which keeps the
Dockerfile's HEALTHCHECK (OCI images drop it). The trainer's torch comes from a CPU wheel of
TORCH_VERSION where pip's find-links (its configuration, PIP_FIND_LINKS) hold one, through the
Dockerfile's `torch-wheels` build context; else from PyPI (the CUDA build, about 4 GB more). An
image whose inputs (Dockerfile, .dockerignore, the files it copies, the build's arguments) have
not changed since this script built it is not built again: their digest and the image's id are
kept beside the base tarballs. Otherwise podman's layer cache still skips the dependency layers
unless pyproject.toml changed.

podman runs here as `podman --runtime runc --cgroup-manager=cgroupfs` (crun refuses hybrid
cgroup hierarchies), with --ulimit at this shell's limits. tests/test_containers.py and
benchmarks/bench_containers.py use these functions.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
# Removed from the root file system: nothing at run time reads them.
BASE_PRUNED = ("var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/info",
               "usr/share/locale", "usr/share/lintian")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
BASE_LABEL = "io.augserve.base-key"
SERVER_IMAGE = "localhost/augserve:0.1.0"
TRAINER_IMAGE = "localhost/augserve-trainer:0.1.0"
TORCH_VERSION = "2.13.0"  # the Dockerfile's default; a CPU wheel of it may lie in pip's find-links
# Bumped when what `base` does changes, so that an old cached tarball is not reused.
BASE_RECIPE = "1"


def cache_root() -> Path:
    return Path(os.environ.get("AUGSERVE_CACHE", Path.home() / ".cache" / "augserve")) / "containers"


def podman_command() -> list[str]:
    """podman with the runtime and cgroup manager that work on these machines."""
    return ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]


def ulimit_arguments() -> list[str]:
    """--ulimit for open files and processes at this shell's limits: podman's defaults are
    higher, and raising a limit is refused here. Processes are also capped at kernel.pid_max,
    the limit podman's monitor (conmon) runs under: above it runc's setrlimit is refused."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    arguments = []
    for name, which, cap in (("nofile", resource.RLIMIT_NOFILE, None), ("nproc", resource.RLIMIT_NPROC, pid_max)):
        soft, hard = resource.getrlimit(which)
        hard = soft if hard == resource.RLIM_INFINITY else hard
        soft = hard if soft == resource.RLIM_INFINITY else soft
        if soft == resource.RLIM_INFINITY:
            soft = hard = cap or 1 << 20
        if cap is not None:
            soft, hard = min(soft, cap), min(hard, cap)
        arguments += ["--ulimit", f"{name}={soft}:{hard}"]
    return arguments


def podman(*arguments: str, check: bool = True, capture: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*podman_command(), *arguments], check=check, text=True, timeout=timeout,
                          capture_output=capture)


def host_release() -> str:
    """This machine's Debian codename (bookworm, trixie, ...)."""
    text = Path("/etc/os-release").read_text(encoding="utf-8")
    match = re.search(r"^VERSION_CODENAME=\"?([a-z]+)\"?$", text, re.MULTILINE)
    if match is None:
        raise SystemExit("/etc/os-release names no VERSION_CODENAME: pass --suite")
    return match.group(1)


def apt_mirror(suite: str) -> str:
    """The first Debian mirror this machine's apt sources name for `suite` (one-line or
    deb822 format)."""
    files: list[Path] = []
    for source in APT_SOURCES:
        files += sorted(source.glob("*.list")) + sorted(source.glob("*.sources")) if source.is_dir() else [source]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for line in text.splitlines():  # deb [options] URI SUITE COMPONENTS...
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                return words[1]
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.MULTILINE))
            if "deb" in fields.get("Types", "").split() and suite in fields.get("Suites", "").split():
                return fields["URIs"].split()[0]
    raise SystemExit(f"no apt source names {suite}: pass --mirror")


@dataclass(frozen=True)
class BaseRecipe:
    suite: str
    mirror: str
    packages: tuple[str, ...] = BASE_PACKAGES

    def key(self) -> str:
        """What the root file system depends on: a new key is a new tarball and image."""
        digest = hashlib.sha256()
        for part in (BASE_RECIPE, self.suite, self.mirror, *self.packages):
            digest.update(part.encode() + b"\0")
        digest.update(CA_BUNDLE.read_bytes() if CA_BUNDLE.exists() else b"")
        return digest.hexdigest()[:16]

    def tag(self) -> str:
        return base_tag(self.suite)


def base_tag(suite: str) -> str:
    return f"localhost/augserve-base:{suite}"


def base_refusal() -> str | None:
    """Why a base image cannot be built here, or None."""
    if os.geteuid() != 0:
        return "debootstrap and rootful podman need root"
    missing = [tool for tool in ("debootstrap", "podman", "runc") if shutil.which(tool) is None]
    return f"not installed: {', '.join(missing)}" if missing else None


def build_rootfs(recipe: BaseRecipe, tarball: Path) -> None:
    """debootstrap into a scratch folder, prune it, carry this machine's CA bundle, tar it."""
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="augserve-base-", dir=tarball.parent) as scratch:
        rootfs = Path(scratch) / "rootfs"
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(recipe.packages)}",
                        recipe.suite, str(rootfs), recipe.mirror],
                       check=True, capture_output=True, text=True, timeout=1800)
        for relative in BASE_PRUNED:
            shutil.rmtree(rootfs / relative, ignore_errors=True)
        (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)  # apt-get update works again
        if CA_BUNDLE.exists():
            shutil.copyfile(CA_BUNDLE, rootfs / CA_BUNDLE.relative_to("/"))
        partial = tarball.with_suffix(".partial")
        subprocess.run(["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-cf", str(partial), "."],
                       check=True, capture_output=True, text=True, timeout=600)
        partial.rename(tarball)


def ensure_base_image(recipe: BaseRecipe, log=print) -> str:
    """The base image's tag: reused where it was made from the same key, imported from the
    cached tarball, or built (a few minutes, once)."""
    key = recipe.key()
    tag = recipe.tag()
    found = podman("image", "inspect", "--format", f'{{{{index .Labels "{BASE_LABEL}"}}}}', tag, check=False)
    if found.returncode == 0 and found.stdout.strip() == key:
        return tag
    tarball = cache_root() / f"base-{recipe.suite}-{key}.tar"
    if not tarball.exists():
        log(f"debootstrap {recipe.suite} from {recipe.mirror} (cached after, at {tarball}) ...")
        started = time.monotonic()
        build_rootfs(recipe, tarball)
        log(f"  root file system built in {time.monotonic() - started:.0f} s")
    changes = [
        f"LABEL {BASE_LABEL}={key}",
        "ENV LANG=C.UTF-8",
        f"ENV PIP_CERT={CA_BUNDLE}",
        f"ENV SSL_CERT_FILE={CA_BUNDLE}",
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        'CMD ["python3"]',
    ]
    arguments = ["import"]
    for change in changes:
        arguments += ["--change", change]
    podman(*arguments, str(tarball), tag, timeout=600)
    return tag


# What the Dockerfile copies from the repository (besides itself and .dockerignore).
BUILD_SOURCES = ("pyproject.toml", "README.md", "augserve", "trainer")


def build_inputs_digest(arguments: list[str]) -> str:
    """A digest of everything a build reads: the Dockerfile, .dockerignore, the files it copies
    (without caches) and the build's arguments."""
    digest = hashlib.sha256("\0".join(arguments).encode())
    paths = [ROOT / "Dockerfile", ROOT / ".dockerignore"]
    for source in BUILD_SOURCES:
        path = ROOT / source
        paths += sorted(item for item in path.rglob("*") if item.is_file()) if path.is_dir() else [path]
    for path in paths:
        if "__pycache__" in path.parts or path.suffix in (".pyc", ".pyo"):
            continue
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:24]


def build_image(target: str, tag: str, base: str, torch_wheels: Path | None = None,
                torch_version: str | None = None, image_format: str = "docker") -> float:
    """`podman build --target TARGET` of the repository, in Docker format unless told (OCI
    images have no HEALTHCHECK); its seconds. An image `tag` built from the same inputs
    (labelled with their digest) is kept as it is: 0 seconds."""
    arguments = ["--format", image_format, "--network", "host", "--target", target,
                 "--build-arg", f"PYTHON_IMAGE={base}", *ulimit_arguments()]
    if torch_wheels is not None:
        arguments += ["--build-context", f"torch-wheels={torch_wheels}"]
    if torch_version is not None:
        arguments += ["--build-arg", f"TORCH_VERSION={torch_version}"]
    # podman does not label an image whose every step came from its cache: the digest is kept
    # beside the base tarballs, with the id of the image it made.
    record = cache_root() / f"inputs-{re.sub(r'[^A-Za-z0-9_.-]', '_', tag)}"
    inputs = build_inputs_digest(arguments)
    found = podman("image", "inspect", "--format", "{{.Id}}", tag, check=False)
    if found.returncode == 0 and record.exists() and record.read_text().split() == [inputs, found.stdout.strip()]:
        return 0.0
    started = time.monotonic()
    result = podman("build", *arguments, "--tag", tag, "--file", str(ROOT / "Dockerfile"), str(ROOT),
                    check=False, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"podman build --target {target} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(f"{inputs} {podman('image', 'inspect', '--format', '{{.Id}}', tag).stdout.strip()}\n")
    return time.monotonic() - started


def image_size(tag: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())


def local_torch_wheels(version: str) -> tuple[Path, str] | None:
    """A folder of pip's find-links (PIP_FIND_LINKS, pip's configuration) that holds a CPU
    wheel of torch `version`, and that wheel's full version (2.13.0+cpu); None if there is none."""
    folders = os.environ.get("PIP_FIND_LINKS", "").split()
    config = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            check=False, timeout=60)
    for value in re.findall(r"^[\w:.-]+find-links='([^']*)'$", config.stdout, re.MULTILINE):
        folders += value.split()
    for folder in dict.fromkeys(folders):
        path = Path(folder.removeprefix("file://"))
        wheels = sorted(path.glob(f"torch-{version}+cpu-*.whl")) if path.is_dir() else []
        if wheels:
            return path, wheels[0].name.split("-")[1]
    return None


# --- running containers ---------------------------------------------------------------------

SERVER_CACHE = "/var/cache/augserve"  # the image's AUGSERVE_CACHE
TRAINER_RUNS = "/workspace/runs"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def health_command() -> str:
    """The Dockerfile's HEALTHCHECK command (exec form, JSON), for `--health-cmd`."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK .*? CMD (\[.*\])$", text, re.MULTILINE)
    if match is None:
        raise RuntimeError("the Dockerfile has no HEALTHCHECK in exec form")
    return match.group(1)


def run_server(name: str, port: int, cache_volume: str, ipc: str = "shareable", init: bool = False,
               shm_size: str = "1g", arguments: tuple[str, ...] = ("--demo",), image: str = SERVER_IMAGE,
               health_command: str | None = None, threads: int = 2) -> None:
    """Start the server image detached, read-only, on 127.0.0.1:`port` of the host's network.
    `ipc`: `shareable` (its own IPC namespace and /dev/shm, which trainers may join) or
    `container:NAME` (another container's); `init` puts an init process at pid 1, so that the
    server is pid 2; `health_command` for an image without HEALTHCHECK (OCI format)."""
    podman("run", "--detach", "--name", name, "--network", "host", "--read-only", *ulimit_arguments(),
           "--ipc", ipc, *(["--shm-size", shm_size] if ipc == "shareable" else []), *(["--init"] if init else []),
           *(["--health-cmd", health_command] if health_command else []),
           "--volume", f"{cache_volume}:{SERVER_CACHE}",
           "--env", "AUGSERVE_HOST=127.0.0.1", "--env", f"AUGSERVE_PORT={port}", "--env", f"AUGSERVE_THREADS={threads}",
           image, *arguments, timeout=120)


def run_trainer(name: str, server: str, runs_volume: str, arguments: list[str]) -> None:
    """Start the trainer image detached, read-only, in `server`'s IPC namespace (so its
    /dev/shm), on the host's network."""
    podman("run", "--detach", "--name", name, "--network", "host", "--read-only", *ulimit_arguments(),
           "--ipc", f"container:{server}", "--volume", f"{runs_volume}:{TRAINER_RUNS}",
           TRAINER_IMAGE, *arguments, timeout=120)


def healthy(name: str) -> bool:
    """`podman healthcheck run`: the image's HEALTHCHECK (kept by Docker-format images)."""
    return podman("healthcheck", "run", name, check=False, timeout=60).returncode == 0


def wait_healthy(name: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not healthy(name):
        state = podman("inspect", "--format", "{{.State.Status}}", name, check=False).stdout.strip()
        if state not in ("created", "running") or time.monotonic() > deadline:
            raise RuntimeError(f"container {name} is {state}, not healthy:\n{logs(name)[-4000:]}")
        time.sleep(0.5)


def wait_exit(name: str, timeout: float = 600) -> int:
    return int(podman("wait", name, timeout=timeout).stdout.strip().splitlines()[-1])


def logs(name: str) -> str:
    result = podman("logs", name, check=False)
    return result.stdout + result.stderr


def remove_containers(*names: str) -> None:
    if names:
        podman("rm", "--force", "--time", "5", *names, check=False, timeout=120)


def remove_volumes(*names: str) -> None:
    if names:
        podman("volume", "rm", "--force", *names, check=False, timeout=120)


def volume_path(name: str) -> Path:
    return Path(podman("volume", "inspect", "--format", "{{.Mountpoint}}", name).stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("base", "build"))
    parser.add_argument("--suite", default=None, help="Debian release of the base (default: this machine's)")
    parser.add_argument("--mirror", default=None, help="Debian mirror (default: from the apt sources)")
    parser.add_argument("--torch-wheels", type=Path, default=None,
                        help="a folder with a torch wheel for the trainer image (default: pip's find-links "
                             "if they hold a CPU wheel, else PyPI)")
    arguments = parser.parse_args()
    refusal = base_refusal()
    if refusal:
        raise SystemExit(refusal)
    suite = arguments.suite or host_release()
    base = ensure_base_image(BaseRecipe(suite, arguments.mirror or apt_mirror(suite)))
    print(f"base image: {base}")
    if arguments.what == "build":
        wheels = (arguments.torch_wheels, None) if arguments.torch_wheels else local_torch_wheels(TORCH_VERSION)
        for target, tag in (("server", SERVER_IMAGE), ("trainer", TRAINER_IMAGE)):
            extra = {"torch_wheels": wheels[0], "torch_version": wheels[1]} if target == "trainer" and wheels else {}
            seconds = build_image(target, tag, base, **extra)
            print(f"{tag}: built in {seconds:.0f} s, {image_size(tag) / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
