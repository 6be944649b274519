"""Which ring slot holds which batch, and who still needs it.

A producer writes each batch once into a slot. Every member that will be sent the batch holds a
reference to it; at no references the batch stays readable (a member that joins a little late
can still take it) until its slot is needed for a new batch. A plain object: the producer's
condition guards it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from augserve.core.targets import SampleTargets
from augserve.streaming.cursor import Cursor


@dataclass
class ProducedBatch:
    """A batch in a slot: its place in the producer's sequence and the stream's order."""

    sequence: int
    epoch: int
    position: int
    slot: int
    sample_ids: np.ndarray  # [N] int64
    labels: np.ndarray  # [N] int64
    skipped: list[str]  # "relative/path: reason" for each image left out
    next_cursor: Cursor
    end_of_epoch: bool
    epoch_skipped: int  # images skipped so far in this batch's epoch
    produced_at: float  # time.monotonic() when it was made
    references: int = 0
    targets: list[SampleTargets] | None = None  # per image, with boxes asked for

    @property
    def cursor(self) -> Cursor:
        return (self.epoch, self.position)


class SlotTable:
    """`slot_count` slots; batches by sequence number, with their reference counts."""

    def __init__(self, slot_count: int) -> None:
        self.slot_count = slot_count
        self._free = list(range(slot_count))
        self.batches: dict[int, ProducedBatch] = {}

    def has_slot(self) -> bool:
        return bool(self._free) or any(batch.references == 0 for batch in self.batches.values())

    def take_slot(self) -> int:
        """A free slot, else the slot of the oldest batch nobody references any more."""
        if self._free:
            return self._free.pop(0)
        oldest = min(sequence for sequence, batch in self.batches.items() if batch.references == 0)
        return self.batches.pop(oldest).slot

    def give_back(self, slot: int) -> None:
        """A slot taken for a batch that was never made."""
        self._free.append(slot)

    def add(self, batch: ProducedBatch) -> None:
        self.batches[batch.sequence] = batch

    def get(self, sequence: int) -> ProducedBatch | None:
        return self.batches.get(sequence)

    def reference(self, sequence: int) -> None:
        self.batches[sequence].references += 1

    def release(self, sequence: int) -> None:
        """One reference fewer (a batch already evicted or never referenced is ignored)."""
        batch = self.batches.get(sequence)
        if batch is not None and batch.references > 0:
            batch.references -= 1

    def oldest(self) -> int | None:
        return min(self.batches, default=None)

    def sequence_at(self, cursor: Cursor) -> int | None:
        """The sequence of the buffered batch that starts at `cursor`, if any."""
        for sequence, batch in self.batches.items():
            if batch.cursor == cursor:
                return sequence
        return None
