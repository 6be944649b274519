"""A bounded cache of decoded images, keyed by the encoded bytes themselves.

Decoding is a function of the file's bytes alone (`[H, W, 3] uint8 RGB as stored`: the EXIF
orientation, the warp and the colours come later, from each sample's plan), so a decoded image
can stand in for any later decode of the same bytes: in a later epoch, or for another
experiment reading the same dataset. The key is the bytes' length and SHA-1 digest, not the
file's name or modification time: a file rewritten in place with other bytes (even keeping
its size and mtime) misses, so what a session receives never depends on what is cached.

Least recently used entries go first once `max_bytes` would be passed. With a dataset that
fits, later epochs decode nothing; with one that does not, hits are about the fraction that
fits (epochs visit samples in a new order each time) and each miss costs a digest and a lock.
`max_bytes=0` turns caching off. Cached arrays are read-only: every reader shares one.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

ContentKey = tuple[int, bytes]  # (byte length, SHA-1 digest) of an encoded image


def content_key(data: bytes) -> ContentKey:
    """What identifies an encoded image's decode: its length and SHA-1 digest (hashlib lets
    go of the GIL for buffers this size, so pool threads digest in parallel)."""
    return (len(data), hashlib.sha1(data, usedforsecurity=False).digest())


@dataclass(frozen=True)
class CacheStats:
    bytes: int  # decoded pixels held now
    max_bytes: int
    entries: int
    hits: int  # lookups that found their image
    misses: int  # lookups that did not (the image was then decoded)
    evictions: int  # entries dropped to make room

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


class DecodedCache:
    """Decoded images by `content_key`, at most `max_bytes` of pixels; thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes: {max_bytes} is below 0")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._images: OrderedDict[ContentKey, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, key: ContentKey) -> np.ndarray | None:
        with self._lock:
            image = self._images.get(key)
            if image is None:
                self._misses += 1
                return None
            self._images.move_to_end(key)
            self._hits += 1
            return image

    def put(self, key: ContentKey, image: np.ndarray) -> None:
        """Keep `image` (made read-only) unless it alone is over the budget."""
        size = image.nbytes
        if size > self.max_bytes:
            return
        image.flags.writeable = False
        with self._lock:
            if key in self._images:
                self._images.move_to_end(key)
                return
            while self._bytes + size > self.max_bytes:
                _, dropped = self._images.popitem(last=False)
                self._bytes -= dropped.nbytes
                self._evictions += 1
            self._images[key] = image
            self._bytes += size

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._bytes, self.max_bytes, len(self._images), self._hits, self._misses, self._evictions)
