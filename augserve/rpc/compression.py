"""Per-chunk compression of in-band pixels: the codecs, encoding on the server, decoding on the
client (the contract: `Compression`, `OpenSession.compression` and `Chunk` in the proto).

`CODECS` is the one definition of each codec: its name and wire value, the Python package that
implements it, its levels, and how it encodes and decodes one chunk. The libraries are
optional and imported only when a session asks for their codec, so the client install stays
grpcio, protobuf and numpy; a codec whose library is missing is refused with a message that
names the package to install.

Each chunk is one self-contained frame of its codec (a Zstandard frame, an LZ4 frame; both
carry their content size), so any client written from the .proto decodes it with a stock
library and no state between chunks.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from augserve._proto.augserve.v1 import augserve_pb2 as pb
from augserve.core.errors import SpecError

NONE = "none"
# Encodes one chunk's pixels (a contiguous uint8 view) into one frame of the codec.
Encode = Callable[[memoryview], bytes]
# Decodes one frame into `out`, which it must fill exactly; CorruptChunk otherwise.
DecodeInto = Callable[[bytes, memoryview], None]


class CodecUnavailable(Exception):
    """A codec's library is not installed here; the message names the package."""

    def __init__(self, codec: str, package: str) -> None:
        super().__init__(
            f"{codec} needs the Python package {package}, which is not installed "
            f"(pip install {package}, or augserve[compression])"
        )
        self.codec = codec
        self.package = package


class CorruptChunk(Exception):
    """An encoded chunk that does not decode to its announced length."""


@dataclass(frozen=True)
class Codec:
    """One compression codec. `levels` (inclusive) bound OpenSession.compression_level, whose 0
    means `default_level`; `encoder(library, level)` and `decoder(library)` make the per-session
    functions (the libraries' compressor objects are not shared between threads)."""

    name: str
    wire: int
    package: str  # the PyPI distribution to install
    module: str  # what to import
    levels: tuple[int, int]
    default_level: int
    encoder: Callable[[ModuleType, int], Encode]
    decoder: Callable[[ModuleType], DecodeInto]

    def library(self) -> ModuleType:
        """The codec's module; CodecUnavailable naming the package when it is not installed."""
        try:
            return importlib.import_module(self.module)
        except ImportError:
            raise CodecUnavailable(self.name, self.package) from None

    def available(self) -> bool:
        try:
            self.library()
        except CodecUnavailable:
            return False
        return True


# ---- the codecs ----


def _wrong_length(codec: str, decoded: int, expected: int, longer: bool) -> str:
    got = f"more than {expected}" if longer else str(decoded)
    return f"the {codec} frame decodes to {got} bytes, not decoded_length {expected}"


def _zstd_encoder(zstandard: ModuleType, level: int) -> Encode:
    # One frame per call, with the content size in its header; single-threaded (the server's
    # threads are its producers' and sessions').
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress


def _zstd_decoder(zstandard: ModuleType) -> DecodeInto:
    decompressor = zstandard.ZstdDecompressor()

    def decode_into(data: bytes, out: memoryview) -> None:
        # The stream reader decodes straight into `out`: no intermediate bytes object.
        try:
            reader = decompressor.stream_reader(data, read_across_frames=False)
            filled = 0
            while filled < len(out):
                read = reader.readinto(out[filled:])
                if not read:
                    break
                filled += read
            longer = filled == len(out) and reader.read(1)
        except zstandard.ZstdError as error:
            raise CorruptChunk(f"not a zstd frame ({error})") from None
        if filled != len(out) or longer:
            raise CorruptChunk(_wrong_length("zstd", filled, len(out), bool(longer)))

    return decode_into


def _lz4_encoder(lz4_frame: ModuleType, level: int) -> Encode:
    def encode(pixels: memoryview) -> bytes:
        return lz4_frame.compress(pixels, compression_level=level, store_size=True)

    return encode


def _lz4_decoder(lz4_frame: ModuleType) -> DecodeInto:
    def decode_into(data: bytes, out: memoryview) -> None:
        # lz4 cannot decode into a caller's buffer: one bounded decode, then one copy.
        decompressor = lz4_frame.LZ4FrameDecompressor()
        try:
            decoded = decompressor.decompress(data, max_length=len(out))
        except RuntimeError as error:
            raise CorruptChunk(f"not an lz4 frame ({error})") from None
        if decompressor.unused_data:
            raise CorruptChunk(f"{len(decompressor.unused_data)} bytes after the lz4 frame")
        if len(decoded) != len(out) or not decompressor.eof:
            raise CorruptChunk(_wrong_length("lz4", len(decoded), len(out), len(decoded) == len(out)))
        out[:] = decoded

    return decode_into


