"""The small interface every backend implements: execute plans on encoded images."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from augserve.core.plan import SamplePlan


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

    Every plan in one call has the same `output_size`. With `out` ([len(plans), H, W, 3] uint8)
    the images are written there and `AugmentResult.images` is `out[:len(kept)]`.
    """

    name: str

    def augment(
        self, encoded: Sequence[bytes], plans: Sequence[SamplePlan], out: np.ndarray | None = None
    ) -> AugmentResult: ...

    def close(self) -> None: ...


def compact(images: np.ndarray, kept: list[int]) -> np.ndarray:
    """Move the kept rows (ascending indices) to the front in place; return that prefix."""
    for index, source in enumerate(kept):
        if index != source:
            images[index] = images[source]
    return images[: len(kept)]


def output_array(plans: Sequence[SamplePlan], out: np.ndarray | None) -> np.ndarray:
    """`out`, checked against the plans, or a new [N, H, W, 3] uint8 array."""
    out_h, out_w = output_size_of(plans)
    shape = (len(plans), out_h, out_w, 3)
    if out is None:
        return np.empty(shape, np.uint8)
    if out.shape != shape or out.dtype != np.uint8:
        raise ValueError(f"out has shape {out.shape} {out.dtype}, expected {shape} uint8")
    return out


def output_size_of(plans: Sequence[SamplePlan]) -> tuple[int, int]:
    """The shared output size of a batch; a ValueError when plans disagree."""
    sizes = {plan.output_size for plan in plans}
    if len(sizes) != 1:
        raise ValueError(
            f"samples of one batch have different output sizes {sorted(sizes)}; "
            "add a crop or resize to the spec"
        )
    return sizes.pop()
