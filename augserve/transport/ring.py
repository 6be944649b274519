"""Rings of fixed-size batch slots, in process memory or in a shared-memory file.

A producer writes each batch once into a slot. In-band sessions copy it into a message; shared
memory sessions send only the slot index, and the client maps the same file. Shared-memory
files live in /dev/shm, are private to the user (mode 0600), are named
`augserve-<uid>-<pid>-<n>` so that a later server can remove a dead one's leftovers, and are
unlinked on every exit path of the producer that made them.
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import re
import secrets
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SEGMENT_PATTERN = re.compile(r"^augserve-(\d+)-(\d+)-[0-9a-z]+$")
PROBE_PATTERN = re.compile(r"^augserve-probe-[0-9a-f]{16,64}$")
_counter = itertools.count()


def shared_memory_available() -> bool:
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


def segment_name() -> str:
    return f"augserve-{os.getuid()}-{os.getpid()}-{next(_counter)}{secrets.token_hex(4)}"


def our_segments() -> list[Path]:
    """Shared-memory files of this user's augserve servers (any process)."""
    if not SHM_DIR.is_dir():
        return []
    prefix = f"augserve-{os.getuid()}-"
    return [path for path in SHM_DIR.iterdir() if path.name.startswith(prefix) and SEGMENT_PATTERN.match(path.name)]


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


PROBE_MAX_AGE_SECONDS = 60.0


def remove_stale_segments() -> int:
    """Unlink segments left by this user's augserve processes that no longer run, and probe
    files older than a minute (a client killed between writing and removing its probe)."""
    removed = 0
    for path in our_segments():
        match = SEGMENT_PATTERN.match(path.name)
        if match and not _process_alive(int(match.group(2))):
            path.unlink(missing_ok=True)
            removed += 1
    if SHM_DIR.is_dir():
        now = time.time()
        for path in SHM_DIR.glob("augserve-probe-*"):
            try:
                status = path.stat()
            except OSError:
                continue
            if PROBE_PATTERN.match(path.name) and status.st_uid == os.getuid() and now - status.st_mtime > PROBE_MAX_AGE_SECONDS:
                path.unlink(missing_ok=True)
                removed += 1
    if removed:
        log.info("removed %d stale shared-memory segments of earlier servers", removed)
    return removed


class SlotRing:
    """`slot_count` slots of `slot_bytes` each; `shared` puts them in a /dev/shm file."""

    def __init__(self, slot_count: int, slot_bytes: int, shared: bool) -> None:
        self.slot_count = slot_count
        self.slot_bytes = slot_bytes
        self.name: str | None = None
        self._map: mmap.mmap | None = None
        size = slot_count * slot_bytes
        if shared:
            self.name = segment_name()
            fd = os.open(SHM_DIR / self.name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                os.ftruncate(fd, size)
                self._map = mmap.mmap(fd, size)
            except BaseException:
                os.unlink(SHM_DIR / self.name)
                raise
            finally:
                os.close(fd)
            self._memory = np.frombuffer(self._map, np.uint8)
        else:
            self._memory = np.empty(size, np.uint8)

    def view(self, slot: int, shape: tuple[int, ...]) -> np.ndarray:
        """The first prod(shape) bytes of `slot` as a uint8 array of `shape`."""
        start = slot * self.slot_bytes
        return self._memory[start : start + int(np.prod(shape))].reshape(shape)

    def close(self) -> None:
        """Unlink the shared-memory file (clients that mapped it keep their mapping)."""
        if self.name is not None:
            (SHM_DIR / self.name).unlink(missing_ok=True)
            self.name = None
        self._memory = np.empty(0, np.uint8)
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # a view is still referenced; the mapping goes when it does
            self._map = None


class SlotReader:
    """The client's mapping of a server's shared-memory ring."""

    def __init__(self, name: str, slot_bytes: int) -> None:
        if not SEGMENT_PATTERN.match(name):
            raise ValueError(f"not an augserve segment name: {name!r}")
        fd = os.open(SHM_DIR / name, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        self._memory = np.frombuffer(self._map, np.uint8)
        self.slot_bytes = slot_bytes

    def view(self, slot: int, shape: tuple[int, ...]) -> np.ndarray:
        start = slot * self.slot_bytes
        return self._memory[start : start + int(np.prod(shape))].reshape(shape)

    def close(self) -> None:
        self._memory = np.empty(0, np.uint8)
        try:
            self._map.close()
        except BufferError:
            pass  # arrays handed to the user still reference it


def write_probe() -> tuple[str, bytes]:
    """Client side of the same-host check: a small /dev/shm file holding a random nonce."""
    nonce = secrets.token_bytes(16)
    name = f"augserve-probe-{secrets.token_hex(16)}"
    fd = os.open(SHM_DIR / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        os.write(fd, nonce)
    finally:
        os.close(fd)
    return name, nonce


def remove_probe(name: str) -> None:
    if PROBE_PATTERN.match(name):
        (SHM_DIR / name).unlink(missing_ok=True)


def probe_matches(name: str, nonce: bytes) -> bool:
    """Server side: does /dev/shm/`name` hold `nonce`? (Then the client shares this host.)"""
    if not PROBE_PATTERN.match(name) or not 8 <= len(nonce) <= 64:
        return False
    try:
        with open(SHM_DIR / name, "rb") as handle:
            return handle.read(65) == nonce
    except OSError:
        return False
