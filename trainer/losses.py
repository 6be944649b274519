"""Data losses by name, and explicit L1 / L2 / elastic-net penalties on the weights.

``loss_function = build_loss(config)``; ``parts = loss_function(logits, labels, model)`` returns
`LossParts`: the data loss (mean over the batch), the penalty and their sum, each a scalar
float32 tensor; call ``parts.total.backward()``. Labels are class indices ``[N] int64``, or soft
targets ``[N, num_classes]`` float (class probabilities, rows summing to 1: MixUp and CutMix,
`trainer.mixing`), which every data loss takes as well.

Data losses (``LossConfig.name``), each on logits ``[N, loss_function.output_size(num_classes)]``:

- ``cross_entropy``: softmax cross-entropy; one logit per class.
- ``binary_cross_entropy``: two classes only (Keras ``class_mode='binary'``): the model has ONE
  output logit ``[N, 1]`` for P(class 1) = sigmoid(logit); labels 0/1; sigmoid cross-entropy.
  Build the model with ``build_model(..., loss_function.output_size(2))``, which is 1.
- ``mse``: mean squared error between softmax probabilities and one-hot labels, averaged over
  the N x num_classes entries (Keras' ``mean_squared_error`` after a softmax layer); one logit
  per class. Probabilities, not raw logits, so the loss is bounded and argmax means the same.

`loss_function.predictions(logits)` gives the predicted class ``[N] int64`` under each
convention, for accuracy.

Penalty: ``l1 * sum|theta| + l2 * sum theta^2`` over the weights chosen by
`trainer.optim.split_parameters` (``p.dim() >= 2``; with ``penalize_biases_and_norms`` every
trainable parameter). Note the L2 gradient is ``2 * l2 * theta`` (no 1/2 factor). ``l1`` alone
is the lasso, ``l2`` alone ridge, both the elastic net. The penalty is added to every
mini-batch's loss as it is (Keras' kernel_regularizer); it is independent of the optimizer's
``weight_decay``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from augserve.core.config import ConfigModel, Flag, NonNegativeNumber, Text, config_dataclass, one_of
from trainer.config import registrar
from trainer.optim import split_parameters


class DataLoss:
    """One data loss: its output-layer convention, the loss itself and the predicted class."""

    def output_size(self, num_classes: int) -> int:
        """Logits per sample the model must produce for `num_classes` classes."""
        return num_classes

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean loss over the batch: logits [N, outputs] float, labels [N] int64 or soft
        targets [N, num_classes] float -> scalar."""
        raise NotImplementedError

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """Predicted class indices [N] int64."""
        return logits.argmax(dim=1)

    def correct(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Samples predicted right: a scalar (a per-pixel loss counts each sample's share)."""
        return (self.predictions(logits) == labels).sum()


DATA_LOSSES: dict[str, type[DataLoss]] = {}


register_loss = registrar("loss", DATA_LOSSES)


@register_loss("cross_entropy")
class CrossEntropy(DataLoss):
    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Soft targets: the cross-entropy with each row's class probabilities.
        return F.cross_entropy(logits, labels.to(logits.dtype) if labels.is_floating_point() else labels)


@register_loss("binary_cross_entropy")
class BinaryCrossEntropy(DataLoss):
    def output_size(self, num_classes: int) -> int:
        if num_classes != 2:
            raise ValueError(
                f"binary_cross_entropy needs exactly 2 classes, the data has {num_classes}"
            )
        return 1

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[1] != 1:
            raise ValueError(
                f"binary_cross_entropy expects logits [N, 1], got {list(logits.shape)}"
            )
        # Soft targets [N, 2]: P(class 1) is the target of the one logit.
        target = labels[:, 1] if labels.dim() == 2 else labels
        return F.binary_cross_entropy_with_logits(logits[:, 0], target.to(logits.dtype))

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits[:, 0] > 0).long()


@register_loss("mse")
class MeanSquaredError(DataLoss):
    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        probabilities = logits.softmax(dim=1)
        if labels.is_floating_point():
            targets = labels.to(probabilities.dtype)
        else:
            targets = F.one_hot(labels, num_classes=logits.shape[1]).to(probabilities.dtype)
        return F.mse_loss(probabilities, targets)


@config_dataclass
class LossConfig(ConfigModel):
    """The data loss and the penalty coefficients (see the module docstring)."""

    config_name = "loss"

    name: Annotated[Text, one_of(DATA_LOSSES)] = Field(
        "cross_entropy", description="cross_entropy | binary_cross_entropy | mse"
    )
    l1: NonNegativeNumber = Field(0.0, description="L1 penalty coefficient: lambda of sum|theta|")
    # both > 0 is the elastic net
    l2: NonNegativeNumber = Field(0.0, description="L2 penalty coefficient: lambda of sum theta^2")
    penalize_biases_and_norms: Flag = False  # also penalize 1-d parameters

    @property
    def regularization(self) -> str:
        """'none', 'l1', 'l2' or 'elastic_net', from which coefficients are non-zero."""
        return {
            (False, False): "none",
            (True, False): "l1",
            (False, True): "l2",
            (True, True): "elastic_net",
        }[(self.l1 > 0, self.l2 > 0)]


@dataclass(frozen=True)
class LossParts:
    """Scalar float tensors: `total` = `data` + `penalty`; backpropagate `total`."""

    data: torch.Tensor
    penalty: torch.Tensor
    total: torch.Tensor


class LossFunction:
    """``loss_function(logits, labels, model) -> LossParts``; built by `build_loss`."""

    def __init__(self, config: LossConfig) -> None:
        self.config = config
        self.data_loss = DATA_LOSSES[config.name]()

    def output_size(self, num_classes: int) -> int:
        """Width of the model's output layer for `num_classes` classes (1 for binary BCE)."""
        return self.data_loss.output_size(num_classes)

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """Predicted class indices [N] int64 from logits [N, output_size]."""
        return self.data_loss.predictions(logits)

    def correct(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.data_loss.correct(logits, labels)

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """``l1 * sum|theta| + l2 * sum theta^2`` over the regularized parameters; a scalar."""
        parameters = split_parameters(model, self.config.penalize_biases_and_norms).regularized
        device = parameters[0].device if parameters else None
        penalty = torch.zeros((), device=device)
        if self.config.l1 > 0:
            penalty = penalty + self.config.l1 * sum(
                parameter.abs().sum() for parameter in parameters
            )
        if self.config.l2 > 0:
            penalty = penalty + self.config.l2 * sum(
                parameter.square().sum() for parameter in parameters
            )
        return penalty

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, model: nn.Module) -> LossParts:
        """logits [N, output_size] float32, labels [N] int64 class indices or [N, classes]
        soft targets, the model that made the logits (for the penalty)."""
        data = self.data_loss(logits, labels)
        penalty = self.penalty(model)
        return LossParts(data=data, penalty=penalty, total=data + penalty)


def build_loss(config: LossConfig, task: str = "classification") -> LossFunction:
    """The loss `config` names, with its penalty; segmentation takes cross-entropy per pixel."""
    function = LossFunction(config)
    if task == "segmentation":
        if config.name != "cross_entropy":
            raise ValueError(f"loss.name: segmentation trains with cross_entropy (per pixel), not {config.name!r}")
        from trainer.segmentation import PixelCrossEntropy

        function.data_loss = PixelCrossEntropy()
    return function
