"""Hostile hosts: dataset trees and files that once stopped, hung or misled the server.

Each test serves a hostile dataset next to a clean control dataset from one real server on
127.0.0.1. The control's batches must be byte for byte what a server serving only the control
gives, before and after the hostile streams, and the server must keep serving. The hostile
cases: a sparse 4 GiB file named .jpg, a FIFO named .jpg (at indexing and swapped in later),
dangling symlinks and symlinks out of the root, CSV lists with missing files, malformed rows,
absolute and ../ paths, files removed or resized mid-stream, and a valid JPEG whose binary APP
segment holds the bytes of a start-of-scan marker. No message a client sees may hold the
server's absolute paths.
"""

from __future__ import annotations

import io
import os
import resource
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from PIL import Image

from augserve.client import AugserveClientError, Client
from augserve.core.errors import SpecError
from augserve.data.datasets import Manifest, load_manifest
from augserve.data.reading import DEFAULT_MAX_FILE_BYTES
from augserve.rpc.server import AugserveServer, DatasetConfig
from helpers import encode, spec_of
from reliability_helpers import CONTROL_SEED, CONTROL_SPEC, write_png_dataset
from servers import running_server

FOUR_GIB = 4 << 30
LIMIT_WORDS = f"over the per-file limit of {DEFAULT_MAX_FILE_BYTES} bytes"
# Flips only: the output takes the size the dataset was indexed with (no fixed output size).
FLIP = spec_of({"flip": {"horizontal": 0.5}})
TIMEOUT_SECONDS = 30  # every client call: a hang fails the test instead of stalling the run


def picture(seed: int, height: int = 32, width: int = 32) -> np.ndarray:
    """A smooth random RGB picture, [height, width, 3] uint8."""
    noise = np.random.default_rng(seed).normal(128, 60, (height, width, 3))
    return np.clip(cv2.GaussianBlur(noise, (0, 0), 1.0), 0, 255).astype(np.uint8)


def write_pictures(folder: Path, count: int, first_seed: int = 0) -> list[Path]:
    """`count` lossless 32x32 PNG files named 000.png, 001.png, ... in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"{index:03d}.png"
        path.write_bytes(encode(picture(first_seed + index)))
        paths.append(path)
    return paths


def peak_rss_bytes() -> int:
    """The most memory this process has held at once, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def control_batches(address: str) -> list[tuple]:
    """Two epochs of the control dataset: (epoch, position, sample ids, labels, image bytes,
    skip reasons) of every batch."""
    with Client(address, timeout=TIMEOUT_SECONDS) as client, client.stream(
        "control", spec=CONTROL_SPEC, batch_size=4, epochs=2, seed=CONTROL_SEED, split="all",
        transport="inband", group_policy="alone",
    ) as stream:
        return [
            (batch.epoch, batch.position, batch.sample_ids.tolist(), batch.labels.tolist(), batch.images.tobytes(),
             tuple(batch.skipped))
            for batch in stream
        ]


@pytest.fixture(scope="module")
def control_root(tmp_path_factory) -> Path:
    return write_png_dataset(tmp_path_factory.mktemp("control"))


@pytest.fixture(scope="module")
def clean_batches(control_root) -> list[tuple]:
    """What a server serving only the control dataset gives."""
    with running_server({"control": DatasetConfig(str(control_root))}) as server:
        return control_batches(server.address)


@contextmanager
def hostile_server(
    hostile: Path, control_root: Path, clean_batches: list[tuple], backend: str = "opencv"
) -> Iterator[AugserveServer]:
    """A server of `hostile` (as "hostile") and the control; the control is checked against a
    clean server's batches when it starts and again when the test is done with it."""
    datasets = {"hostile": DatasetConfig(str(hostile)), "control": DatasetConfig(str(control_root))}
    with running_server(datasets, backend=backend) as server:
        assert control_batches(server.address) == clean_batches
        yield server
        assert control_batches(server.address) == clean_batches  # still serving, unchanged


def manifest_of(server: AugserveServer) -> Manifest:
    return server.manager.datasets["hostile"].manifest


