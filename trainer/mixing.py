"""MixUp and CutMix in the trainer, on the device, after normalization.

The server streams batches un-mixed; each trainer mixes its own (see `augserve.core.mixing`
for why, and for the conventions): members of one shared group keep sharing the stream
whatever each one's `mixing` section says. A batch's mix depends only on (mixing seed, epoch,
the batch's position in the epoch, rank), so a resumed run mixes exactly as an uninterrupted
one. The loss then takes soft targets ([N, classes] probabilities); accuracy is still counted
against each sample's own label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from augserve.core.config import ConfigModel, Number, config_dataclass
from augserve.core.mixing import BatchMix, MixSpec, draw_mix
from trainer.config import Seed


@config_dataclass
class MixingConfig(ConfigModel):
    """The `mixing` section: `mixup_alpha` / `cutmix_alpha` (0: off; torchvision's usual 0.2 /
    1.0), `probability` of mixing a batch, `cutmix_share` of mixed batches that take CutMix when
    both are on, `seed` of the mixes (None: data.seed). The ranges are MixSpec's."""

    config_name = "mixing"

    mixup_alpha: Number = 0.0
    cutmix_alpha: Number = 0.0
    probability: Number = 1.0
    cutmix_share: Number = 0.5
    seed: Seed | None = None

    def __post_init__(self) -> None:
        MixSpec(self.mixup_alpha, self.cutmix_alpha, self.probability, self.cutmix_share)  # checks the ranges

    @property
    def spec(self) -> MixSpec:
        return MixSpec(self.mixup_alpha, self.cutmix_alpha, self.probability, self.cutmix_share)

    @property
    def enabled(self) -> bool:
        return self.spec.enabled


def apply_mix(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, mix: BatchMix
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed images [N, C, H, W], targets [N, num_classes] float) for `images` [N, C, H, W]
    float and `labels` [N] int64. The inputs are left as they are."""
    targets = F.one_hot(labels, num_classes).to(images.dtype)
    if mix.kind == "none":
        return images, targets
    partners = torch.as_tensor(mix.partners, device=images.device)
    if mix.kind == "mixup":
        mixed = images * mix.weight + images[partners] * (1.0 - mix.weight)
    else:
        top, left, height, width = mix.box
        mixed = images.clone()
        mixed[..., top : top + height, left : left + width] = images[partners][..., top : top + height, left : left + width]
    return mixed, targets * mix.weight + targets[partners] * (1.0 - mix.weight)


class BatchMixer:
    """Mixes a trainer's batches: `mixer(images, labels, epoch, position)`."""

    def __init__(self, config: MixingConfig, num_classes: int, seed: int, rank: int = 0) -> None:
        self.spec = config.spec
        self.num_classes = num_classes
        self.seed = seed if config.seed is None else config.seed
        self.rank = rank

    def draw(self, epoch: int, position: int, count: int, size: tuple[int, int]) -> BatchMix:
        return draw_mix(self.spec, self.seed, epoch, position, count, size, self.rank)

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, epoch: int, position: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mix = self.draw(epoch, position, len(labels), (images.shape[-2], images.shape[-1]))
        return apply_mix(images, labels, self.num_classes, mix)
