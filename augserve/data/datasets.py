"""Datasets: manifests of image files, splits, per-epoch order and shards.

A manifest lists a dataset's files once: relative path, label, byte size and upright image
size. It is built from an ImageFolder tree (one folder per class, like Keras
`flow_from_directory`) or a CSV file list (`path,label` rows, paths relative to the CSV), and
cached under `$AUGSERVE_CACHE/manifests`, keyed by the dataset's path and checked against the
files' sizes and modification times. `augserve index PATH` builds it ahead of time.

Only regular files within the byte limit and inside the dataset root are listed; the rest are
refused, logged and listed (`Manifest.rejected`), so a hostile tree cannot stop start-up.

Sample ids are manifest indices: stable across splits, shards and epochs, so a sample's
augmentation never depends on how the data was divided.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import stat
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from itertools import repeat
from pathlib import Path

import numpy as np
from PIL import Image

from augserve.core.errors import SpecError
from augserve.core.images import EXIF_ORIENTATION
from augserve.data.annotated import (
    CLASSES_FILE,
    NO_LABEL,
    DatasetTargets,
    is_label_map_folder,
    keep,
    scan_coco,
    scan_label_map_folder,
)
from augserve.data.demo import cache_root
from augserve.data.reading import (
    DEFAULT_MAX_FILE_BYTES,
    open_regular_file,
    reason_of,
    refusal,
    resolves_within,
)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MANIFEST_VERSION = 1
SPLITS = ("train", "validation", "all")
LOGGED_REJECTIONS = 20  # refused files logged one by one; the rest are counted


@dataclass(frozen=True, eq=False)
class Manifest:
    """The files of a dataset. Arrays are indexed by sample id; sizes are upright (after EXIF
    orientation) and 0 where the header could not be read (such files fail at serve time).

    `rejected` lists the (relative path, reason) of files refused at indexing (not regular,
    over `max_file_bytes` bytes, outside the root, missing, malformed CSV rows); they have no
    sample id. `max_file_bytes` and `allow_outside_root` also govern reading at serve time.
    """

    root: str
    paths: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]
    byte_sizes: np.ndarray
    heights: np.ndarray
    widths: np.ndarray
    fingerprint: str
    rejected: tuple[tuple[str, str], ...] = ()
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    allow_outside_root: bool = False
    # Boxes, keypoints and masks of a COCO file or label-map folder (`augserve.data.annotated`).
    targets: DatasetTargets | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, sample_id: int) -> str:
        return os.path.join(self.root, self.paths[sample_id])

    def uniform_size(self, sample_ids: np.ndarray | None = None) -> tuple[int, int] | None:
        """(height, width) shared by every image (of `sample_ids`), else None."""
        heights = self.heights if sample_ids is None else self.heights[sample_ids]
        widths = self.widths if sample_ids is None else self.widths[sample_ids]
        if len(heights) == 0 or heights.min() != heights.max() or widths.min() != widths.max():
            return None
        return int(heights[0]), int(widths[0])

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": MANIFEST_VERSION,
                "root": self.root,
                "fingerprint": self.fingerprint,
                "classes": list(self.classes),
                "paths": list(self.paths),
                "labels": self.labels.tolist(),
                "byte_sizes": self.byte_sizes.tolist(),
                "heights": self.heights.tolist(),
                "widths": self.widths.tolist(),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        if data.get("version") != MANIFEST_VERSION:
            raise ValueError("manifest version differs")
        return cls(
            root=data["root"],
            paths=tuple(data["paths"]),
            labels=np.array(data["labels"], np.int64),
            classes=tuple(data["classes"]),
            byte_sizes=np.array(data["byte_sizes"], np.int64),
            heights=np.array(data["heights"], np.int32),
            widths=np.array(data["widths"], np.int32),
            fingerprint=data["fingerprint"],
        )


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the manifest root
    label_name: str
    byte_size: int
    modified_ns: int


def _is_clean_name(text: str) -> bool:
    """False for names holding NUL (no file has one) or undecodable bytes (surrogate escapes):
    paths and labels reach clients as protobuf strings, which must be UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\0" not in text


