"""The small interface every backend implements: execute plans on encoded images."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from augserve.plan import SamplePlan


@dataclass
class AugmentResult:
    """Output of one `Backend.augment` call.

    `images` is [len(kept), H, W, 3] uint8 RGB; `kept[i]` is the input index of `images[i]`;
    `failures` maps the input index of every sample that could not be decoded to the reason.
    """

    images: np.ndarray
    kept: list[int]
    failures: dict[int, str] = field(default_factory=dict)


class Backend(Protocol):
    """Executes plans. Deterministic: the same bytes and plans give the same pixels.

    Every plan in one call has the same `output_size`. Implementations are safe to call from
    one thread at a time; the server serialises calls per backend.
    """

    name: str

    def augment(self, encoded: Sequence[bytes], plans: Sequence[SamplePlan]) -> AugmentResult: ...

    def close(self) -> None: ...


def output_size_of(plans: Sequence[SamplePlan]) -> tuple[int, int]:
    """The shared output size of a batch; a ValueError when plans disagree."""
    sizes = {plan.output_size for plan in plans}
    if len(sizes) != 1:
        raise ValueError(
            f"samples of one batch have different output sizes {sorted(sizes)}; "
            "add a crop or resize to the spec"
        )
    return sizes.pop()
