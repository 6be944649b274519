"""MixUp and CutMix as batch operations, drawn from (seed, epoch, batch position, shard) alone.

Mixing happens on the client, after the batch arrives: what a batch mixes is a pure function
of its key, like a sample's plan, so it is the same whatever the transport, the thread count or
a restart (a resumed stream gives the same batches, hence the same mixes), and needs nothing on
the wire. Because the server streams the batches un-mixed, the members of one shared group (one
production of a stream) can each mix it their own way: one with CutMix, one with MixUp, one not
at all, or with different mixing seeds, without splitting the group. Mixing on the server would
make the mix part of the stream key, and such members would need a production each.

Conventions are torchvision v2's `MixUp` and `CutMix`: one weight per batch from
Beta(alpha, alpha), each row mixed with the row before it (`partners[i] = i - 1`, the first
with the last: `roll(1, 0)`; the stream's order is already shuffled per epoch), labels mixed
with the same weight; CutMix pastes the partner's box of (1 - weight) of the area, centred
uniformly, clipped at the edges, and the weight becomes the area actually kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from augserve.core.errors import SpecError
from augserve.core.plan import MAX_EPOCH, MAX_SAMPLE_ID, MAX_SEED

MIX_KINDS = ("none", "mixup", "cutmix")
MAX_ALPHA = 100.0
MAX_SHARD = 2**32 - 1


@dataclass(frozen=True)
class MixSpec:
    """How batches are mixed. `mixup_alpha` / `cutmix_alpha`: Beta(alpha, alpha) of MixUp's
    weight / CutMix's kept area (0 turns that one off); `probability`: of mixing a batch at all;
    `cutmix_share`: with both on, the share of mixed batches that take CutMix (timm's
    switch_prob)."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    probability: float = 1.0
    cutmix_share: float = 0.5

    def __post_init__(self) -> None:
        for name in ("mixup_alpha", "cutmix_alpha"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= MAX_ALPHA:
                raise SpecError(name, f"expected a number in [0, {MAX_ALPHA}] (0: off), got {value!r}")
        for name in ("probability", "cutmix_share"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
                raise SpecError(name, f"expected a probability in [0, 1], got {value!r}")

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


@dataclass(frozen=True)
class BatchMix:
    """What mixing decided for one batch of `len(partners)` rows.

    Row i of the mixed batch is row i with weight `weight` and row `partners[i]` with weight
    1 - weight: blended everywhere (mixup), or with the partner's pixels in `box` (cutmix:
    (top, left, height, width) in pixels; the weight is then the share of pixels outside it).
    Its target is weight * one_hot(label i) + (1 - weight) * one_hot(label partners[i]).
    kind "none": the batch as it came (weight 1).
    """

    kind: str
    weight: float
    partners: np.ndarray  # [N] int64
    box: tuple[int, int, int, int] | None = None


def rolled_partners(count: int) -> np.ndarray:
    """[count] int64: each row's partner, the row before it (torchvision's roll(1, 0))."""
    return np.roll(np.arange(count, dtype=np.int64), 1)


def mix_generator(seed: int, epoch: int, position: int, shard: int = 0) -> np.random.Generator:
    """The batch's own random numbers: Philox keyed like a plan's (seed, epoch << 40 | position),
    its counter starting in a block no plan reaches (word 3 = 1) and at word 2 = shard."""
    if not 0 <= seed <= MAX_SEED:
        raise SpecError("seed", f"{seed} is outside [0, {MAX_SEED}]")
    if not 0 <= epoch <= MAX_EPOCH:
        raise SpecError("epoch", f"{epoch} is outside [0, {MAX_EPOCH}]")
    if not 0 <= position <= MAX_SAMPLE_ID:
        raise SpecError("position", f"{position} is outside [0, {MAX_SAMPLE_ID}]")
    if not 0 <= shard <= MAX_SHARD:
        raise SpecError("shard", f"{shard} is outside [0, {MAX_SHARD}]")
    key = np.array([seed, (epoch << 40) | position], dtype=np.uint64)
    counter = np.array([0, 0, shard, 1], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=key, counter=counter))


def draw_mix(
    spec: MixSpec,
    seed: int,
    epoch: int,
    position: int,
    count: int,
    size: tuple[int, int],
    shard: int = 0,
) -> BatchMix:
    """The mix of the batch of `count` rows of `size` (height, width) at `position` (its first
    sample's place in the epoch's order) of `epoch`, in shard `shard`."""
    partners = rolled_partners(count)
    if not spec.enabled or count < 2:
        return BatchMix("none", 1.0, partners)
    generator = mix_generator(seed, epoch, position, shard)
    # A fixed sequence of draws whatever the outcome: chance, choice, weight, box centre.
    u_mix, u_choice = generator.random(2)
    if u_mix >= spec.probability:
        return BatchMix("none", 1.0, partners)
    use_cutmix = spec.cutmix_alpha > 0 and (spec.mixup_alpha <= 0 or u_choice < spec.cutmix_share)
    alpha = spec.cutmix_alpha if use_cutmix else spec.mixup_alpha
    weight = float(generator.beta(alpha, alpha))
    height, width = size
    center_y, center_x = int(generator.integers(height)), int(generator.integers(width))
    if not use_cutmix:
        return BatchMix("mixup", weight, partners)
    half = 0.5 * math.sqrt(1.0 - weight)
    half_h, half_w = int(half * height), int(half * width)
    top, left = max(center_y - half_h, 0), max(center_x - half_w, 0)
    bottom, right = min(center_y + half_h, height), min(center_x + half_w, width)
    box = (top, left, bottom - top, right - left)
    kept = 1.0 - (box[2] * box[3]) / (height * width)
    return BatchMix("cutmix", kept, partners, box)


def soft_targets(labels: np.ndarray, num_classes: int, mix: BatchMix) -> np.ndarray:
    """[N, num_classes] float32: the mixed label distributions of a batch's [N] int64 labels."""
    one_hot = np.eye(num_classes, dtype=np.float32)[labels]
    return mix.weight * one_hot + (1.0 - mix.weight) * one_hot[mix.partners]
