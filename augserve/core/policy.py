"""What a stream does with images it cannot use, and the decoded-size limit that guards it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from augserve.core.errors import SpecError

OnBadImage = Literal["skip", "fail"]
# Decoded pixels of one source image above which it is refused (decompression bombs).
DEFAULT_MAX_PIXELS = 40_000_000


@dataclass(frozen=True)
class BadImagePolicy:
    """What to do with an image that cannot be used.

    skip: leave it out of its batch and count it (the batch is then smaller).
    fail: raise `BadImageError` naming the file, which ends the stream.
    """

    on_bad_image: OnBadImage = "skip"
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.on_bad_image not in ("skip", "fail"):
            raise SpecError("on_bad_image", f"expected 'skip' or 'fail', got {self.on_bad_image!r}")
        if not 1 <= self.max_pixels <= 2**31:
            raise SpecError("max_pixels", f"{self.max_pixels} is outside [1, 2**31]")
