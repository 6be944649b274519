"""Hostile images, generated here: truncated JPEG, random bytes behind a JPEG magic, PNG headers
declaring absurd sizes, 1x1 pictures, 16-bit PNG, CMYK JPEG, grayscale, RGBA, EXIF-rotated
JPEG, animated GIF and WebP, and more. Each has a stated expected outcome, checked on both
backends (OpenCV, DALI on the CPU) under both policies:

- decoded: the batch holds the picture, upright (EXIF applied), as RGB without alpha, within
  the stated tolerance of a PIL reference, and the two backends agree;
- bad: `skip` leaves it out of its batch with a reason containing the stated words and keeps
  its neighbours; `fail` raises BadImageError naming the file.

Then the same files are served from a dataset folder by a live server on each backend, while
a control client keeps streaming verified batches; neither the server nor the control notices.
Extreme but valid specs close the file. Disagreements and bugs this found have regression
tests (fixed in 567a748).
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from augserve.backends.base import Backend
from augserve.client import AugserveClientError, Client
from augserve.core.errors import BadImageError
from augserve.core.policy import BadImagePolicy
from augserve.rpc.server import DatasetConfig
from augserve.core.spec import AugmentSpec
from helpers import encode, run_images, spec_of
from reliability_helpers import LONG_MODE, VerifyingControlClient, record_figures, scaled, write_png_dataset
from servers import own_segments, running_server, wait_until
from test_bad_images import png_declaring

IDENTITY = spec_of()
RESIZE = spec_of({"resize": {"size": 24}})


def picture(height: int = 48, width: int = 64) -> np.ndarray:
    """A smooth RGB gradient, [height, width, 3] uint8, distinct in every channel."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) * 2 % 256], axis=-1).astype(np.uint8)


