"""In-band compression as plain objects: the codec registry, one chunk encoded and decoded,
raw fallback, corrupt frames, the open message's fields, and a library that is missing. No
sockets or threads."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from augserve._proto.augserve.v1 import augserve_pb2 as pb
from augserve.core.errors import SpecError
from augserve.rpc import compression as compression_module
from augserve.rpc.compression import (
    CODECS,
    ChunkDecoder,
    ChunkEncoder,
    CodecUnavailable,
    Compression,
    CorruptChunk,
    available_codecs,
)
from augserve.rpc.messages import event_messages
from augserve.rpc.requests import parse_compression
from augserve.streaming.session import Delivery

CODEC_NAMES = sorted(CODECS)


def photo_like_pixels(size: int = 1 << 20) -> np.ndarray:
    """Steps with noise on a quarter of the bytes: compressible (to 0.4–0.9 of their size by
    every codec and level), but not trivially."""
    rng = np.random.default_rng(3)
    ramp = (np.arange(size) // 97 % 256).astype(np.int16)
    noise = rng.integers(-6, 7, size)
    noise[rng.random(size) < 0.75] = 0
    return np.clip(ramp + noise, 0, 255).astype(np.uint8)


def level_cases() -> list[tuple[str, int]]:
    return [(name, level) for name in CODEC_NAMES for level in (CODECS[name].levels[0], 0, CODECS[name].levels[1])]


@pytest.mark.parametrize(("name", "level"), level_cases())
def test_a_chunk_decodes_into_place_to_what_was_encoded(name, level):
    pixels = photo_like_pixels()
    encoder = ChunkEncoder(Compression(name, level))
    encoded = encoder.encode(memoryview(pixels))
    assert encoded is not None and len(encoded) < pixels.size
    batch = np.full(pixels.size + 20, 7, np.uint8)
    ChunkDecoder().decode_into(encoder.wire, encoded, memoryview(batch)[10 : 10 + pixels.size])
    assert np.array_equal(batch[10:-10], pixels)
    assert (batch[:10] == 7).all() and (batch[-10:] == 7).all()  # nothing written around it


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_pixels_that_do_not_shrink_go_raw(name):
    noise = np.random.default_rng(0).integers(0, 256, 1 << 18, dtype=np.uint8)
    assert ChunkEncoder(Compression(name)).encode(memoryview(noise)) is None


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_frames_of_the_wrong_length_or_corrupt_are_refused(name):
    pixels = photo_like_pixels(1 << 18)
    encoder = ChunkEncoder(Compression(name))
    encoded = encoder.encode(memoryview(pixels))
    decoder = ChunkDecoder()
    cases = {
        "shorter target": (encoded, pixels.size - 1),
        "longer target": (encoded, pixels.size + 1),
        "truncated frame": (encoded[: len(encoded) // 2], pixels.size),
        "trailing bytes": (encoded + b"\x00\x01", pixels.size),
        "not a frame": (b"not a frame at all" * 4, pixels.size),
    }
    for case, (data, length) in cases.items():
        with pytest.raises(CorruptChunk):
            decoder.decode_into(encoder.wire, data, memoryview(np.empty(length, np.uint8)))
            pytest.fail(case)
    with pytest.raises(CorruptChunk, match="unknown compression 99"):
        decoder.decode_into(99, encoded, memoryview(np.empty(pixels.size, np.uint8)))


def delivery(images: np.ndarray) -> Delivery:
    count = images.shape[0]
    return Delivery(
        sequence=5, epoch=0, position=0, sample_ids=np.arange(count), labels=np.zeros(count, np.int64), skipped=(),
        resume_token=b"token", images=images, slot=0, shm_name="", cuda_ipc_handle=b"", end_of_epoch=False, epoch_skipped=0,
        samples_per_epoch=count, owner=None, owner_sequence=0,
    )  # fmt: skip


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_a_batch_becomes_encoded_chunks_within_the_limit_and_raw_ones_where_they_do_not_shrink(name):
    """Chunk i covers [i * limit, ...) of the raw array; the smooth image's chunks are encoded
    (shorter than raw, decoded_length set), the noise image's go raw (fields unset)."""
    chunk_bytes = 64 << 10
    smooth = photo_like_pixels(3 * 128 * 128 * 3).reshape(3, 128, 128, 3)
    noise = np.random.default_rng(1).integers(0, 256, (2, 128, 128, 3), dtype=np.uint8)
    images = np.concatenate([smooth, noise])
    encoder = ChunkEncoder(Compression(name))
    batch, *chunks = event_messages(delivery(images), chunk_bytes, encoder)
    assert batch.batch.chunks == len(chunks) == -(-images.nbytes // chunk_bytes)
    flat = images.reshape(-1)
    out = np.empty_like(flat)
    kinds = []
    for index, message in enumerate(chunks):
        chunk = message.chunk
        assert chunk.sequence == 5 and chunk.offset == index * chunk_bytes
        raw = flat[chunk.offset : chunk.offset + chunk_bytes]
        if chunk.compression == pb.COMPRESSION_UNSPECIFIED:
            assert chunk.decoded_length == 0 and chunk.data == raw.tobytes()
            kinds.append("raw")
        else:
            assert chunk.compression == CODECS[name].wire and chunk.decoded_length == raw.size
            assert len(chunk.data) < raw.size <= chunk_bytes
            ChunkDecoder().decode_into(chunk.compression, chunk.data, memoryview(out)[chunk.offset : chunk.offset + raw.size])
            assert np.array_equal(out[chunk.offset : chunk.offset + raw.size], raw)
            kinds.append("encoded")
    assert kinds[0] == "encoded" and kinds[-1] == "raw"


def test_without_an_encoder_chunks_are_as_before():
    images = photo_like_pixels(2 * 64 * 64 * 3).reshape(2, 64, 64, 3)
    _, *chunks = event_messages(delivery(images), 64 << 10)
    assert b"".join(message.chunk.data for message in chunks) == images.tobytes()
    assert all(not message.chunk.compression and not message.chunk.decoded_length for message in chunks)


# ---- choosing a compression ----


def test_open_fields_are_checked_and_named():
    assert parse_compression(pb.OpenSession()) == Compression()
    assert parse_compression(pb.OpenSession(compression=pb.COMPRESSION_NONE)) == Compression()
    assert parse_compression(pb.OpenSession(compression=pb.COMPRESSION_ZSTD, compression_level=-3)) == Compression("zstd", -3)
    refused = {
        "open.compression: unknown enum value 42": pb.OpenSession(compression=42),
        "open.compression_level: 10 is outside zstd's levels [-7, 9]": pb.OpenSession(
            compression=pb.COMPRESSION_ZSTD, compression_level=10
        ),
        "open.compression_level: -9 is outside lz4's levels [-8, 9]": pb.OpenSession(
            compression=pb.COMPRESSION_LZ4, compression_level=-9
        ),
        "open.compression_level: 3 given without a compression": pb.OpenSession(compression_level=3),
    }
    for expected, message in refused.items():
        with pytest.raises(SpecError) as caught:
            parse_compression(message)
        assert str(caught.value).startswith(expected), (expected, str(caught.value))


def test_a_client_side_choice_names_the_argument():
    with pytest.raises(ValueError, match=r"^compression: 'gzip' is not one of none, zstd, lz4"):
        Compression("gzip")


def test_the_registry_refuses_a_second_codec_of_a_name_or_wire_value():
    zstd = CODECS["zstd"]
    with pytest.raises(ValueError, match="already registered"):
        compression_module.register(zstd)
    with pytest.raises(ValueError, match="already registered"):
        compression_module.register(compression_module.Codec("other", zstd.wire, "x", "x", (0, 1), 0, zstd.encoder, zstd.decoder))


@pytest.fixture
def without_zstandard(monkeypatch):
    """This process as if the zstandard package were not installed."""
    real = importlib.import_module

    def import_module(name: str, *args: object) -> object:
        if name.split(".")[0] == "zstandard":
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", import_module)


def test_a_missing_library_is_named(without_zstandard):
    with pytest.raises(CodecUnavailable, match="zstd needs the Python package zstandard, which is not installed"):
        CODECS["zstd"].library()
    assert [codec.name for codec in available_codecs()] == ["lz4"]
    with pytest.raises(SpecError) as caught:
        parse_compression(pb.OpenSession(compression=pb.COMPRESSION_ZSTD))
    assert str(caught.value) == (
        "open.compression: zstd is not available on this server (it lacks the Python package zstandard); it offers none, lz4"
    )
    with pytest.raises(CodecUnavailable, match="zstandard"):
        ChunkDecoder().decode_into(pb.COMPRESSION_ZSTD, b"", memoryview(bytearray(1)))