class Seen:
    """Everything a client was told: skip reasons of batches and error messages."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = str(tmp_path)
        self.messages: list[str] = []

    def add(self, message: str) -> str:
        assert self.tmp_path not in message and not message.startswith("/"), message
        self.messages.append(message)
        return message

    def stream(self, address: str, spec=CONTROL_SPEC, **options: object) -> list:
        """Every batch of a stream of the hostile dataset (copied), recording what it said."""
        options = {"batch_size": 4, "epochs": 1, "seed": 5, "split": "all", "transport": "inband", **options}
        received = []
        try:
            with Client(address, timeout=TIMEOUT_SECONDS) as client, client.stream("hostile", spec=spec, **options) as stream:
                for batch in stream:
                    for entry in batch.skipped:
                        self.add(entry)
                    received.append(batch)
        except AugserveClientError as error:
            self.add(error.message)
            raise
        return received

    def data_loss(self, address: str, spec=CONTROL_SPEC, **options: object) -> tuple[list, str]:
        """(batches received, the DATA_LOSS message) of a stream with the fail policy."""
        received: list = []
        with pytest.raises(AugserveClientError) as caught:
            received = self.stream(address, spec, on_bad_image="fail", **options)
        assert caught.value.code == grpc.StatusCode.DATA_LOSS, caught.value
        return received, caught.value.message


def delivered(batches: list) -> list[int]:
    return sorted(int(sample_id) for batch in batches for sample_id in batch.sample_ids)


def skipped(batches: list) -> list[str]:
    return [entry for batch in batches for entry in batch.skipped]


def sample_id_of(manifest: Manifest, relative: str) -> int:
    return manifest.paths.index(relative)


# ---- (a) type and size ----


def test_a_sparse_4_gib_file_is_refused_unread(tmp_path, control_root, clean_batches):
    """Was: indexing and every epoch read the whole 4 GiB. Now it is refused by its size at
    indexing, and a file grown to 4 GiB after indexing is a bad image, neither of them read."""
    hostile = tmp_path / "hostile"
    write_pictures(hostile / "class0", 6)
    huge = hostile / "class0" / "huge.jpg"
    huge.touch()
    os.truncate(huge, FOUR_GIB)  # sparse: no disk, no memory unless read
    peak_before = peak_rss_bytes()
    seen = Seen(tmp_path)
    with hostile_server(hostile, control_root, clean_batches) as server:
        manifest = manifest_of(server)
        assert ("class0/huge.jpg", f"{FOUR_GIB} bytes is {LIMIT_WORDS}") in manifest.rejected
        assert "class0/huge.jpg" not in manifest.paths and len(manifest) == 6
        grown = "class0/002.png"
        os.truncate(hostile / grown, FOUR_GIB)
        batches = seen.stream(server.address)
        assert skipped(batches) == [f"{grown}: {FOUR_GIB} bytes is {LIMIT_WORDS}"]
        assert delivered(batches) == [i for i in range(6) if i != sample_id_of(manifest, grown)]
        _, message = seen.data_loss(server.address)
        assert message == f"{grown}: {FOUR_GIB} bytes is {LIMIT_WORDS}"
    assert peak_rss_bytes() - peak_before < 1 << 30  # neither 4 GiB was ever read


# ---- (a) FIFOs ----


# A regression blocks a thread in open(2) for good; the thread method ends the run (with every
# thread's stack) where the signal method would wait for that thread forever.
@pytest.mark.timeout(60, method="thread")
def test_a_fifo_named_jpg_hangs_neither_indexing_nor_a_stream(tmp_path, control_root, clean_batches):
    """Was: indexing opened the FIFO and waited for a writer forever. Now it is refused without
    being opened; a FIFO swapped in for an indexed file is a bad image, and the stream goes on."""
    hostile = tmp_path / "hostile"
    write_pictures(hostile / "class0", 5)
    os.mkfifo(hostile / "class0" / "fifo.jpg")
    seen = Seen(tmp_path)
    with hostile_server(hostile, control_root, clean_batches) as server:
        manifest = manifest_of(server)
        assert ("class0/fifo.jpg", "not a regular file (a FIFO)") in manifest.rejected
        swapped = "class0/001.png"
        os.remove(hostile / swapped)
        os.mkfifo(hostile / swapped)
        batches = seen.stream(server.address)
        assert skipped(batches) == [f"{swapped}: not a regular file (a FIFO)"]
        assert len(delivered(batches)) == 4
        _, message = seen.data_loss(server.address)
        assert message == f"{swapped}: not a regular file (a FIFO)"


def test_a_dataset_of_nothing_usable_is_a_clear_spec_error(tmp_path):
    hostile = tmp_path / "hostile" / "class0"
    hostile.mkdir(parents=True)
    os.mkfifo(hostile / "fifo.jpg")
    with pytest.raises(SpecError, match=r"no usable images.*1 refused; first: class0/fifo.jpg: not a regular file"):
        load_manifest(hostile.parent, use_cache=False)


# ---- (b, c) symlinks ----


def test_dangling_and_escaping_symlinks_are_refused(tmp_path, control_root, clean_batches):
    """Was: a dangling symlink crashed start-up with a traceback, and a symlink out of the root
    was served. Now both are refused at indexing, and a file swapped for a symlink out of the
    root after indexing is a bad image; `allow_outside_root=True` serves the escaping one."""
    hostile = tmp_path / "hostile"
    write_pictures(hostile / "class0", 4)
    write_pictures(hostile / "class1", 4, first_seed=10)
    outside = write_pictures(tmp_path / "outside", 2, first_seed=20)
    (hostile / "class0" / "dangling.jpg").symlink_to("no-such-file.jpg")
    (hostile / "class0" / "escape.png").symlink_to(outside[0])
    (hostile / "class2").symlink_to(tmp_path / "outside", target_is_directory=True)
    (hostile / "class1" / "inside.png").symlink_to(hostile / "class0" / "000.png")  # within: fine
    seen = Seen(tmp_path)
    with hostile_server(hostile, control_root, clean_batches) as server:
        manifest = manifest_of(server)
        assert dict(manifest.rejected) == {
            "class0/dangling.jpg": "dangling symlink",
            "class0/escape.png": "symlink target outside the dataset root",
            "class2/000.png": "symlink target outside the dataset root",
            "class2/001.png": "symlink target outside the dataset root",
        }
        assert "class1/inside.png" in manifest.paths and len(manifest) == 9
        swapped = "class1/002.png"
        os.remove(hostile / swapped)
        os.symlink(outside[1], hostile / swapped)
        batches = seen.stream(server.address)
        assert skipped(batches) == [f"{swapped}: resolves outside the dataset root (a symlink)"]
        assert len(delivered(batches)) == 8
    allowed = load_manifest(hostile, use_cache=False, allow_outside_root=True)
    assert {"class0/escape.png", "class2/000.png", "class1/002.png"} <= set(allowed.paths)
    assert dict(allowed.rejected) == {"class0/dangling.jpg": "dangling symlink"}


# ---- (b, c) CSV lists ----


def test_csv_rows_that_are_missing_malformed_or_outside_are_refused(tmp_path, control_root, clean_batches):
    """Was: a row naming a missing file or a malformed row crashed start-up; absolute and ../
    paths out of the CSV's folder were served. Now each such row is refused and the rest served;
    `allow_outside_root=True` serves the outside paths."""
    root = tmp_path / "hostile"
    write_pictures(root / "images", 4)
    outside = write_pictures(tmp_path / "outside", 2, first_seed=20)
    rows = [
        "path,label",
        "images/000.png,cat",
        "images/001.png,dog",
        "images/gone.png,cat",  # line 4: missing
        "images/002.png,dog,extra",  # line 5: malformed
        "images/003.png",  # line 6: malformed
        f"{outside[0]},cat",  # line 7: absolute, outside
        "../outside/001.png,dog",  # line 8: outside
        f"{root / 'images' / '003.png'},dog",  # absolute, inside: fine
    ]
    (root / "list.csv").write_text("\n".join(rows) + "\n")
    seen = Seen(tmp_path)
    with hostile_server(root / "list.csv", control_root, clean_batches) as server:
        manifest = manifest_of(server)
        assert manifest.paths == ("images/000.png", "images/001.png", "images/003.png")
        assert dict(manifest.rejected) == {
            "images/gone.png": "line 4: file not found",
            "list.csv:5": "malformed row (3 fields, the header has 2)",
            "list.csv:6": "malformed row (1 fields, the header has 2)",
            "../outside/000.png": "line 7: path outside the dataset root (the CSV's folder)",
            "../outside/001.png": "line 8: path outside the dataset root (the CSV's folder)",
        }
        batches = seen.stream(server.address)
        assert delivered(batches) == [0, 1, 2] and not skipped(batches)
    allowed = load_manifest(root / "list.csv", use_cache=False, allow_outside_root=True)
    assert allowed.paths == ("images/000.png", "images/001.png", "../outside/000.png", "../outside/001.png", "images/003.png")
    assert len(allowed.rejected) == 3


# ---- (d) relative paths only ----


def test_clients_are_told_dataset_relative_paths_only(tmp_path, control_root, clean_batches):
    """Was: skip reasons and DATA_LOSS messages named files by the server's absolute path. Now
    by the path within the dataset: a removed file, a symlink loop (whose OSError text names the
    absolute path) and a corrupt file, skipped and failed."""
    hostile = tmp_path / "hostile"
    write_pictures(hostile / "class0", 6)
    seen = Seen(tmp_path)
    with hostile_server(hostile, control_root, clean_batches) as server:
        (hostile / "class0" / "001.png").unlink()
        (hostile / "class0" / "003.png").unlink()
        (hostile / "class0" / "003.png").symlink_to("003.png")
        (hostile / "class0" / "004.png").write_bytes(b"\x89PNG\r\n\x1a\n not a picture after all")
        batches = seen.stream(server.address)
        removed, loop, corrupt = sorted(skipped(batches))
        assert removed == "class0/001.png: file not found"
        assert loop == "class0/003.png: cannot read (Too many levels of symbolic links)"
        assert corrupt.startswith("class0/004.png: ")
        _, message = seen.data_loss(server.address, seed=6)
        assert message.split(": ")[0] in ("class0/001.png", "class0/003.png", "class0/004.png")
    assert len(seen.messages) == 4


# ---- (e) a file resized mid-stream ----


def replace_file(path: Path, data: bytes) -> None:
    """Swap a file's content at once (a producer reading ahead must never see it half written)."""
    temporary = path.with_name(path.name + ".swap")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def test_a_file_resized_mid_stream_is_a_bad_image(tmp_path, control_root, clean_batches):
    """Was: with a spec that keeps the indexed size, the whole batch failed with a SpecError
    ("images of this batch differ in size"). Now that file is a bad image: skipped and named,
    or DATA_LOSS naming it after the good batches."""
    hostile = tmp_path / "hostile"
    paths = write_pictures(hostile / "class0", 12)
    resized = paths[5]
    original = resized.read_bytes()
    reason = "class0/005.png: size changed to 40x24 since indexing (output 40x24, expected 32x32)"
    seen = Seen(tmp_path)
    with hostile_server(hostile, control_root, clean_batches) as server:
        sample_id = sample_id_of(manifest_of(server), "class0/005.png")
        # skip: after the change, some batch leaves the file out and names it.
        with Client(server.address, timeout=TIMEOUT_SECONDS) as client, client.stream(
            "hostile", spec=FLIP, batch_size=4, epochs=0, seed=7, split="all", transport="inband"
        ) as stream:
            batches = iter(stream)
            first = next(batches)
            assert first.images.shape == (4, 32, 32, 3) and not first.skipped
            replace_file(resized, encode(picture(99, 40, 24)))
            for _, batch in zip(range(40), batches):  # the file comes again within 4 epochs
                for entry in batch.skipped:
                    seen.add(entry)
                if batch.skipped:
                    break
            assert batch.skipped == [reason]
            assert sample_id not in batch.sample_ids and batch.images.shape == (3, 32, 32, 3)
        # fail: DATA_LOSS naming it; every batch before it complete.
        replace_file(resized, original)
        with Client(server.address, timeout=TIMEOUT_SECONDS) as client, client.stream(
            "hostile", spec=FLIP, batch_size=4, epochs=0, seed=8, split="all", transport="inband",
            on_bad_image="fail",
        ) as stream:
            batches = iter(stream)
            good = [next(batches)]
            replace_file(resized, encode(picture(99, 40, 24)))
            with pytest.raises(AugserveClientError) as caught:
                for _, batch in zip(range(40), batches):
                    good.append(batch)
        assert caught.value.code == grpc.StatusCode.DATA_LOSS
        assert seen.add(caught.value.message) == reason
        assert all(batch.images.shape == (4, 32, 32, 3) and not batch.skipped for batch in good)


