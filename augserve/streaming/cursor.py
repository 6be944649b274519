"""Cursor maths: where a stream is, as (epoch, position in the epoch's shard order).

Pure functions of the shard size, batch size and drop_last; no state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Cursor = tuple[int, int]  # (epoch, position of the next sample in that epoch's shard order)


def shard_samples(total: int, shard_index: int, shard_count: int) -> int:
    """Samples of shard `shard_index` of `shard_count` (round-robin) over `total` samples."""
    return len(range(shard_index, total, shard_count))


@dataclass(frozen=True)
class EpochLayout:
    """How one epoch of a shard divides into batches."""

    samples_per_epoch: int
    batch_size: int
    drop_last: bool

    @property
    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return self.samples_per_epoch // self.batch_size
        return math.ceil(self.samples_per_epoch / self.batch_size)

    def next_cursor(self, cursor: Cursor) -> Cursor:
        """The cursor after the batch that starts at `cursor`."""
        epoch, position = cursor
        following = position + self.batch_size
        if following >= self.samples_per_epoch or (
            self.drop_last and following + self.batch_size > self.samples_per_epoch
        ):
            return (epoch + 1, 0)
        return (epoch, following)
