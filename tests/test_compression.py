"""In-band compression chosen by the client, against a real server on 127.0.0.1 serving JPEGs
cut from real photographs: every codec delivers the uncompressed batches byte for byte, to a
client written from the .proto alone under gRPC's default 4 MiB receive limit and to the
Python client; bad choices are INVALID_ARGUMENT naming the field; a missing library is named;
group members with different codecs still share one production."""

from __future__ import annotations

import importlib
import threading
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from helpers import encode
from servers import running_server

from augserve._proto.augserve.v1 import augserve_pb2 as pb
from augserve._proto.augserve.v1 import augserve_pb2_grpc as pb_grpc
from augserve.client import AugserveClientError, Client
from augserve.core.spec import AugmentSpec
from augserve.rpc.compression import CODECS, COMPRESSION_VALUES
from augserve.rpc.convert import spec_to_proto
from augserve.rpc.server import DatasetConfig

SPEC = AugmentSpec.from_dict({"ops": [{"flip": {}}, {"random_resized_crop": {"size": 224}}]})
DEFAULT_RECEIVE_LIMIT = 4 << 20
IMAGES = 96  # batches of 64: one full, one of 32
BATCH_SIZE = 64
CODEC_NAMES = sorted(CODECS)


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory, photos) -> Path:
    """IMAGES JPEGs (quality 90, 256×256): windows of scikit-image's photographs, one class
    folder per photograph."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    names = sorted(photos)
    for index in range(IMAGES):
        name = names[index % len(names)]
        photo = photos[name] if photos[name].ndim == 3 else np.stack([photos[name]] * 3, axis=-1)
        side = int(min(photo.shape[:2]) * rng.uniform(0.4, 1.0))
        top, left = (int(rng.integers(0, extent - side + 1)) for extent in photo.shape[:2])
        window = cv2.resize(photo[top : top + side, left : left + side, :3], (256, 256), interpolation=cv2.INTER_AREA)
        folder = root / name
        folder.mkdir(exist_ok=True)
        (folder / f"{index:03d}.jpg").write_bytes(encode(window, ".jpg", quality=90))
    return root


@pytest.fixture(scope="module")
def server(photo_root):
    with running_server({"photos": DatasetConfig(str(photo_root))}) as server:
        yield server


def opening(**fields: object) -> pb.OpenSession:
    return pb.OpenSession(
        dataset="photos", spec=spec_to_proto(SPEC), batch_size=BATCH_SIZE, seed=3, epochs=1,
        transport=pb.TRANSPORT_INBAND, **fields,
    )  # fmt: skip


def decode_as_the_proto_says(chunk: pb.Chunk) -> bytes:
    """A chunk's pixels, decoded with the stock libraries' one-shot calls, as the Chunk comment
    says: raw when `compression` is unset, else one frame of `decoded_length` bytes."""
    if chunk.compression in (pb.COMPRESSION_UNSPECIFIED, pb.COMPRESSION_NONE):
        return chunk.data
    if chunk.compression == pb.COMPRESSION_ZSTD:
        import zstandard

        pixels = zstandard.ZstdDecompressor().decompress(chunk.data)
    elif chunk.compression == pb.COMPRESSION_LZ4:
        import lz4.frame

        pixels = lz4.frame.decompress(chunk.data)
    else:
        raise AssertionError(f"unknown compression {chunk.compression}")
    assert len(pixels) == chunk.decoded_length > len(chunk.data)
    return pixels


def raw_batches(address: str, request: pb.OpenSession) -> tuple[list[bytes], list[pb.Chunk]]:
    """A client written from the .proto alone, with gRPC's default receive limit: every
    batch's pixels, reassembled, and every chunk without its data."""
    batches: list[bytearray] = []
    chunks: list[pb.Chunk] = []
    with grpc.insecure_channel(address) as channel:
        requests = iter([pb.ClientMessage(open=request), pb.ClientMessage(credit=pb.Credit(batches=100))])
        for message in pb_grpc.AugmentStub(channel).Stream(requests, timeout=120):
            assert message.ByteSize() <= DEFAULT_RECEIVE_LIMIT
            kind = message.WhichOneof("kind")
            if kind == "batch":
                batches.append(bytearray())
            elif kind == "chunk":
                assert message.chunk.offset == len(batches[-1])
                batches[-1] += decode_as_the_proto_says(message.chunk)
                chunks.append(pb.Chunk(compression=message.chunk.compression, decoded_length=message.chunk.decoded_length))
    return [bytes(pixels) for pixels in batches], chunks


def client_batches(address: str, **options: object) -> list[bytes]:
    with Client(address) as client, client.stream(
        "photos", spec=SPEC, batch_size=BATCH_SIZE, seed=3, epochs=1, transport="inband", **options
    ) as stream:
        return [batch.images.tobytes() for batch in stream]


