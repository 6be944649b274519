"""Rings of fixed-size batch slots, in process memory or in a shared-memory file.

A producer writes each batch once into a slot. In-band sessions copy it into a message; shared
memory sessions send only the slot index, and the client maps the same file. Shared-memory
files live in /dev/shm, are private to the user, are named `augserve-<uid>-<pid>-<n>` (the pid
in the creator's own PID namespace: which process made it, for people and tests), and are
unlinked on every exit path of the producer that made them.

A server holds a shared `flock` on each of its segments for as long as it has the segment
open, and a later server removes only segments that nobody holds so: those of servers that
died. The lock, not the pid in the name, says whether a segment is live, because /dev/shm is
shared across PID namespaces (containers that share an IPC namespace or a /dev/shm volume, a
Kubernetes pod's memory-backed volume): there a pid names another process, or none, and a
server that asked about it would remove a live segment of a server in another container, or
keep a dead one's forever (a restarted container's server is pid 1 again). flock locks belong
to the file, the same in every namespace, and the kernel drops them when their holder dies.

/dev/shm is shared with every local user and is often small (Docker gives a container 64 MiB),
so everything here assumes a hostile or full directory:

- a ring's pages are reserved when it is created: a full /dev/shm is `SharedMemoryExhausted`
  then, never a SIGBUS at a later store into the mapping;
- the file is read-only (0400) once the server holds it open, clients map it read-only, and the
  server checks its size before each write (`view_for_writing`): a truncated ring is
  `RingDamaged`, not a store into pages that no longer exist;
- the start-up sweep and the probe look only at regular files of this user (lstat, O_NOFOLLOW,
  O_NONBLOCK), so planted directories, FIFOs, symlinks and other users' files are skipped.

The same-host proof: a client writes a probe file holding a random nonce into its /dev/shm and
sends its name and the nonce; the server reads it from its own /dev/shm. It matches where both
see the same /dev/shm (the same host, or containers sharing an IPC namespace or a /dev/shm
volume) and run as the same uid (the images' 10001), the uid a client needs to map the 0400
segments anyway.
"""

from __future__ import annotations

import errno
import fcntl
import hmac
import itertools
import logging
import mmap
import os
import re
import secrets
import stat
import time
from pathlib import Path

import numpy as np

from augserve.core.errors import LimitError, UnavailableError

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SEGMENT_PATTERN = re.compile(r"^augserve-(\d+)-(\d+)-[0-9a-z]+$")
PROBE_PATTERN = re.compile(r"^augserve-probe-[0-9a-f]{16,64}$")
PROBE_MAX_AGE_SECONDS = 60.0
PROBE_MAX_BYTES = 64  # a nonce is 8 to 64 bytes; anything longer is not a probe
PID_MAX = 1 << 22  # Linux's PID_MAX_LIMIT: a larger "pid" in a name was never a process's
RESERVE_CHUNK_BYTES = 1 << 20
# What a filesystem answers when it cannot hold more: full, over quota, or over a memory cgroup.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.ENOMEM})
_counter = itertools.count()


class SharedMemoryExhausted(LimitError):
    """/dev/shm cannot hold a ring of `needed_bytes`: nothing was created (the file is gone)."""

    def __init__(self, needed_bytes: int, free_bytes: int) -> None:
        super().__init__(
            f"shared memory exhausted: this stream's ring needs {needed_bytes} bytes "
            f"({needed_bytes / 2**20:.1f} MiB) but {SHM_DIR} has {free_bytes} bytes "
            f"({free_bytes / 2**20:.1f} MiB) free; use transport=\"inband\", or give {SHM_DIR} more "
            "space (docker run --shm-size=...)"
        )
        self.needed_bytes = needed_bytes
        self.free_bytes = free_bytes


class RingDamaged(UnavailableError):
    """Another process truncated a ring's file: its missing pages cannot be written (a SIGBUS)."""

    def __init__(self, name: str, size: int, expected: int) -> None:
        super().__init__(
            f"the shared-memory segment {name} was truncated by another process ({size} of its {expected} bytes are "
            "left); reconnect with the last resume token"
        )
        self.name = name


def shared_memory_available() -> bool:
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


def shared_memory_free_bytes() -> int:
    """Bytes an unprivileged user can still allocate in /dev/shm (0 where it cannot be asked)."""
    try:
        status = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return status.f_bavail * status.f_frsize


def segment_name() -> str:
    return f"augserve-{os.getuid()}-{os.getpid()}-{next(_counter)}{secrets.token_hex(4)}"


def our_segments() -> list[Path]:
    """Paths in /dev/shm named like this user's augserve segments (any process), by name only."""
    if not SHM_DIR.is_dir():
        return []
    prefix = f"augserve-{os.getuid()}-"
    return [path for path in SHM_DIR.iterdir() if path.name.startswith(prefix) and SEGMENT_PATTERN.match(path.name)]


