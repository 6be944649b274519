"""Semantic segmentation: a small encoder-decoder, the per-pixel loss and the metrics.

Targets are label maps ``[N, H, W] int64``: 0 background, class k + 1 for the dataset's class k,
and ``IGNORE_INDEX`` (255, the server's mask fill: outside the picture, crowd regions, erased
rectangles where asked) on pixels that count for nothing. Logits are ``[N, classes + 1, H, W]``.

- ``unet`` (registered model): ``conv_widths`` stages of two conv3x3-batchnorm-ReLU, each
  halving the resolution after the first (max pool), then as many decoder stages back up
  (bilinear upsampling, the encoder's features of that size concatenated, two convs), and a 1x1
  head: U-Net's structure at CPU size. Input sides need to be divisible by 2^(stages - 1).
- Loss: cross-entropy per pixel, averaged over the pixels that are not ignored (torch's
  ``ignore_index``); the L1 / L2 penalties are added as for classification.
- Metrics: pixel accuracy per image (correct over counted pixels) and, from a confusion matrix
  over a split, per-class IoU = TP / (TP + FP + FN) and its mean over the classes present in the
  targets or the predictions (mIoU, as torchmetrics' JaccardIndex and the Pascal VOC / ADE20K
  evaluations average it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.losses import DataLoss
from trainer.models import InputShape, ModelConfig, register_model

IGNORE_INDEX = 255
PIXEL_MODELS = ("unet",)  # the registered models with per-pixel outputs


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallUNet(nn.Module):
    """[N, C, H, W] -> [N, num_outputs, H, W] logits."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], num_outputs: int) -> None:
        super().__init__()
        self.encoder = nn.ModuleList()
        channels = in_channels
        for width in widths:
            self.encoder.append(_double_conv(channels, width))
            channels = width
        self.decoder = nn.ModuleList()
        for skip in reversed(widths[:-1]):
            self.decoder.append(_double_conv(channels + skip, skip))
            channels = skip
        self.head = nn.Conv2d(channels, num_outputs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for index, stage in enumerate(self.encoder):
            if index:
                x = F.max_pool2d(x, 2)
            x = stage(x)
            skips.append(x)
        for stage, skip in zip(self.decoder, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = stage(torch.cat([x, skip], dim=1))
        return self.head(x)


@register_model("unet")
def unet(config: ModelConfig, input_shape: InputShape, num_outputs: int) -> nn.Module:
    stages = len(config.conv_widths)
    factor = 2 ** (stages - 1)
    if input_shape[1] % factor or input_shape[2] % factor:
        raise ValueError(
            f"model.conv_widths: {stages} stages need image sides divisible by {factor}, got {input_shape[1]}x{input_shape[2]}"
        )
    return SmallUNet(input_shape[0], tuple(config.conv_widths), num_outputs)


def pixel_cross_entropy(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the counted pixels (0 when none is counted)."""
    if not bool((masks != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)


class PixelCrossEntropy(DataLoss):
    """The data loss of the segmentation task: logits [N, outputs, H, W], masks [N, H, W]."""

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return pixel_cross_entropy(logits, labels)

    def correct(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return pixel_accuracy_sum(logits, labels)


def pixel_accuracy_sum(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Sum over the images of each one's share of counted pixels predicted right (an image
    without counted pixels adds 0)."""
    counted = masks != IGNORE_INDEX
    correct = ((logits.argmax(dim=1) == masks) & counted).flatten(1).sum(dim=1)
    return (correct.float() / counted.flatten(1).sum(dim=1).clamp(min=1).float()).sum()


def confusion_matrix(logits: torch.Tensor, masks: torch.Tensor, num_outputs: int) -> torch.Tensor:
    """[num_outputs, num_outputs] int64 counts of (target row, predicted column) over the
    counted pixels."""
    counted = masks != IGNORE_INDEX
    targets = masks[counted]
    predicted = logits.argmax(dim=1)[counted]
    return torch.bincount(targets * num_outputs + predicted, minlength=num_outputs * num_outputs).reshape(num_outputs, num_outputs)


def mean_iou(confusion: torch.Tensor) -> tuple[float, list[float]]:
    """(mIoU, IoU per class: NaN for a class absent from targets and predictions)."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    union = confusion.sum(dim=0) + confusion.sum(dim=1) - true_positive
    iou = torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(union, float("nan")))
    present = ~torch.isnan(iou)
    miou = float(iou[present].mean()) if bool(present.any()) else float("nan")
    return miou, iou.tolist()