@pytest.fixture(scope="module")
def uncompressed(server) -> list[bytes]:
    batches, chunks = raw_batches(server.address, opening())
    assert [len(pixels) for pixels in batches] == [64 * 224 * 224 * 3, 32 * 224 * 224 * 3]
    assert all(chunk.compression == pb.COMPRESSION_UNSPECIFIED and not chunk.decoded_length for chunk in chunks)
    return batches


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_every_codec_delivers_the_uncompressed_batches_byte_for_byte(server, uncompressed, name):
    """224×224 batches of 64 (9.6 MB, three chunks) under the default 4 MiB receive limit:
    the .proto-only client decodes every chunk as encoded and smaller; the Python client's
    batches are the same bytes."""
    batches, chunks = raw_batches(server.address, opening(compression=COMPRESSION_VALUES[name]))
    assert batches == uncompressed
    assert chunks and all(chunk.compression == CODECS[name].wire for chunk in chunks)
    assert client_batches(server.address, compression=name) == uncompressed


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_levels_at_both_ends_deliver_the_same_bytes(server, uncompressed, name):
    low, high = CODECS[name].levels
    for level in (low, high):
        assert client_batches(server.address, compression=name, compression_level=level) == uncompressed, level


def test_server_info_lists_the_codecs_and_their_levels(server):
    with Client(server.address) as client:
        offered = client.server_info().compressions
    assert [(item.compression, item.min_level, item.max_level, item.default_level) for item in offered] == [
        (pb.COMPRESSION_ZSTD, -7, 9, 1),
        (pb.COMPRESSION_LZ4, -8, 9, 0),
    ]


def open_error(address: str, request: pb.OpenSession) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel:
        call = pb_grpc.AugmentStub(channel).Stream(iter([pb.ClientMessage(open=request)]), timeout=30)
        with pytest.raises(grpc.RpcError) as caught:
            next(call)
    return caught.value


def test_a_bad_choice_is_invalid_argument_naming_the_field_and_the_server_goes_on(server, uncompressed):
    refused = {
        "open.compression: unknown enum value 17": opening(compression=17),
        "open.compression_level: 12 is outside zstd's levels [-7, 9]": opening(
            compression=pb.COMPRESSION_ZSTD, compression_level=12
        ),
        "open.compression_level: -2 given without a compression": opening(compression_level=-2),
    }
    for expected, request in refused.items():
        error = open_error(server.address, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (expected, error)
        assert error.details().startswith(expected), (expected, error.details())
    assert client_batches(server.address, compression="lz4") == uncompressed


@pytest.fixture
def without_zstandard(monkeypatch):
    """This process (server and client) as if the zstandard package were not installed."""
    real = importlib.import_module

    def import_module(name: str, *args: object) -> object:
        if name.split(".")[0] == "zstandard":
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", import_module)


def test_a_missing_library_is_named_by_server_and_client(server, without_zstandard):
    error = open_error(server.address, opening(compression=pb.COMPRESSION_ZSTD))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        "open.compression: zstd is not available on this server (it lacks the Python package zstandard); "
        "it offers none, lz4"
    )
    with Client(server.address) as client:
        assert [item.compression for item in client.server_info().compressions] == [pb.COMPRESSION_LZ4]
        with pytest.raises(AugserveClientError) as caught:
            client.stream("photos", spec=SPEC, batch_size=BATCH_SIZE, transport="inband", compression="zstd")
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "zstd needs the Python package zstandard, which is not installed" in caught.value.message
    with pytest.raises(ValueError, match="^compression: 'zstandard' is not one of none, zstd, lz4"):
        Client(server.address).stream("photos", compression="zstandard")


def test_members_with_different_codecs_share_one_production(photo_root):
    """A group of three (none, zstd, lz4): each batch produced once, delivered three times,
    each member's bytes equal."""
    with running_server({"photos": DatasetConfig(str(photo_root))}) as server:
        results: dict[str, object] = {}

        def member(name: str) -> None:
            try:
                with Client(server.address) as client, client.stream(
                    "photos", spec=SPEC, batch_size=32, seed=9, epochs=2, transport="inband", group_size=3, compression=name
                ) as stream:
                    results[name] = ([batch.images.tobytes() for batch in stream], stream.facts.shared)
            except BaseException as error:  # noqa: BLE001 - reported below
                results[name] = error

        threads = [threading.Thread(target=member, args=(name,)) for name in ("none", *CODEC_NAMES)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        with Client(server.address) as client:
            info = client.server_info()
    for name, result in results.items():
        assert isinstance(result, tuple), (name, result)
    (plain, shared), *others = (results[name] for name in ("none", *CODEC_NAMES))
    assert len(plain) == 6 and shared  # 96 images, batches of 32, 2 epochs
    assert all(batches == plain and shared for batches, shared in others)
    assert info.batches_produced == 6 and info.batches_delivered == 3 * 6
