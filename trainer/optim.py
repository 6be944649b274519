"""Optimizers by name, with weight decay on weights only.

`build_optimizer(config, model)` puts the model's parameters in two groups (nanoGPT's split):
weights (``p.dim() >= 2``: linear and conv kernels, GRU matrices) get ``config.weight_decay``;
biases and normalization scales/shifts get none, unless ``decay_biases_and_norms``. The same
split (`split_parameters`) decides which parameters the L1/L2 penalties of `trainer.losses`
act on, so "which parameters are weights" is written once.

Optimizers (``OptimizerConfig.name``):

- ``gd``: full-batch gradient descent, ONE step per epoch (see below). SGD without momentum.
- ``sgd``: mini-batch SGD without momentum.
- ``momentum`` / ``nesterov``: SGD with (Nesterov) momentum ``momentum``.
- ``adam``: Adam; its ``weight_decay`` is the coupled L2 form of torch.optim.Adam.
- ``adamw``: Adam with decoupled weight decay.
- ``rmsprop``: RMSprop with smoothing constant ``rmsprop_alpha``, no momentum.
- ``adagrad``: Adagrad.

Gradients are accumulated as sums and averaged at the step (`backward_sum`, then
`average_gradients` with the number of samples that contributed), so a step's gradient is the
mean over exactly the samples it saw: one mini-batch, every rank's mini-batch under data
parallelism, or the whole epoch for ``gd``. The penalty's gradient is added once per step, after
averaging. ``gd`` (``config.one_step_per_epoch``) steps once, after the epoch's last batch; it
equals one step on the concatenated epoch exactly for models without batch statistics (linear,
mlp, rnn, without dropout). With ``gd`` a schedule step is an epoch.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Iterable, NamedTuple

import torch
from pydantic import Field
from torch import nn

from augserve.core.config import ConfigModel, Flag, NonNegativeNumber, Number, Text, config_dataclass, one_of
from trainer.config import registrar

ParameterGroups = list[dict[str, Any]]
OptimizerFactory = Callable[["OptimizerConfig", ParameterGroups], torch.optim.Optimizer]

OPTIMIZERS: dict[str, OptimizerFactory] = {}


register_optimizer = registrar("optimizer", OPTIMIZERS)


@register_optimizer("gd")
@register_optimizer("sgd")
def _sgd(config: OptimizerConfig, groups: ParameterGroups) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=config.learning_rate, momentum=0.0)


@register_optimizer("momentum")
def _momentum(config: OptimizerConfig, groups: ParameterGroups) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=config.learning_rate, momentum=config.momentum)


@register_optimizer("nesterov")
def _nesterov(config: OptimizerConfig, groups: ParameterGroups) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=config.learning_rate, momentum=config.momentum, nesterov=True)


@register_optimizer("adam")
def _adam(config: OptimizerConfig, groups: ParameterGroups) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=config.learning_rate, betas=config.betas, eps=config.eps)


@register_optimizer("adamw")
def _adamw(config: OptimizerConfig, groups: ParameterGroups) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=config.betas, eps=config.eps)


@register_optimizer("rmsprop")
def _rmsprop(config: OptimizerConfig, groups: ParameterGroups) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(
        groups, lr=config.learning_rate, alpha=config.rmsprop_alpha, eps=config.eps
    )


@register_optimizer("adagrad")
def _adagrad(config: OptimizerConfig, groups: ParameterGroups) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(groups, lr=config.learning_rate, eps=config.eps)


Beta = Annotated[Number, Field(ge=0.0, lt=1.0)]


@config_dataclass
class OptimizerConfig(ConfigModel):
    """Which optimizer and its hyperparameters. Fields an optimizer does not use are ignored."""

    config_name = "optimizer"

    name: Annotated[Text, one_of(OPTIMIZERS)] = Field(
        "adamw", description="gd | sgd | momentum | nesterov | adam | adamw | rmsprop | adagrad"
    )
    # the base rate; the schedule scales it per step
    learning_rate: Annotated[Number, Field(gt=0.0)] = Field(1e-3, description="learning rate")
    momentum: Beta = 0.9  # momentum, nesterov
    betas: Annotated[tuple[Beta, ...], Field(min_length=2, max_length=2)] = (0.9, 0.999)  # adam, adamw
    eps: Annotated[Number, Field(gt=0.0)] = 1e-8  # adam, adamw, rmsprop, adagrad: added to denominators
    rmsprop_alpha: Beta = 0.99  # rmsprop: smoothing constant of the squared-gradient average
    weight_decay: NonNegativeNumber = 0.0  # on weights only unless decay_biases_and_norms
    decay_biases_and_norms: Flag = False  # also decay 1-d parameters (biases, norm scales/shifts)

    @property
    def one_step_per_epoch(self) -> bool:
        """True for `gd`: the loop accumulates scaled gradients over the epoch and steps once."""
        return self.name == "gd"


class ParameterSplit(NamedTuple):
    """A model's trainable parameters, in `model.parameters()` order."""

    regularized: list[nn.Parameter]  # weight decay and L1/L2 penalties act on these
    unregularized: list[nn.Parameter]


def split_parameters(model: nn.Module, include_biases_and_norms: bool = False) -> ParameterSplit:
    """Weights (``p.dim() >= 2``) apart from biases and normalization parameters (1-d).

    Only parameters with ``requires_grad``; with `include_biases_and_norms` every one of them is
    regularized.
    """
    regularized, unregularized = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        if include_biases_and_norms or parameter.dim() >= 2:
            regularized.append(parameter)
        else:
            unregularized.append(parameter)
    return ParameterSplit(regularized, unregularized)


def build_optimizer(config: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer `config` names over `model`'s trainable parameters, in up to two groups:
    ``{"name": "decay", "weight_decay": config.weight_decay}`` and
    ``{"name": "no_decay", "weight_decay": 0.0}`` (an empty group is left out).
    """
    split = split_parameters(model, config.decay_biases_and_norms)
    groups = [
        {"name": "decay", "params": split.regularized, "weight_decay": config.weight_decay},
        {"name": "no_decay", "params": split.unregularized, "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    if not groups:
        raise ValueError("model has no trainable parameters")
    return OPTIMIZERS[config.name](config, groups)


def backward_sum(data_loss: torch.Tensor, sample_count: int) -> None:
    """Add to `.grad` the gradient of the batch's summed loss (its mean times its size)."""
    (data_loss * sample_count).backward()


def average_gradients(parameters: Iterable[nn.Parameter], sample_count: int) -> None:
    """Turn gradients summed over `sample_count` samples into the mean gradient."""
    if sample_count < 1:
        raise ValueError(f"sample_count: expected >= 1, got {sample_count}")
    for parameter in parameters:
        if parameter.grad is not None:
            parameter.grad.div_(sample_count)
