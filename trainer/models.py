"""Image classifiers by name: a registry of small models for CPU-sized images, plus torchvision.

Every model takes a batch ``[N, C, H, W] float32`` (normalized pixels; C is 3 for RGB) and
returns logits ``[N, num_outputs] float32``. `num_outputs` is the number of classes, except for
the `binary_cross_entropy` loss, which wants one logit (`trainer.losses.LossFunction.output_size`).

Registered models (``ModelConfig.name``):

- ``linear``: softmax regression, flatten then one linear layer. Input size fixed at build time.
- ``mlp``: flatten, then ``hidden_sizes`` linear layers with ReLU, then a linear head.
- ``cnn``: ``conv_widths`` blocks of conv3x3-batchnorm-ReLU-maxpool2, global average pool,
  linear head. Any input size.
- ``resnet``: ResNet-18's structure for small images: a 3x3 stem (no 7x7 conv, no max pool),
  one stage per ``stage_widths`` entry of ``blocks_per_stage`` BasicBlocks (stride 2 from the
  second stage on), global average pool, linear head. The defaults are ResNet-18 at half width.
- ``rnn``: a GRU reading the image row by row: row ``h`` of ``[C, H, W]`` is timestep ``h`` with
  ``C * W`` features; the last layer's final hidden state feeds a linear head. Width fixed at
  build time, any height.
- ``unet``: per-pixel logits ``[N, num_outputs, H, W]`` for the segmentation task
  (`trainer.segmentation`): ``conv_widths`` encoder stages and as many decoder stages back.
- ``torchvision:<name>``: ``torchvision.models.get_model(name, num_classes=num_outputs)``,
  untrained, when torchvision is installed; the other config fields are ignored.

New models register with ``@register_model("name")`` on a factory
``(config, input_shape, num_outputs) -> nn.Module``; a name can be registered once.
"""

from __future__ import annotations

from typing import Annotated, Callable

import torch
from pydantic import AfterValidator, Field
from torch import nn

from augserve.core.config import ConfigModel, Number, PositiveInteger, Text, config_dataclass
from trainer.config import registrar

TORCHVISION_PREFIX = "torchvision:"

InputShape = tuple[int, int, int]
ModelFactory = Callable[["ModelConfig", InputShape, int], nn.Module]

MODELS: dict[str, ModelFactory] = {}


register_model = registrar("model", MODELS, reserved_prefix=TORCHVISION_PREFIX)


def _model_name(name: str) -> str:
    if name in MODELS or (name.startswith(TORCHVISION_PREFIX) and len(name) > len(TORCHVISION_PREFIX)):
        return name
    raise ValueError(f"expected one of {sorted(MODELS)} or 'torchvision:<name>', got {name!r}")


Widths = Annotated[tuple[PositiveInteger, ...], Field(min_length=1)]


@config_dataclass
class ModelConfig(ConfigModel):
    """Which model to build and its sizes. Fields a model does not use are ignored by it."""

    config_name = "model"

    # a registered name (linear | mlp | cnn | resnet | rnn) or torchvision:<name>
    name: Annotated[Text, AfterValidator(_model_name)] = Field(
        "cnn", description="linear | mlp | cnn | resnet | rnn | torchvision:NAME"
    )
    hidden_sizes: Widths = (256, 128)  # mlp: width of each hidden layer
    conv_widths: Widths = (16, 32, 64, 64)  # cnn: output channels of each conv block
    stage_widths: Widths = (32, 64, 128, 256)  # resnet: channels of each stage
    blocks_per_stage: PositiveInteger = 2  # resnet: BasicBlocks per stage (2 with 4 stages is ResNet-18)
    rnn_hidden_size: PositiveInteger = 128  # rnn: GRU hidden state size
    rnn_layers: PositiveInteger = 1  # rnn: stacked GRU layers
    # probability, before the linear head (and between GRU layers)
    dropout: Annotated[Number, Field(ge=0.0, lt=1.0)] = 0.0


