"""Bad images never kill a producer: each case is skipped and counted, or fails naming the file."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from augserve.core.errors import BadImageError
from augserve.core import images as images_module
from augserve.core.images import HeaderCache, inspect_image
from augserve.core.policy import BadImagePolicy
from helpers import encode, run_images, spec_of

SPEC = spec_of({"rotate": {"degrees": 10}}, {"resize": {"size": 32}})


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb's header)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


def bad_cases(good_jpeg: bytes) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, words the reason must contain)."""
    scan = good_jpeg.rfind(b"\xff\xda")
    noise = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    return {
        "truncated_jpeg": (good_jpeg[: len(good_jpeg) // 2], "truncated JPEG"),
        "zero_bytes": (b"", "empty file"),
        "not_an_image": (b"name,label\ncat.jpg,0\n" * 20, "not a recognised image format"),
        "bomb_header": (png_declaring(100_000, 100_000), "pixel limit"),
        "corrupt_scan_data": (good_jpeg[: scan + 20] + noise + b"\xff\xd9", "corrupt JPEG"),
        "random_bytes_behind_magic": (b"\xff\xd8\xff\xe0" + noise, "unreadable image header"),
    }


CASES = ["truncated_jpeg", "zero_bytes", "not_an_image", "bomb_header", "corrupt_scan_data", "random_bytes_behind_magic"]


@pytest.fixture(scope="module")
def good_images(synthetic_images) -> list[bytes]:
    return [encode(synthetic_images["pattern_64x64"], ".jpg"), encode(synthetic_images["pattern_97x131"], ".jpg")]


@pytest.mark.parametrize("case", CASES)
def test_skip_policy_drops_and_counts(backend, good_images, case):
    data, words = bad_cases(good_images[0])[case]
    batch = run_images(backend, SPEC, [good_images[0], data, good_images[1]], policy=BadImagePolicy("skip"))
    assert list(batch.sample_ids) == [0, 2]
    assert batch.images.shape == (2, 32, 32, 3)
    assert [(item.sample_id, item.source) for item in batch.skipped] == [(1, "image-1")]
    assert words in batch.skipped[0].reason
    # The producer keeps working: the next batch is complete.
    assert run_images(backend, SPEC, good_images, first_id=3).images.shape == (2, 32, 32, 3)


@pytest.mark.parametrize("case", CASES)
def test_fail_policy_names_the_file(backend, good_images, case):
    data, words = bad_cases(good_images[0])[case]
    with pytest.raises(BadImageError) as caught:
        run_images(backend, SPEC, [good_images[0], data], policy=BadImagePolicy("fail"))
    assert caught.value.source == "image-1" and words in caught.value.reason
    assert run_images(backend, SPEC, good_images, first_id=3).images.shape == (2, 32, 32, 3)


def test_pixel_limit_is_configurable(backend, good_images):
    policy = BadImagePolicy("skip", max_pixels=64 * 64)
    batch = run_images(backend, SPEC, good_images, policy=policy)
    assert list(batch.sample_ids) == [0]
    assert "over the pixel limit of 4096" in batch.skipped[0].reason


def test_all_bad_gives_an_empty_batch(backend):
    batch = run_images(backend, SPEC, [b"", b"junk"], policy=BadImagePolicy("skip"))
    assert batch.images.shape == (0, 32, 32, 3) and len(batch.skipped) == 2


def test_damage_the_jpeg_library_recovers_from_is_decoded_alike(opencv_backend, dali_backend, good_images):
    """Entropy data cut short and padded (no stray markers): libjpeg warns and both backends
    decode the same recovered picture."""
    good = good_images[1]
    scan = good.rfind(b"\xff\xda")
    noise = np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes().replace(b"\xff", b"\x00")
    damaged = good[: scan + 40] + noise + b"\xff\xd9"
    expected = run_images(opencv_backend, SPEC, [damaged])
    actual = run_images(dali_backend, SPEC, [damaged])
    assert expected.images.shape == actual.images.shape == (1, 32, 32, 3)
    assert np.abs(expected.images.astype(int) - actual.images).max() <= 2


def test_header_cache_checks_a_file_once_and_rechecks_when_it_changes(good_images):
    cache = HeaderCache()
    calls = []
    original = images_module.inspect_image

    def counting(data, source, max_pixels):
        calls.append(source)
        return original(data, source, max_pixels)

    images_module.inspect_image = counting
    try:
        for _ in range(3):
            assert cache.inspect(good_images[0], "a.jpg", (100, 1), 10**6).width == 64
            with pytest.raises(BadImageError, match="empty file"):
                cache.inspect(b"", "b.jpg", (0, 1), 10**6)
        assert calls == ["a.jpg", "b.jpg"]
        cache.inspect(good_images[0], "a.jpg", (100, 2), 10**6)  # modified: checked again
        cache.inspect(good_images[0], "a.jpg", None, 10**6)  # no identity: always checked
        assert calls == ["a.jpg", "b.jpg", "a.jpg", "a.jpg"]
    finally:
        images_module.inspect_image = original