class DatasetScan:
    """The entries of one pass over a dataset and the refusals: each candidate file is checked
    for type, byte size and containment before it becomes an entry, without being opened."""

    def __init__(self, root: Path, max_file_bytes: int, allow_outside_root: bool) -> None:
        self.root = str(root)
        self.max_file_bytes = max_file_bytes
        self.allow_outside_root = allow_outside_root
        self.entries: list[FileEntry] = []
        self.rejected: list[tuple[str, str]] = []
        self._resolved_folders: dict[str, str] = {}

    def refuse(self, relative: str, reason: str) -> None:
        self.rejected.append((relative, reason))

    def add(self, relative: str, label_name: str, where: str = "") -> None:
        """Check the file `relative` (to the root) and keep it with `label_name`, or refuse it;
        `where` prefixes the reason (a CSV line)."""
        status = self._check(relative, label_name)
        if isinstance(status, str):
            self.refuse(relative, where + status)
        else:
            self.entries.append(FileEntry(relative, label_name, status.st_size, status.st_mtime_ns))

    def add_listed(self, path: str, label_name: str, where: str, root_is: str) -> str:
        """`add` a file a list names (a CSV row, a COCO image): relative to the root or absolute,
        refused when it lies outside the root (`../`) unless allowed; `root_is` says what the
        root is in the refusal. Returns the path as listed in the manifest."""
        relative = os.path.normpath(os.path.relpath(path, self.root) if os.path.isabs(path) else path)
        if not self.allow_outside_root and (relative == os.pardir or relative.startswith(os.pardir + os.sep)):
            self.refuse(relative, f"{where}path outside the dataset root ({root_is})")
        else:
            self.add(relative, label_name, where)
        return relative

    def _check(self, relative: str, label_name: str) -> os.stat_result | str:
        """The file's status (symlinks followed) when it may be listed, else the reason."""
        if not _is_clean_name(relative) or not _is_clean_name(label_name):
            return "name or label is not valid UTF-8 or holds a NUL byte"
        path = os.path.join(self.root, relative)
        try:
            link = os.lstat(path)
        except OSError as error:
            return reason_of(error)
        try:
            status = os.stat(path)
        except OSError as error:
            return "dangling symlink" if stat.S_ISLNK(link.st_mode) else reason_of(error)
        if not self.allow_outside_root and not resolves_within(path, self.root, self._resolved_folders):
            return "symlink target outside the dataset root"
        return refusal(status, self.max_file_bytes) or status


def _refuse_folder(scan: DatasetScan, class_name: str, error: OSError) -> None:
    """Refuse a folder of the tree that cannot be listed (os.walk would skip it silently)."""
    relative = os.path.relpath(error.filename, scan.root) if error.filename else class_name
    scan.refuse(relative, reason_of(error))


def scan_image_folder(scan: DatasetScan) -> None:
    """Files of an ImageFolder tree: class folders sorted by name, files sorted within."""
    root = Path(scan.root)
    class_folders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not class_folders:
        raise SpecError("dataset", f"{root} has no class folders (expected ImageFolder layout root/CLASS/IMAGE)")
    for class_name in class_folders:
        refuse_folder = partial(_refuse_folder, scan, class_name)
        for folder, subfolders, files in os.walk(root / class_name, onerror=refuse_folder):
            subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
            for name in sorted(files):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    scan.add(os.path.relpath(os.path.join(folder, name), root), class_name)


