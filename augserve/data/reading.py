"""Reading dataset files safely, at indexing and at serve time.

A dataset's files belong to whoever can write its folder, not to the server. A name ending in
.jpg may be a FIFO (opening it for reading blocks until a writer comes), a device, a sparse file
of terabytes, or a symlink out of the dataset. So a file is stat-ed before it is opened, opened
only when it is a regular file within the byte limit, with O_NONBLOCK (a FIFO swapped in between
the stat and the open cannot block), checked again once open, and read to at most the limit
plus one byte. Symlinks must resolve inside the dataset root unless the manifest allows
otherwise. Reasons never hold the server's absolute paths: they reach clients.

A file swapped between these checks and the read can slip past the containment check (not the
type and size checks, which are repeated on the open file); the host's permissions are the
guard against writers of the dataset folder.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Sequence
from typing import TYPE_CHECKING, BinaryIO

from augserve.core.images import UnreadableSource
from augserve.core.sample import SourceImage

if TYPE_CHECKING:
    from augserve.data.datasets import Manifest

log = logging.getLogger(__name__)

# Bytes of one dataset file above which it is refused unread: far above any real training
# image, far below what would hurt the server's memory if many were read at once.
DEFAULT_MAX_FILE_BYTES = 256 << 20
OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
FILE_TYPES = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


class RefusedFileError(OSError):
    """A dataset file that is not read; `reason` says why and names no path."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def refusal(status: os.stat_result, max_file_bytes: int) -> str | None:
    """Why a file of this status is not read (not a regular file, over `max_file_bytes`
    bytes), or None when it may be read."""
    if not stat.S_ISREG(status.st_mode):
        kind = next((name for test, name in FILE_TYPES if test(status.st_mode)), "a special file")
        return f"not a regular file ({kind})"
    if status.st_size > max_file_bytes:
        return f"{status.st_size} bytes is over the per-file limit of {max_file_bytes} bytes"
    return None


def reason_of(error: OSError) -> str:
    """The reason to report for a failed stat, open or read, without the path that OSError's
    own text would name."""
    if isinstance(error, RefusedFileError):
        return error.reason
    if error.errno == errno.ENOENT:
        return "file not found"
    return f"cannot read ({error.strerror or type(error).__name__})"


def is_within(path: str, root: str) -> bool:
    """Whether the resolved `path` is `root` (a resolved folder) or lies below it."""
    return os.path.commonpath((path, root)) == root


def resolves_within(path: str, root: str, resolved_folders: dict[str, str]) -> bool:
    """Whether `path`, with every symlink resolved, lies inside `root` (a resolved folder).

    `resolved_folders` remembers the resolution of each parent folder, so a pass over many files
    resolves each folder once; give each pass a fresh dict, as folders may be swapped.
    """
    parent, name = os.path.split(path)
    real_parent = resolved_folders.get(parent)
    if real_parent is None:
        real_parent = resolved_folders[parent] = os.path.realpath(parent)
    real = os.path.join(real_parent, name)
    if os.path.islink(real):
        real = os.path.realpath(real)
    return is_within(real, root)


def open_regular_file(path: str, max_file_bytes: int) -> BinaryIO:
    """`path` opened for binary reading; `RefusedFileError` unless it is a regular file of at
    most `max_file_bytes` bytes (symlinks followed), other `OSError`s as the system raises them.

    The stat comes first so that devices and FIFOs are never opened; the check is repeated on
    the open descriptor in case the name was swapped in between.
    """
    reason = refusal(os.stat(path), max_file_bytes)
    if reason is not None:
        raise RefusedFileError(reason)
    descriptor = os.open(path, OPEN_FLAGS)
    try:
        reason = refusal(os.fstat(descriptor), max_file_bytes)
        if reason is not None:
            raise RefusedFileError(reason)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def read_file(path: str, max_file_bytes: int) -> tuple[bytes, tuple[int, int, int, int]]:
    """The bytes of a regular file and its identity (byte size, modification time in ns,
    device, inode: two datasets' files of one relative name never share it), as
    `open_regular_file` allows; a file that grows past the limit while read is refused."""
    with open_regular_file(path, max_file_bytes) as handle:
        status = os.fstat(handle.fileno())
        # Ask for the size stat gave plus one byte: a read of the whole limit would allocate
        # a limit-sized buffer per file. Only a file that grew since is read on to the limit.
        wanted = min(status.st_size, max_file_bytes) + 1
        data = handle.read(wanted)
        if len(data) == wanted and wanted <= max_file_bytes:
            data += handle.read(max_file_bytes + 1 - wanted)
    if len(data) > max_file_bytes:
        raise RefusedFileError(f"over the per-file limit of {max_file_bytes} bytes (it grew while read)")
    return data, (status.st_size, status.st_mtime_ns, status.st_dev, status.st_ino)


def read_sources(
    manifest: Manifest, sample_ids: Sequence[int], max_file_bytes: int | None = None
) -> list[SourceImage]:
    """The encoded bytes of each sample, with the file's identity (size, mtime, device, inode) for header
    caching. `source` is the manifest's relative path: it names the file to clients.

    A file that cannot be read safely now (removed, replaced by a FIFO or a device, grown over
    `max_file_bytes` bytes, default the manifest's limit, or a symlink out of the dataset root)
    becomes an `UnreadableSource` with the reason: a bad image, which the policy decides.
    """
    limit = manifest.max_file_bytes if max_file_bytes is None else max_file_bytes
    resolved_folders: dict[str, str] = {}
    sources: list[SourceImage] = []
    for sample_id in sample_ids:
        relative = manifest.paths[sample_id]
        label = int(manifest.labels[sample_id])
        path = manifest.path(sample_id)
        try:
            if not manifest.allow_outside_root and not resolves_within(path, manifest.root, resolved_folders):
                raise RefusedFileError("resolves outside the dataset root (a symlink)")
            data, identity = read_file(path, limit)
        except OSError as error:
            reason = reason_of(error)
            log.warning("cannot read %r of %s: %s", relative, manifest.root, reason)
            sources.append(UnreadableSource(sample_id, label, relative, b"", None, reason))
            continue
        sources.append(SourceImage(sample_id, label, relative, data, identity))
    return sources