def pil_encode(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def pil_upright(data: bytes) -> np.ndarray:
    """What a viewer shows: PIL's decode with the EXIF orientation applied, as RGB."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


@dataclass(frozen=True)
class Hostile:
    """One hostile image and its expected outcome: `reference` (the upright RGB picture, with
    `tolerance` in gray levels) when it decodes, else `reason` (words the skip reason and the
    BadImageError must contain)."""

    data: bytes
    extension: str
    reference: np.ndarray | None = None
    tolerance: int = 0
    reason: str = ""
    decoded_shape: tuple[int, int, int] | None = None  # decodes, to content no decoder promises

    @property
    def decodes(self) -> bool:
        return self.reference is not None or self.decoded_shape is not None


def png16(rgb: np.ndarray) -> bytes:
    """A 16-bit PNG whose high bytes are `rgb` and whose low bytes are not zero (so that
    rounding and truncation to 8 bits may differ by one)."""
    wide = np.minimum(rgb.astype(np.uint32) * 256 + 100, 65535).astype(np.uint16)
    return cv2.imencode(".png", cv2.cvtColor(wide, cv2.COLOR_RGB2BGR))[1].tobytes()


def exif_jpeg(orientation: int, quality: int = 95) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return pil_encode(Image.fromarray(picture()), "JPEG", quality=quality, exif=exif.tobytes())


def jpeg_with_app1(payload: bytes) -> bytes:
    """A JPEG whose first segment is an APP1 block holding `payload`."""
    jpeg = encode(picture(), ".jpg")
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", 2 + len(payload)) + payload + jpeg[2:]


def jpeg_declaring(height: int, width: int) -> bytes:
    """A small JPEG whose frame header claims height x width (its scan is far too short)."""
    jpeg = encode(picture(), ".jpg")
    start = jpeg.find(b"\xff\xc0")
    return jpeg[: start + 5] + struct.pack(">HH", height, width) + jpeg[start + 9 :]


def build_hostile() -> dict[str, Hostile]:
    rng = np.random.default_rng(11)
    noise = rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()
    rgb = picture()
    big_jpeg = encode(picture(192, 256), ".jpg")
    one = np.array([[[200, 100, 50]]], np.uint8)
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    frames = [Image.fromarray(np.roll(rgb, 7 * index, axis=1)) for index in range(3)]
    gray_jpeg = pil_encode(Image.fromarray(gray), "JPEG", quality=95)
    cases = {
        "truncated_jpeg": Hostile(big_jpeg[: len(big_jpeg) * 6 // 10], ".jpg", reason="truncated JPEG"),
        "truncated_jpeg_header": Hostile(big_jpeg[:120], ".jpg", reason="unreadable image header"),
        "random_bytes_behind_jpeg_magic": Hostile(b"\xff\xd8\xff" + noise, ".jpg", reason="not a recognised image format"),
        "png_declaring_2^31_square": Hostile(png_declaring(2**31 - 1, 2**31 - 1), ".png", reason="over the pixel limit"),
        "png_declaring_2^32_square": Hostile(png_declaring(2**32 - 1, 2**32 - 1), ".png", reason="over the pixel limit"),
        "png_declaring_1x2^31": Hostile(png_declaring(1, 2**31 - 1), ".png", reason="over the pixel limit"),
        "png_declaring_0x0": Hostile(png_declaring(0, 0), ".png", reason="not a recognised image format"),
        "png_declaring_6000x6000_without_data": Hostile(png_declaring(6000, 6000), ".png", reason="could not be decoded"),
        "1x1_png": Hostile(encode(one), ".png", one),
        "1x1_jpeg": Hostile(encode(one, ".jpg"), ".jpg", pil_upright(encode(one, ".jpg")), tolerance=2),
        "16bit_png": Hostile(png16(rgb), ".png", rgb, tolerance=1),
        "16bit_gray_png": Hostile(cv2.imencode(".png", gray.astype(np.uint16) * 257)[1].tobytes(), ".png", np.repeat(gray[..., None], 3, axis=2)),
        "cmyk_jpeg": Hostile(pil_encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=100), ".jpg", rgb, tolerance=2),
        "grayscale_jpeg": Hostile(gray_jpeg, ".jpg", pil_upright(gray_jpeg), tolerance=2),
        "grayscale_png": Hostile(pil_encode(Image.fromarray(gray), "PNG"), ".png", np.repeat(gray[..., None], 3, axis=2)),
        "rgba_png": Hostile(pil_encode(Image.fromarray(np.dstack([rgb, rgb[..., :1] // 3])), "PNG"), ".png", rgb),
        "palette_png": Hostile(pil_encode(Image.fromarray(rgb).convert("P"), "PNG"), ".png", np.asarray(Image.fromarray(rgb).convert("P").convert("RGB"))),
        "rgba_webp": Hostile(pil_encode(Image.fromarray(np.dstack([rgb, rgb[..., :1]])), "WEBP", lossless=True, exact=True), ".webp", rgb),
        "exif_invalid_orientation_jpeg": Hostile(exif_jpeg(9, 100), ".jpg", pil_upright(exif_jpeg(1, 100)), tolerance=3),
        # Under the pixel limit: libjpeg pads the missing scan (a warning), so it decodes, mostly gray.
        "jpeg_declaring_3000x3000_over_a_tiny_scan": Hostile(jpeg_declaring(3000, 3000), ".jpg", decoded_shape=(3000, 3000, 3)),
        "jpeg_with_garbage_exif": Hostile(jpeg_with_app1(b"Exif\0\0" + noise[:40]), ".jpg", pil_upright(encode(rgb, ".jpg")), tolerance=3),
        "animated_gif": Hostile(pil_encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0), ".jpg", reason="unsupported format GIF"),
        "animated_webp": Hostile(pil_encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50, loop=0), ".webp", reason="animated WEBP with 3 frames"),
        "multipage_tiff": Hostile(pil_encode(frames[0], "TIFF", save_all=True, append_images=frames[1:]), ".tif", reason="animated TIFF with 3 frames"),
        "ppm_named_jpeg": Hostile(pil_encode(Image.fromarray(rgb), "PPM"), ".jpg", reason="unsupported format PPM"),
        "jpeg_with_trailing_garbage": Hostile(encode(rgb, ".jpg") + noise[:500], ".jpg", reason="corrupt JPEG"),
    }
    for orientation in range(2, 9):
        data = exif_jpeg(orientation, 100)
        cases[f"exif_orientation_{orientation}_jpeg"] = Hostile(data, ".jpg", pil_upright(data), tolerance=3)
    return cases


HOSTILE = build_hostile()
GOOD = [encode(picture(40, 40), ".png"), encode(picture(30, 50), ".png")]


@pytest.fixture(scope="module")
def tally():
    counts = {"hostile_cases": len(HOSTILE), "augment_batch_runs": 0, "images_tried": 0, "decoded": 0, "rejected": 0}
    yield counts
    record_figures("images", **counts)


def count(tally: dict, images: int, decoded: int, rejected: int) -> None:
    tally["augment_batch_runs"] += 1
    tally["images_tried"] += images
    tally["decoded"] += decoded
    tally["rejected"] += rejected


# ---- through augment_batch, both backends, both policies ----


@pytest.mark.parametrize("policy", ["skip", "fail"])
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_image_alone_is_handled_per_policy(backend, tally, name, policy):
    case = HOSTILE[name]
    if case.decodes:
        batch = run_images(backend, IDENTITY, [case.data], policy=BadImagePolicy(policy))
        count(tally, 1, len(batch.images), len(batch.skipped))
        assert not batch.skipped, batch.skipped
        if case.reference is None:
            assert batch.images.shape == (1, *case.decoded_shape)
        else:
            assert batch.images.shape == (1, *case.reference.shape)
            assert np.abs(batch.images[0].astype(int) - case.reference).max() <= case.tolerance
    elif policy == "skip":
        batch = run_images(backend, IDENTITY, [case.data], policy=BadImagePolicy(policy))
        count(tally, 1, len(batch.images), len(batch.skipped))
        assert len(batch.images) == 0 and len(batch.skipped) == 1
        assert case.reason in batch.skipped[0].reason, batch.skipped[0].reason
    else:
        with pytest.raises(BadImageError) as caught:
            run_images(backend, IDENTITY, [case.data], policy=BadImagePolicy(policy))
        count(tally, 1, 0, 1)
        assert caught.value.source == "image-0" and case.reason in caught.value.reason, caught.value.reason


@pytest.mark.parametrize("policy", ["skip", "fail"])
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_image_among_good_ones_leaves_them_intact(backend, tally, name, policy):
    """In a batch between two good images (resized, so sizes may differ): the good ones come
    out exactly as in a batch without the hostile one."""
    case = HOSTILE[name]
    expected = run_images(backend, RESIZE, GOOD, first_id=10).images
    sources = [GOOD[0], case.data, GOOD[1]]
    if case.decodes or policy == "skip":
        batch = run_images(backend, RESIZE, sources, first_id=9, policy=BadImagePolicy(policy))
        count(tally, 3, len(batch.images), len(batch.skipped))
        kept = [9, 10, 11] if case.decodes else [9, 11]
        assert list(batch.sample_ids) == kept, batch.skipped
        assert batch.images[0].tobytes() == expected[0].tobytes() and batch.images[-1].tobytes() == expected[1].tobytes()
    else:
        with pytest.raises(BadImageError) as caught:
            run_images(backend, RESIZE, sources, first_id=9, policy=BadImagePolicy(policy))
        count(tally, 3, 0, 1)
        assert caught.value.source == "image-10"
    # The backend carries on: the next batch is whole.
    assert run_images(backend, RESIZE, GOOD, first_id=10).images.tobytes() == expected.tobytes()


@pytest.mark.parametrize("name", sorted(name for name, case in HOSTILE.items() if case.decodes))
def test_backends_agree_on_decodable_hostile_images(opencv_backend, dali_backend, name):
    expected = run_images(opencv_backend, RESIZE, [HOSTILE[name].data]).images
    actual = run_images(dali_backend, RESIZE, [HOSTILE[name].data]).images
    assert expected.shape == actual.shape == (1, 24, 24, 3)
    assert np.abs(expected.astype(int) - actual).max() <= 2


# ---- regressions: disagreements and bugs this found (fixed in 567a748) ----

def jpeg_with_bytes_between_segments() -> bytes:
    """Two zero bytes between the APP0 segment and the next marker: libjpeg skips them with a
    warning ("extraneous bytes before marker"), DALI's parser stops at an invalid marker."""
    jpeg = encode(picture(), ".jpg")
    app0_end = 4 + int.from_bytes(jpeg[4:6], "big")
    return jpeg[:app0_end] + b"\0\0" + jpeg[app0_end:]


# Files one decoder accepted and the other did not, before inspect_image refused them.
DISAGREEMENTS = {
    # OpenCV: "could not be decoded"; DALI decoded a white picture (floats clamped to 255).
    "float32_tiff": pil_encode(Image.fromarray(np.asarray(Image.fromarray(picture()).convert("L")).astype(np.float32)), "TIFF"),
    # OpenCV decoded it; DALI's TIFF parser wants the BitsPerSample tag PIL leaves out (its
    # default, 1, is the TIFF standard's).
    "bilevel_tiff": pil_encode(Image.fromarray(picture()[..., 0] > 128), "TIFF"),
    # OpenCV decoded it, DALI rejected it: about one in three one-byte edits before the scan
    # (inserted, deleted or changed) did this.
    "jpeg_with_bytes_between_header_segments": jpeg_with_bytes_between_segments(),
}


def verdict(backend: Backend, data: bytes) -> np.ndarray | str:
    batch = run_images(backend, RESIZE, [data])
    return batch.images[0] if len(batch.images) else "skipped"


@pytest.mark.parametrize("name", sorted(DISAGREEMENTS))
def test_backends_give_one_verdict_on_files_only_one_decoder_accepts(opencv_backend, dali_backend, name):
    """Was: a file skipped on one backend and served on the other."""
    expected, actual = verdict(opencv_backend, DISAGREEMENTS[name]), verdict(dali_backend, DISAGREEMENTS[name])
    if isinstance(expected, str) or isinstance(actual, str):
        assert isinstance(expected, str) and isinstance(actual, str), (expected if isinstance(expected, str) else "decoded",
                                                                        actual if isinstance(actual, str) else "decoded")
    else:
        assert np.abs(expected.astype(int) - actual).max() <= 2


def test_dali_skip_reason_says_what_failed(dali_backend):
    """Was: DaliBackend._short_reason kept the last line of DALI's error, 'Current pipeline
    object is no longer valid.', and dropped the one saying what failed."""
    batch = run_images(dali_backend, RESIZE, [HOSTILE["png_declaring_6000x6000_without_data"].data])
    assert len(batch.skipped) == 1
    assert "no longer valid" not in batch.skipped[0].reason, batch.skipped[0].reason


@pytest.mark.filterwarnings("error")
def test_a_jpeg_with_a_corrupt_exif_directory_decodes_as_stored(backend):
    """Was: a warning PIL emits on damaged EXIF became a rejection where warnings are errors, so
    the verdict depended on the process's warning filters."""
    # An EXIF block whose first directory offset points past its end: PIL warns "Corrupt EXIF data".
    data = jpeg_with_app1(b"Exif\0\0" + b"II*\0" + struct.pack("<I", 0xFFFFFF00) + b"\0" * 8)
    batch = run_images(backend, IDENTITY, [data])
    assert not batch.skipped, batch.skipped[0].reason
    assert np.abs(batch.images[0].astype(int) - pil_upright(encode(picture(), ".jpg"))).max() <= 3


# ---- mutated files (hypothesis) ----

MUTATION_BASES = {
    "jpeg": encode(picture(), ".jpg"),
    "progressive_jpeg": pil_encode(Image.fromarray(picture()), "JPEG", progressive=True),
    "png": encode(picture(), ".png"),
    "webp": pil_encode(Image.fromarray(picture()), "WEBP", quality=80),
    "tiff": pil_encode(Image.fromarray(picture()), "TIFF", compression="tiff_lzw"),
    "bmp": pil_encode(Image.fromarray(picture()), "BMP"),
}
edits = st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255), st.sampled_from(["set", "insert", "delete"])), min_size=1, max_size=6)