def _csv_rows(handle: Iterator[str], scan: DatasetScan, csv_name: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) of each CSV row after the header; rows the csv module cannot parse
    (NUL bytes, fields over its size limit) are refused and skipped."""
    reader = csv.reader(handle)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            scan.refuse(f"{csv_name}:{reader.line_num}", f"malformed row ({error})")
            continue
        yield reader.line_num, row


def scan_csv(csv_path: Path, scan: DatasetScan) -> None:
    """Files of a CSV list with a header row naming the columns `path` and `label`; paths
    relative to the CSV's folder (the dataset root). Rows that are malformed, name a missing or
    unusable file, or a path outside the root (absolute or `../`, unless allowed) are refused."""
    with open_regular_file(str(csv_path), sys.maxsize) as binary:
        # Undecodable bytes survive as surrogate escapes, to be refused row by row.
        handle = io.TextIOWrapper(binary, encoding="utf-8", errors="surrogateescape", newline="")
        rows = _csv_rows(handle, scan, csv_path.name)
        header = next(rows, (1, []))[1]
        if "path" not in header or "label" not in header:
            raise SpecError("dataset", f"{csv_path} needs a header row with columns path,label")
        path_column, label_column = header.index("path"), header.index("label")
        for line, row in rows:
            where = f"line {line}: "
            if not row:
                continue  # blank lines, as csv.DictReader skips them
            if len(row) != len(header):
                scan.refuse(f"{csv_path.name}:{line}", f"malformed row ({len(row)} fields, the header has {len(header)})")
                continue
            path, label = row[path_column].strip(), row[label_column].strip()
            if not path or not label:
                scan.refuse(f"{csv_path.name}:{line}", "empty path or label")
                continue
            scan.add_listed(path, label, where, "the CSV's folder")


def _class_order(names: set[str]) -> tuple[str, ...]:
    """Class names sorted; numerically when every name is an integer (CSV labels 0..9)."""
    if all(name.lstrip("-").isdigit() for name in names):
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))


def _fingerprint(root: Path, entries: list[FileEntry], annotation_files: list[Path]) -> str:
    digest = hashlib.sha256(str(root).encode())
    for path in annotation_files:  # the classes come from them
        status = path.stat()
        digest.update(f"{path}\0{status.st_size}\0{status.st_mtime_ns}\n".encode())
    for entry in entries:
        digest.update(f"{entry.path}\0{entry.label_name}\0{entry.byte_size}\0{entry.modified_ns}\n".encode())
    return digest.hexdigest()


def _upright_size(path: str, max_file_bytes: int) -> tuple[int, int]:
    """(height, width) after EXIF orientation, from the header; (0, 0) when unreadable. The file
    is opened as `read_file` would, so one swapped for a FIFO since the scan cannot block."""
    try:
        with open_regular_file(path, max_file_bytes) as handle, Image.open(handle) as image:
            width, height = image.size
            orientation = image.getexif().get(EXIF_ORIENTATION, 1) if image.format == "JPEG" else 1
    except Exception:
        return 0, 0
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def _cache_file(source: Path) -> Path:
    key = hashlib.sha256(str(source).encode()).hexdigest()[:24]
    return cache_root() / "manifests" / f"{key}.json"


def load_manifest(
    source: str | Path,
    threads: int = 8,
    use_cache: bool = True,
    *,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    allow_outside_root: bool = False,
) -> Manifest:
    """The manifest of an ImageFolder tree, a CSV file list, a COCO file (`.json`) or a
    label-map folder (`images/` and `masks/`: `augserve.data.annotated`), from the cache when
    still valid.

    Every file is checked before it is listed: a regular file (FIFOs, sockets, devices and
    directories are refused unopened) of at most `max_file_bytes` bytes, inside the dataset root
    with symlinks resolved (the folder, or the CSV's folder) unless `allow_outside_root`. Files
    that fail are logged and listed in `Manifest.rejected`, never served; a dataset left with
    no file is a SpecError.
    """
    if max_file_bytes < 1:
        raise SpecError("max_file_bytes", f"{max_file_bytes} is not a positive number of bytes")
    source = Path(source).resolve()
    if not source.exists():
        raise SpecError("dataset", f"{source} does not exist")
    if not source.is_dir() and not source.is_file():
        raise SpecError("dataset", f"{source} is neither a folder (ImageFolder) nor a regular file (CSV)")
    root = source if source.is_dir() else source.parent
    scan = DatasetScan(root, max_file_bytes, allow_outside_root)
    targets, listed, annotation_files = None, [], []
    if source.is_file() and source.suffix.lower() == ".json":
        listed, targets = scan_coco(source)
        annotation_files = [source]
    elif is_label_map_folder(source):
        listed, targets = scan_label_map_folder(source)
        annotation_files = [path for path in [source / CLASSES_FILE] if path.is_file()]
    elif source.is_dir():
        scan_image_folder(scan)
    else:
        scan_csv(source, scan)
    listed = [scan.add_listed(path, "", "", "the annotation file's folder") for path in listed]
    if targets is not None:
        targets = replace(keep(targets, listed, [entry.path for entry in scan.entries]), max_file_bytes=max_file_bytes)
    rejected = tuple(scan.rejected)
    _log_rejected(source, rejected)
    entries = scan.entries
    if not entries:
        first = f"; first: {rejected[0][0]}: {rejected[0][1]}" if rejected else ""
        raise SpecError(
            "dataset", f"{source} holds no usable images ({', '.join(IMAGE_EXTENSIONS)}); {len(rejected)} refused{first}"
        )
    checks = {"rejected": rejected, "max_file_bytes": max_file_bytes, "allow_outside_root": allow_outside_root, "targets": targets}
    fingerprint = _fingerprint(root, entries, annotation_files)
    cache_file = _cache_file(source)
    if use_cache and cache_file.exists():
        try:
            cached = Manifest.from_json(cache_file.read_text())
            if cached.fingerprint == fingerprint:
                return replace(cached, **checks)
        except (ValueError, KeyError, json.JSONDecodeError):
            log.warning("ignoring unreadable manifest cache %s", cache_file)
    log.info("indexing %d images of %s", len(entries), source)
    with ThreadPoolExecutor(threads) as pool:
        sizes = list(pool.map(_upright_size, (str(root / entry.path) for entry in entries), repeat(max_file_bytes)))
    if targets is None:
        classes = _class_order({entry.label_name for entry in entries})
        class_index = {name: index for index, name in enumerate(classes)}
        labels = np.array([class_index[entry.label_name] for entry in entries], np.int64)
    else:
        classes, labels = targets.classes, np.full(len(entries), NO_LABEL, np.int64)
    manifest = Manifest(
        root=str(root),
        paths=tuple(entry.path for entry in entries),
        labels=labels,
        classes=classes,
        byte_sizes=np.array([entry.byte_size for entry in entries], np.int64),
        heights=np.array([size[0] for size in sizes], np.int32),
        widths=np.array([size[1] for size in sizes], np.int32),
        fingerprint=fingerprint,
        **checks,
    )
    if use_cache:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_file.with_suffix(f".tmp{os.getpid()}")
        temporary.write_text(manifest.to_json())
        os.replace(temporary, cache_file)
    unreadable = int((manifest.heights == 0).sum())
    if unreadable:
        log.warning("%d files of %s have unreadable headers; they will be skipped or fail by policy", unreadable, source)
    return manifest


def _log_rejected(source: Path, rejected: tuple[tuple[str, str], ...]) -> None:
    """One warning per refused file, up to a bound (a hostile tree may hold millions)."""
    for relative, reason in rejected[:LOGGED_REJECTIONS]:
        log.warning("%s: refused %r: %s", source, relative, reason)
    if len(rejected) > LOGGED_REJECTIONS:
        log.warning("%s: refused %d more files (Manifest.rejected lists them all)", source, len(rejected) - LOGGED_REJECTIONS)
    if rejected:
        log.warning("%s: %d files refused; they are not served", source, len(rejected))


@dataclass(frozen=True)
class Dataset:
    """A served dataset: its manifest and how it divides into train and validation."""

    name: str
    manifest: Manifest
    validation_fraction: float = 0.0
    split_seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.validation_fraction < 1.0:
            raise SpecError("validation_fraction", f"{self.validation_fraction} is outside [0, 1)")

    def split_ids(self, split: str) -> np.ndarray:
        """Sorted sample ids of a split. Validation takes the same fraction of every class,
        chosen by `split_seed`; train is the rest."""
        if split not in SPLITS:
            raise SpecError("split", f"expected one of {list(SPLITS)}, got {split!r}")
        all_ids = np.arange(len(self.manifest), dtype=np.int64)
        if split == "all":
            return all_ids
        validation = np.zeros(len(self.manifest), bool)
        # Every label present (an annotated dataset's images all have NO_LABEL).
        for label in np.unique(self.manifest.labels).tolist():
            members = np.flatnonzero(self.manifest.labels == label)
            rng = np.random.Generator(np.random.Philox(key=[self.split_seed, label]))
            count = int(round(len(members) * self.validation_fraction))
            validation[rng.permutation(members)[:count]] = True
        return all_ids[validation] if split == "validation" else all_ids[~validation]


def epoch_order(
    split_ids: np.ndarray, seed: int, epoch: int, shard_index: int, shard_count: int, shuffle: bool
) -> np.ndarray:
    """Sample ids of one shard in one epoch, in delivery order.

    The split is permuted by (seed, epoch) when `shuffle`, then dealt round-robin: shard k
    takes positions k, k + n, k + 2n, ... so every sample is in exactly one shard per epoch and
    shard sizes differ by at most one.
    """
    if shuffle:
        rng = np.random.Generator(np.random.Philox(key=[seed, epoch], counter=[0, 0, 0, 1]))
        split_ids = split_ids[rng.permutation(len(split_ids))]
    return split_ids[shard_index::shard_count]