# ---- (f) a valid JPEG whose APP segment holds FF DA ----


def with_photoshop_segment(jpeg: bytes) -> bytes:
    """`jpeg` with an APP13 (Photoshop) segment after its start marker, whose binary resource
    holds a start-of-scan marker, stray marker bytes and every byte value."""
    blob = b"\xff\xda\x00\x0c\x03\xff\x10\xff\x80\xff\xd9" + bytes(range(256))
    resource = b"8BIM" + struct.pack(">H", 0x0404) + b"\x00\x00" + struct.pack(">I", len(blob)) + blob
    payload = b"Photoshop 3.0\x00" + resource
    return jpeg[:2] + b"\xff\xed" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


@pytest.mark.parametrize("backend", ["opencv", "dali-cpu"])
def test_a_jpeg_with_ff_da_in_an_app_segment_is_served(tmp_path, control_root, clean_batches, backend):
    """Was: skipped as "corrupt JPEG (invalid marker in the image data)": the header check took
    the first FF DA anywhere for the scan. Now the segments are walked by their lengths, and the
    file is served exactly as the same JPEG without the segment."""
    plain = encode(picture(3, 40, 48), ".jpg")
    tagged = with_photoshop_segment(plain)
    assert cv2.imdecode(np.frombuffer(tagged, np.uint8), cv2.IMREAD_COLOR).shape == (40, 48, 3)
    with Image.open(io.BytesIO(tagged)) as image:
        image.load()
        assert "photoshop" in image.info
    hostile = tmp_path / "hostile"
    (hostile / "class0").mkdir(parents=True)
    (hostile / "class0" / "plain.jpg").write_bytes(plain)
    (hostile / "class0" / "tagged.jpg").write_bytes(tagged)
    seen = Seen(tmp_path)
    with hostile_server(hostile, control_root, clean_batches, backend) as server:
        batches = seen.stream(server.address, spec=spec_of(), batch_size=2)
        assert not skipped(batches) and delivered(batches) == [0, 1]
        images = dict(zip(batches[0].sample_ids.tolist(), batches[0].images))
        assert images[0].tobytes() == images[1].tobytes()
