"""Datasets: manifests of image files, splits, per-epoch order and shards.

A manifest lists a dataset's files once: relative path, label, byte size and upright image
size. It is built from an ImageFolder tree (one folder per class, like Keras
`flow_from_directory`) or a CSV file list (`path,label` rows, paths relative to the CSV), and
cached under `$AUGSERVE_CACHE/manifests`, keyed by the dataset's path and checked against the
files' sizes and modification times. `augserve index PATH` builds it ahead of time.

Sample ids are manifest indices: stable across splits, shards and epochs, so a sample's
augmentation never depends on how the data was divided.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from augserve.data.demo import cache_root
from augserve.core.errors import SpecError
from augserve.core.images import EXIF_ORIENTATION

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MANIFEST_VERSION = 1
SPLITS = ("train", "validation", "all")


@dataclass(frozen=True, eq=False)
class Manifest:
    """The files of a dataset. Arrays are indexed by sample id; sizes are upright (after EXIF
    orientation) and 0 where the header could not be read (such files fail at serve time)."""

    root: str
    paths: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]
    byte_sizes: np.ndarray
    heights: np.ndarray
    widths: np.ndarray
    fingerprint: str

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


def _stat_entry(root: Path, relative: str, label_name: str) -> FileEntry:
    stat = (root / relative).stat()
    return FileEntry(relative, label_name, stat.st_size, stat.st_mtime_ns)


def scan_image_folder(root: Path) -> list[FileEntry]:
    """Files of an ImageFolder tree: class folders sorted by name, files sorted within."""
    entries = []
    class_folders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not class_folders:
        raise SpecError("dataset", f"{root} has no class folders (expected ImageFolder layout root/CLASS/IMAGE)")
    for class_name in class_folders:
        for folder, subfolders, files in os.walk(root / class_name):
            subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
            for name in sorted(files):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    relative = os.path.relpath(os.path.join(folder, name), root)
                    entries.append(_stat_entry(root, relative, class_name))
    return entries


def scan_csv(csv_path: Path) -> list[FileEntry]:
    """Files of a CSV list with a header row `path,label`; paths relative to the CSV's folder."""
    root = csv_path.parent
    entries = []
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
            raise SpecError("dataset", f"{csv_path} needs a header row with columns path,label")
        for line, row in enumerate(reader, start=2):
            path, label = (row["path"] or "").strip(), (row["label"] or "").strip()
            if not path or not label:
                raise SpecError("dataset", f"{csv_path}:{line}: empty path or label")
            relative = os.path.relpath(path, root) if os.path.isabs(path) else path
            entries.append(_stat_entry(root, relative, label))
    return entries


def _class_order(names: set[str]) -> tuple[str, ...]:
    """Class names sorted; numerically when every name is an integer (CSV labels 0..9)."""
    if all(name.lstrip("-").isdigit() for name in names):
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))


def _fingerprint(root: Path, entries: list[FileEntry]) -> str:
    digest = hashlib.sha256(str(root).encode())
    for entry in entries:
        digest.update(f"{entry.path}\0{entry.label_name}\0{entry.byte_size}\0{entry.modified_ns}\n".encode())
    return digest.hexdigest()


def _upright_size(path: str) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(EXIF_ORIENTATION, 1) if image.format == "JPEG" else 1
    except Exception:
        return 0, 0
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def _cache_file(source: Path) -> Path:
    key = hashlib.sha256(str(source).encode()).hexdigest()[:24]
    return cache_root() / "manifests" / f"{key}.json"


def load_manifest(source: str | Path, threads: int = 8, use_cache: bool = True) -> Manifest:
    """The manifest of an ImageFolder tree or CSV file list, from the cache when still valid."""
    source = Path(source).resolve()
    if not source.exists():
        raise SpecError("dataset", f"{source} does not exist")
    entries = scan_csv(source) if source.is_file() else scan_image_folder(source)
    if not entries:
        raise SpecError("dataset", f"{source} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    root = source.parent if source.is_file() else source
    fingerprint = _fingerprint(root, entries)
    cache_file = _cache_file(source)
    if use_cache and cache_file.exists():
        try:
            cached = Manifest.from_json(cache_file.read_text())
            if cached.fingerprint == fingerprint:
                return cached
        except (ValueError, KeyError, json.JSONDecodeError):
            log.warning("ignoring unreadable manifest cache %s", cache_file)
    log.info("indexing %d images of %s", len(entries), source)
    with ThreadPoolExecutor(threads) as pool:
        sizes = list(pool.map(_upright_size, (str(root / entry.path) for entry in entries)))
    classes = _class_order({entry.label_name for entry in entries})
    class_index = {name: index for index, name in enumerate(classes)}
    manifest = Manifest(
        root=str(root),
        paths=tuple(entry.path for entry in entries),
        labels=np.array([class_index[entry.label_name] for entry in entries], np.int64),
        classes=classes,
        byte_sizes=np.array([entry.byte_size for entry in entries], np.int64),
        heights=np.array([size[0] for size in sizes], np.int32),
        widths=np.array([size[1] for size in sizes], np.int32),
        fingerprint=fingerprint,
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
        for label in range(len(self.manifest.classes)):
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