def mutate(data: bytes, changes: list[tuple[float, int, str]], cut: float | None) -> bytes:
    mutable = bytearray(data)
    for where, value, kind in changes:
        index = min(int(where * len(mutable)), len(mutable) - 1)
        if kind == "set":
            mutable[index] = value
        elif kind == "insert":
            mutable.insert(index, value)
        elif len(mutable) > 1:
            del mutable[index]
    return bytes(mutable if cut is None else mutable[: max(1, int(cut * len(mutable)))])


@pytest.fixture(scope="module")
def mutation_tally():
    counts = {"examples": 0, "decoded_by_both": 0, "rejected_by_both": 0, "verdicts_differ": 0}
    yield counts
    record_figures("mutated_images", **counts)


@settings(deadline=None, max_examples=int(scaled(100, 2000)), derandomize=not LONG_MODE, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(base=st.sampled_from(sorted(MUTATION_BASES)), changes=edits, cut=st.one_of(st.none(), st.floats(0, 1)))
def test_mutated_files_get_a_verdict_on_both_backends(opencv_backend, dali_backend, mutation_tally, base, changes, cut):
    """Random edits of valid files: each backend decodes to the right shape or skips with a
    reason (skip), or raises BadImageError naming the file (fail); nothing else escapes, and the
    backend carries on. How often the two backends' verdicts differ is counted (see
    test_backends_give_one_verdict_on_files_only_one_decoder_accepts)."""
    data = mutate(MUTATION_BASES[base], changes, cut)
    verdicts = []
    for backend in (opencv_backend, dali_backend):
        batch = run_images(backend, RESIZE, [GOOD[0], data], policy=BadImagePolicy("skip"))
        assert batch.images.shape[1:] == (24, 24, 3) and batch.sample_ids[0] == 0
        assert len(batch.images) + len(batch.skipped) == 2
        assert all(item.reason.strip() and "Traceback" not in item.reason for item in batch.skipped)
        verdicts.append(len(batch.images) == 2)
        try:
            failing = run_images(backend, RESIZE, [data], policy=BadImagePolicy("fail"))
            assert len(failing.images) == 1
        except BadImageError as error:
            assert error.source == "image-0" and error.reason.strip()
    mutation_tally["examples"] += 1
    key = "decoded_by_both" if all(verdicts) else "rejected_by_both" if not any(verdicts) else "verdicts_differ"
    mutation_tally[key] += 1


# ---- through a live server, each backend ----


def write_hostile_dataset(root: Path) -> tuple[set[str], set[str]]:
    """An ImageFolder tree with every hostile file and a few good ones; (decodable file names,
    bad file names)."""
    decodable, bad = set(), set()
    for index, (name, case) in enumerate(sorted(HOSTILE.items())):
        folder = root / f"class{index % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        file_name = f"{name}{case.extension}"
        (folder / file_name).write_bytes(case.data)
        (decodable if case.decodes else bad).add(file_name)
    for index, data in enumerate(GOOD * 3):
        file_name = f"good{index}.png"
        (root / f"class{index % 3}" / file_name).write_bytes(data)
        decodable.add(file_name)
    return decodable, bad


@pytest.mark.parametrize("backend_name", ["opencv", "dali-cpu"])
def test_a_server_serves_a_folder_of_hostile_images_per_policy(tmp_path, tally, backend_name):
    decodable, bad = write_hostile_dataset(tmp_path / "hostile")
    control_root = write_png_dataset(tmp_path / "control")
    datasets = {"hostile": DatasetConfig(str(tmp_path / "hostile")), "control": DatasetConfig(str(control_root))}
    with running_server(datasets, backend=backend_name) as server, Client(server.address, timeout=120) as client:
        control = VerifyingControlClient(server.address, "control", control_root)
        try:
            control.check()
            paths = {}
            # skip: one epoch delivers exactly the decodable files and names every bad one.
            with client.stream("hostile", spec=RESIZE, batch_size=8, epochs=1, seed=3, on_bad_image="skip",
                               transport="shared_memory") as stream:
                names = [client_path.name for client_path in sorted((tmp_path / "hostile").glob("*/*"))]
                delivered, skipped = set(), set()
                for batch in stream:
                    assert batch.images.shape == (len(batch.sample_ids), 24, 24, 3)
                    delivered |= {names[sample_id] for sample_id in batch.sample_ids.tolist()}
                    for entry in batch.skipped:
                        path, _, reason = entry.partition(": ")
                        assert reason and "Traceback" not in reason, entry
                        skipped.add(Path(path).name)
                        paths[Path(path).name] = path
                assert delivered == decodable and skipped == bad
                assert [summary.skipped for summary in stream.epochs] == [len(bad)]
            count(tally, len(names), len(delivered), len(skipped))
            # fail: the stream ends with DATA_LOSS naming the first bad file it meets.
            with pytest.raises(AugserveClientError) as caught:
                with client.stream("hostile", spec=RESIZE, batch_size=8, epochs=1, seed=3, on_bad_image="fail",
                                   transport="inband") as stream:
                    for _ in stream:
                        pass
            assert caught.value.code == grpc.StatusCode.DATA_LOSS
            assert any(caught.value.message.startswith(path + ": ") for path in paths.values()), caught.value.message
            count(tally, 1, 0, 1)
            # The server keeps serving: a new session of the same folder works, the control never stopped.
            with client.stream("hostile", spec=RESIZE, batch_size=4, epochs=1, seed=4) as stream:
                assert sum(len(batch.sample_ids) for batch in stream) == len(decodable)
            control.check(since=control.batches)
        finally:
            control.finish()
        assert wait_until(lambda: client.server_info().live_sessions == 0 and not own_segments())
    record_figures(f"images_server_{backend_name}", files=len(names), delivered=len(delivered), skipped=len(skipped),
                   control_batches_verified=control.batches)


# ---- extreme but valid specs, both backends ----

EXTREME_SPECS = {
    "32 zooms in": AugmentSpec.from_dict({"ops": [{"zoom": {"range": [20, 20]}}] * 32}),
    "31 shears and a resize": AugmentSpec.from_dict({"ops": [{"shear": {"degrees": [80, 80]}}] * 31 + [{"resize": {"size": 8}}]}),
    "an empty crop window": AugmentSpec.from_dict({"ops": [{"random_resized_crop": {"size": 8, "scale": [0, 0]}}]}),
    "a 1x8192 output": AugmentSpec.from_dict({"ops": [{"resize": {"size": [1, 8192], "interpolation": "nearest"}}]}),
    "erase everything": AugmentSpec.from_dict({"ops": [{"resize": {"size": 16}}, {"cutout": {"p": 1, "size": 16, "holes": 8}}]}),
}


def augment_picture(backend: Backend, spec: AugmentSpec) -> np.ndarray:
    batch = run_images(backend, spec, [encode(picture())])
    assert not batch.skipped, batch.skipped
    return batch.images


@pytest.mark.parametrize("name", list(EXTREME_SPECS))
def test_extreme_valid_specs_agree_on_both_backends(opencv_backend, dali_backend, name):
    expected = augment_picture(opencv_backend, EXTREME_SPECS[name])
    actual = augment_picture(dali_backend, EXTREME_SPECS[name])
    assert expected.shape == actual.shape
    assert np.abs(expected.astype(int) - actual).mean() <= 1.0


@pytest.mark.filterwarnings("error")
def test_a_warp_beyond_float32_is_no_overflow_on_dali(opencv_backend, dali_backend):
    """Was: dali_warp_matrix cast coefficients beyond float32 to inf (a RuntimeWarning; with
    warnings as errors every sample was skipped)."""
    spec = AugmentSpec.from_dict({"ops": [{"zoom": {"range": [0.05, 0.05]}}] * 32})
    assert augment_picture(opencv_backend, spec).tobytes() == augment_picture(dali_backend, spec).tobytes()