def _removable(path: Path, warn: bool, older_than: float | None = None) -> bool:
    """Whether the sweep may unlink `path`: a regular file (never followed through a link) of
    this user, more than `older_than` seconds old. With `warn` (the name says it is this
    user's segment), anything else was planted and is logged; other users' probe files are
    theirs and are passed over quietly."""
    try:
        status = path.lstat()
    except FileNotFoundError:
        return False  # gone meanwhile
    except OSError as error:
        log.warning("shared-memory sweep: cannot stat %s (%s); skipped", path, error.strerror or error)
        return False
    if not stat.S_ISREG(status.st_mode):
        if warn:
            log.warning("shared-memory sweep: %s is not a regular file; skipped", path)
        return False
    if status.st_uid != os.geteuid():
        if warn:
            log.warning("shared-memory sweep: %s belongs to uid %d, not to this server; skipped", path, status.st_uid)
        return False
    return older_than is None or time.time() - status.st_mtime > older_than


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as error:
        log.warning("shared-memory sweep: cannot remove %s (%s); skipped", path, error.strerror or error)
        return False
    return True


def _held_by_a_live_server(fd: int) -> bool:
    """Whether a server holds its lock on the segment open at `fd` (in any PID namespace)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return True  # a filesystem without flock: nothing tells a dead server's segment apart
    return False


def _remove_if_dead(path: Path) -> bool:
    """Unlink the segment `path` if no server holds its lock. The exclusive lock is kept until
    the name is gone: a server that creates this name meanwhile waits for it, then sees its
    file unlinked and makes another (`_create_segment`)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as error:
        log.warning("shared-memory sweep: cannot open %s (%s); skipped", path, error.strerror or error)
        return False
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode) or opened.st_uid != os.geteuid():
            return False  # replaced between lstat and open
        if _held_by_a_live_server(fd):
            return False
        try:
            named = path.lstat()
        except FileNotFoundError:
            return False
        if (named.st_dev, named.st_ino) != (opened.st_dev, opened.st_ino):
            return False  # the name now holds another file
        return _unlink(path)
    finally:
        os.close(fd)


def remove_stale_segments() -> int:
    """Unlink segments of this user that no live server holds (their servers died), and probe
    files older than a minute (a client killed between writing and removing its probe).

    Any local user can put names into /dev/shm, so this never raises: what it cannot stat or
    remove, or what is not a regular file of this user, is logged and skipped, and a server
    still starts."""
    try:
        names = [entry.name for entry in os.scandir(SHM_DIR)]
    except OSError as error:
        log.warning("shared-memory sweep: cannot list %s (%s); skipped", SHM_DIR, error.strerror or error)
        return 0
    uid = str(os.getuid())
    removed = 0
    for name in names:
        path = SHM_DIR / name
        segment = SEGMENT_PATTERN.match(name)
        if segment is not None and segment.group(1) == uid:
            pid = int(segment.group(2))
            if not 0 < pid <= PID_MAX:  # no augserve process wrote this name
                log.warning("shared-memory sweep: %s names no possible process; skipped", path)
            elif _removable(path, warn=True):
                removed += _remove_if_dead(path)
        elif PROBE_PATTERN.match(name) and _removable(path, warn=False, older_than=PROBE_MAX_AGE_SECONDS):
            removed += _unlink(path)
    if removed:
        log.info("removed %d stale shared-memory segments of earlier servers", removed)
    return removed


def _reserve(fd: int, size: int) -> None:
    """Allocate every page of the file behind `fd` now. A tmpfs allocates a page at its first
    store, and a store that finds the filesystem full is a SIGBUS that kills the process;
    fallocate and write() answer ENOSPC instead."""
    try:
        os.posix_fallocate(fd, 0, size)
        return
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    zeros = memoryview(bytes(RESERVE_CHUNK_BYTES))  # a C library that does not emulate fallocate
    offset = 0
    while offset < size:
        offset += os.pwrite(fd, zeros[: size - offset], offset)


def _open_locked_segment() -> tuple[str, int]:
    """A new, empty /dev/shm file under a fresh name, held with this server's shared lock."""
    while True:
        name = segment_name()
        path = SHM_DIR / name
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        # Until the lock is held another server's sweep may take the name for a dead server's
        # and unlink it (holding its own lock while it does): then start again.
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError:
            return name, fd  # a filesystem without flock: no sweep removes anything there
        try:
            named = path.lstat()
        except FileNotFoundError:
            named = None
        opened = os.fstat(fd)
        if named is not None and (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino):
            return name, fd
        os.close(fd)


