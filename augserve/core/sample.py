"""A sample as it enters augmentation (encoded bytes) and as it leaves when it cannot be used."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourceImage:
    """An encoded image and what identifies it: `source` names it in errors (its path);
    `identity` (byte size, modification time in ns, device, inode) lets a `HeaderCache`
    remember its check."""

    sample_id: int
    label: int
    source: str
    data: bytes
    identity: tuple[int, ...] | None = None


@dataclass(frozen=True)
class SkippedImage:
    sample_id: int
    source: str
    reason: str