CODECS: dict[str, Codec] = {}


def register(codec: Codec) -> None:
    """Add a codec; a second one of the same name or wire value is refused."""
    if codec.name in CODECS or any(known.wire == codec.wire for known in CODECS.values()):
        raise ValueError(f"codec {codec.name} (wire value {codec.wire}) is already registered")
    if not codec.levels[0] <= codec.default_level <= codec.levels[1]:
        raise ValueError(f"codec {codec.name}: default level {codec.default_level} outside {codec.levels}")
    CODECS[codec.name] = codec


# Levels stop where one core still encodes tens of MB/s of photographs (zstd 9: about 20 MB/s,
# lz4-HC 9: about 25): past that a 224×224 batch of 64 costs the server seconds per session.
# zstd's default is 1 rather than the library's 3: on photographs 3 gains a few per cent of
# size for 3–4 times the encoding time.
register(Codec("zstd", pb.COMPRESSION_ZSTD, "zstandard", "zstandard", (-7, 9), 1, _zstd_encoder, _zstd_decoder))
register(Codec("lz4", pb.COMPRESSION_LZ4, "lz4", "lz4.frame", (-8, 9), 0, _lz4_encoder, _lz4_decoder))

COMPRESSION_NAMES = {
    pb.COMPRESSION_UNSPECIFIED: NONE,
    pb.COMPRESSION_NONE: NONE,
    **{codec.wire: codec.name for codec in CODECS.values()},
}
COMPRESSION_VALUES = {NONE: pb.COMPRESSION_NONE, **{codec.name: codec.wire for codec in CODECS.values()}}
CODEC_OF_WIRE = {codec.wire: codec for codec in CODECS.values()}


def available_codecs() -> list[Codec]:
    """The codecs whose library is installed here, by wire value."""
    return sorted((codec for codec in CODECS.values() if codec.available()), key=lambda codec: codec.wire)


def support_to_proto(codec: Codec) -> pb.CompressionSupport:
    low, high = codec.levels
    return pb.CompressionSupport(compression=codec.wire, min_level=low, max_level=high, default_level=codec.default_level)


# ---- a session's choice ----


@dataclass(frozen=True)
class Compression:
    """What a session asked for: `codec` "none" or a CODECS name, at `level` (0: its default)."""

    codec: str = NONE
    level: int = 0

    def __post_init__(self) -> None:
        if self.codec != NONE and self.codec not in CODECS:
            raise SpecError("compression", f"{self.codec!r} is not one of {', '.join(COMPRESSION_VALUES)}")
        if self.codec == NONE:
            if self.level:
                raise SpecError("compression_level", f"{self.level} given without a compression")
            return
        low, high = CODECS[self.codec].levels
        if self.level and not low <= self.level <= high:
            raise SpecError(
                "compression_level",
                f"{self.level} is outside {self.codec}'s levels [{low}, {high}] (0: its default, {CODECS[self.codec].default_level})",
            )

    @property
    def enabled(self) -> bool:
        return self.codec != NONE


class ChunkEncoder:
    """A session's encoder (server side): one per session, used by its one sending thread."""

    def __init__(self, compression: Compression) -> None:
        codec = CODECS[compression.codec]
        self.wire = codec.wire
        self._encode = codec.encoder(codec.library(), compression.level or codec.default_level)

    def encode(self, pixels: memoryview) -> bytes | None:
        """`pixels` (a contiguous uint8 view of the slot) as one frame, or None when the frame
        would not be smaller than `pixels`: the chunk then goes raw."""
        encoded = self._encode(pixels)
        return encoded if len(encoded) < len(pixels) else None


class ChunkDecoder:
    """A stream's decoders (client side), one per codec met, made on first use."""

    def __init__(self) -> None:
        self._decoders: dict[int, DecodeInto] = {}

    def decode_into(self, wire: int, data: bytes, out: memoryview) -> None:
        """Decode a chunk encoded with `wire` into `out`, filling it exactly. CorruptChunk for a
        frame of another length or an unknown codec; CodecUnavailable without its library."""
        decode = self._decoders.get(wire)
        if decode is None:
            codec = CODEC_OF_WIRE.get(wire)
            if codec is None:
                raise CorruptChunk(f"unknown compression {wire}")
            decode = self._decoders[wire] = codec.decoder(codec.library())
        decode(data, out)