def build_model(
    config: ModelConfig, input_shape: tuple[int, int, int], num_classes: int
) -> nn.Module:
    """The model `config` names, for inputs ``[N, *input_shape]`` = ``[N, C, H, W]`` float32
    (normalized) and logits ``[N, num_classes]`` float32.

    `num_classes` is the width of the output layer: pass ``loss.output_size(num_classes)`` so
    that the binary loss gets its single logit.
    """
    if (
        not isinstance(input_shape, (tuple, list))
        or len(input_shape) != 3
        or not all(isinstance(size, int) and size >= 1 for size in input_shape)
    ):
        raise ValueError(
            f"input_shape: expected positive (channels, height, width), got {input_shape!r}"
        )
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: expected an integer >= 1, got {num_classes!r}")
    if config.name.startswith(TORCHVISION_PREFIX):
        return _torchvision_model(config.name[len(TORCHVISION_PREFIX) :], num_classes)
    return MODELS[config.name](config, tuple(input_shape), num_classes)


def _torchvision_model(name: str, num_classes: int) -> nn.Module:
    try:
        import torchvision
    except ImportError:
        raise ModuleNotFoundError(
            f"model name 'torchvision:{name}' needs torchvision, which is not installed "
            "(pip install torchvision matching your torch)",
            name="torchvision",
        ) from None
    return torchvision.models.get_model(name, num_classes=num_classes)


def _head(features: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(features, num_classes))


@register_model("linear")
def linear(config: ModelConfig, input_shape: InputShape, num_classes: int) -> nn.Module:
    channels, height, width = input_shape
    return nn.Sequential(
        nn.Flatten(), _head(channels * height * width, num_classes, config.dropout)
    )


@register_model("mlp")
def mlp(config: ModelConfig, input_shape: InputShape, num_classes: int) -> nn.Module:
    channels, height, width = input_shape
    layers: list[nn.Module] = [nn.Flatten()]
    features = channels * height * width
    for hidden_size in config.hidden_sizes:
        layers += [nn.Linear(features, hidden_size), nn.ReLU(inplace=True)]
        features = hidden_size
    layers.append(_head(features, num_classes, config.dropout))
    return nn.Sequential(*layers)


@register_model("cnn")
def cnn(config: ModelConfig, input_shape: InputShape, num_classes: int) -> nn.Module:
    channels = input_shape[0]
    layers: list[nn.Module] = []
    for width in config.conv_widths:
        layers += [
            nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            # ceil_mode keeps a 1x1 map 1x1, so small inputs survive many blocks.
            nn.MaxPool2d(2, ceil_mode=True),
        ]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), _head(channels, num_classes, config.dropout)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """ResNet-18-style network for 32-64 px images: ``[N, C, H, W]`` -> ``[N, num_classes]``."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        stage_widths: tuple[int, ...],
        blocks_per_stage: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stage_widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(stage_widths[0]),
            nn.ReLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        channels = stage_widths[0]
        for stage, width in enumerate(stage_widths):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                blocks.append(BasicBlock(channels, width, stride))
                channels = width
        self.stages = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = _head(channels, num_classes, dropout)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.stages(self.stem(x))))


@register_model("resnet")
def resnet(config: ModelConfig, input_shape: InputShape, num_classes: int) -> nn.Module:
    return SmallResNet(
        input_shape[0], num_classes, config.stage_widths, config.blocks_per_stage, config.dropout
    )


class RowGRU(nn.Module):
    """A GRU over image rows: ``[N, C, H, W]`` is read as H timesteps of ``C * W`` features."""

    def __init__(
        self,
        channels: int,
        width: int,
        num_classes: int,
        hidden_size: int,
        layers: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.row_features = channels * width
        # torch warns when GRU dropout is set with one layer: it only acts between layers.
        self.gru = nn.GRU(
            self.row_features,
            hidden_size,
            num_layers=layers,
            batch_first=True,
            dropout=dropout if layers > 1 else 0.0,
        )
        self.head = _head(hidden_size, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        if channels * width != self.row_features:
            raise ValueError(
                f"rnn was built for rows of {self.row_features} features (channels * width), "
                f"got input [N, {channels}, {height}, {width}]"
            )
        rows = x.permute(0, 2, 1, 3).reshape(batch, height, channels * width)
        _, final_hidden = self.gru(rows)  # [layers, N, hidden]
        return self.head(final_hidden[-1])


@register_model("rnn")
def rnn(config: ModelConfig, input_shape: InputShape, num_classes: int) -> nn.Module:
    channels, _, width = input_shape
    return RowGRU(
        channels, width, num_classes, config.rnn_hidden_size, config.rnn_layers, config.dropout
    )


# Per-pixel models register themselves (imported last: they build on this registry).
from trainer import segmentation  # noqa: E402, F401