def _create_segment(size: int) -> tuple[str, int, mmap.mmap]:
    """A new /dev/shm file of `size` reserved bytes: (name, read-write fd, shared mapping).
    The fd holds the lock that marks the segment live until it is closed."""
    name, fd = _open_locked_segment()
    path = SHM_DIR / name
    try:
        os.ftruncate(fd, size)
        _reserve(fd, size)
        mapping = mmap.mmap(fd, size)
        # Read-only for every later open by name: a client cannot open it for writing, and so
        # cannot truncate it (root still can, which `view_for_writing` catches). The server
        # writes through the fd and mapping it already holds.
        os.fchmod(fd, 0o400)
    except BaseException as error:
        os.close(fd)
        path.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno in NO_SPACE_ERRNOS:
            raise SharedMemoryExhausted(size, shared_memory_free_bytes()) from None
        raise
    return name, fd, mapping


class SlotRing:
    """`slot_count` slots of `slot_bytes` each; `shared` puts them in a /dev/shm file.

    A shared ring's memory is reserved here: where /dev/shm cannot hold it this raises
    `SharedMemoryExhausted` (a `LimitError`) and leaves no file behind."""

    def __init__(self, slot_count: int, slot_bytes: int, shared: bool) -> None:
        self.slot_count = slot_count
        self.slot_bytes = slot_bytes
        self.name: str | None = None
        self._map: mmap.mmap | None = None
        self._fd: int | None = None
        self._size = slot_count * slot_bytes
        if shared:
            self.name, self._fd, self._map = _create_segment(self._size)
            self._memory = np.frombuffer(self._map, np.uint8)
        else:
            self._memory = np.empty(self._size, np.uint8)

    def view(self, slot: int, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
        """prod(shape) bytes of `slot` from byte `offset` as a uint8 array of `shape`, for reading."""
        start = slot * self.slot_bytes + offset
        return self._memory[start : start + int(np.prod(shape))].reshape(shape)

    def view_for_writing(self, slot: int, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
        """`view`, once the file is known to still have all its bytes; raises `RingDamaged`
        (an `UnavailableError`) where another process truncated it.

        A store into a page past the end of a truncated file is a SIGBUS, which Python cannot
        catch and which kills the whole server. A truncation that races the write after this
        check still does: the check only makes sure no write starts into missing pages."""
        if self._fd is not None:
            size = os.fstat(self._fd).st_size
            if size < self._size:
                raise RingDamaged(self.name or "", size, self._size)
        return self.view(slot, shape, offset)

    def close(self) -> None:
        """Unlink the shared-memory file (clients that mapped it keep their mapping), then
        drop its lock with the fd."""
        if self.name is not None:
            (SHM_DIR / self.name).unlink(missing_ok=True)
            self.name = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._memory = np.empty(0, np.uint8)
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # a view is still referenced; the mapping goes when it does
            self._map = None


class SlotReader:
    """The client's read-only mapping of a server's shared-memory ring.

    Read-only, so that nothing a client does through it (nor the file's 0400 mode) lets it
    write or truncate the ring that other members of its group read. Raises OSError (or
    ValueError for an empty file) where the segment cannot be mapped."""

    def __init__(self, name: str, slot_bytes: int) -> None:
        if not SEGMENT_PATTERN.match(name):
            raise ValueError(f"not an augserve segment name: {name!r}")
        fd = os.open(SHM_DIR / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            self._map = mmap.mmap(fd, os.fstat(fd).st_size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self._memory = np.frombuffer(self._map, np.uint8)  # read-only, as the mapping is
        self.slot_bytes = slot_bytes

    def view(self, slot: int, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
        start = slot * self.slot_bytes + offset
        if offset + int(np.prod(shape)) > self.slot_bytes or start + int(np.prod(shape)) > self._memory.size:
            raise ValueError(f"bytes [{offset}, {offset + int(np.prod(shape))}) of slot {slot} are outside the segment's slots")
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
    fd = os.open(SHM_DIR / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, nonce)
    finally:
        os.close(fd)
    return name, nonce


def remove_probe(name: str) -> None:
    if PROBE_PATTERN.match(name):
        (SHM_DIR / name).unlink(missing_ok=True)


def probe_matches(name: str, nonce: bytes) -> bool:
    """Server side: does /dev/shm/`name` hold `nonce`? (Then the client shares this host.)

    The name comes from the network, the file from any local user, so only a small regular
    file of this server's own user with one link and no group or other bits counts: a FIFO
    would block the RPC thread in open(), a symlink or hard link would let a client learn
    whether a file it cannot read holds a guessed content, and a client of another user could
    not open the server's 0600 segment anyway (it gets in-band)."""
    if not PROBE_PATTERN.match(name) or not 8 <= len(nonce) <= PROBE_MAX_BYTES:
        return False
    try:
        fd = os.open(SHM_DIR / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        status = os.fstat(fd)
        if not (
            stat.S_ISREG(status.st_mode)
            and status.st_nlink == 1
            and status.st_uid == os.geteuid()
            and status.st_mode & 0o077 == 0
            and status.st_size <= PROBE_MAX_BYTES
        ):
            return False
        content = os.read(fd, PROBE_MAX_BYTES + 1)
    except OSError:
        return False
    finally:
        os.close(fd)
    return hmac.compare_digest(content, nonce)
