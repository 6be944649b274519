"""Trainer parts: every model, optimizer x loss x penalty, the penalties' gradients, schedules,
full-batch gradient descent by accumulation, and config validation."""

from __future__ import annotations

import copy
import importlib.util
import math
import random
import re

import pytest
import torch
import yaml
from torch import nn

from trainer.losses import DATA_LOSSES, LossConfig, LossParts, build_loss, register_loss
from trainer.models import MODELS, ModelConfig, build_model, register_model
from trainer.optim import (
    OPTIMIZERS,
    OptimizerConfig,
    build_optimizer,
    average_gradients,
    backward_sum,
    register_optimizer,
    split_parameters,
)
from trainer.segmentation import PIXEL_MODELS
from trainer.schedule import (
    DECAYS,
    ScheduleConfig,
    learning_rate,
    register_decay,
    set_learning_rate,
)

# A learning rate per optimizer at which a few steps on the tiny problem reliably go downhill.
LEARNING_RATES = {
    "gd": 0.1,
    "sgd": 0.1,
    "momentum": 0.05,
    "nesterov": 0.05,
    "adam": 0.01,
    "adamw": 0.01,
    "rmsprop": 0.002,
    "adagrad": 0.05,
}
PENALTIES = {
    "none": {},
    "l1": {"l1": 1e-3},
    "l2": {"l2": 1e-3},
    "elastic_net": {"l1": 1e-3, "l2": 1e-3},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: thread start-up costs more than it saves, badly on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_batch(count: int, shape: tuple[int, int, int], num_classes: int, seed: int = 0):
    """Images [count, *shape] float32 and labels [count] int64 a linear teacher can separate."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, *shape, generator=generator)
    teacher = torch.randn(math.prod(shape), num_classes, generator=generator)
    labels = (images.flatten(1) @ teacher).argmax(dim=1)
    return images, labels


def train_steps(model, optimizer, loss_function, images, labels, steps):
    """Losses (LossParts.total) before each of `steps` full-batch steps and after the last."""
    totals = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        parts = loss_function(model(images), labels, model)
        totals.append(parts.total.item())
        parts.total.backward()
        optimizer.step()
    with torch.no_grad():
        totals.append(loss_function(model(images), labels, model).total.item())
    return totals


def test_the_registries_hold_every_name_of_the_issue():
    assert set(MODELS) == {"linear", "mlp", "cnn", "resnet", "rnn", "unet"}
    assert set(OPTIMIZERS) == set(LEARNING_RATES)
    assert set(DATA_LOSSES) == {"cross_entropy", "binary_cross_entropy", "mse"}
    assert set(DECAYS) == {"constant", "step", "cosine"}


@pytest.mark.parametrize(
    ("register", "name"),
    [
        (register_model, "cnn"),
        (register_optimizer, "adam"),
        (register_loss, "mse"),
        (register_decay, "cosine"),
    ],
)
def test_registries_refuse_a_second_registration(register, name):
    with pytest.raises(ValueError, match="already registered"):
        register(name)(object)


# --- models ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(set(MODELS) - set(PIXEL_MODELS)))  # per-pixel ones: test_segmentation.py
def test_every_classifier_gives_logits_and_learns_a_fixed_batch(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name), (3, 32, 32), 5)
    images, labels = random_batch(16, (3, 32, 32), 5)
    assert model(images).shape == (16, 5)
    assert model(images).dtype == torch.float32
    optimizer = build_optimizer(OptimizerConfig(name="momentum", learning_rate=0.02), model)
    totals = train_steps(model, optimizer, build_loss(LossConfig()), images, labels, steps=5)
    assert totals[-1] < totals[0], totals


def test_model_sizes_are_configurable():
    mlp = build_model(ModelConfig(name="mlp", hidden_sizes=(7, 5)), (3, 8, 8), 4)
    assert [layer.out_features for layer in mlp.modules() if isinstance(layer, nn.Linear)] == [
        7,
        5,
        4,
    ]
    cnn = build_model(ModelConfig(name="cnn", conv_widths=(4, 6)), (3, 16, 16), 2)
    assert [layer.out_channels for layer in cnn.modules() if isinstance(layer, nn.Conv2d)] == [4, 6]
    resnet = build_model(
        ModelConfig(name="resnet", stage_widths=(4, 8, 8, 16), blocks_per_stage=2), (3, 32, 32), 3
    )
    assert sum(type(module).__name__ == "BasicBlock" for module in resnet.modules()) == 8
    assert resnet(torch.zeros(2, 3, 64, 48)).shape == (2, 3)  # any image size
    rnn = build_model(
        ModelConfig(name="rnn", rnn_hidden_size=9, rnn_layers=2, dropout=0.1), (3, 8, 10), 4
    )
    assert rnn.gru.input_size == 30 and rnn.gru.hidden_size == 9 and rnn.gru.num_layers == 2
    assert rnn(torch.zeros(2, 3, 5, 10)).shape == (2, 4)  # rows are timesteps: any height


def test_rnn_reads_rows_as_timesteps():
    """The two-layer GRU run by hand, one row at a time (row t of every channel, channel after
    channel, is timestep t), with the model's weights in GRUCells: the head of the last layer's
    final state is the model's output. Square images, so that reading columns instead would
    still fit the shapes."""
    torch.manual_seed(0)
    rnn = build_model(ModelConfig(name="rnn", rnn_hidden_size=6, rnn_layers=2), (3, 5, 5), 2)
    images = torch.randn(2, 3, 5, 5)
    cells = [nn.GRUCell(15, 6), nn.GRUCell(6, 6)]
    with torch.no_grad():
        for layer, cell in enumerate(cells):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(cell, name).copy_(getattr(rnn.gru, f"{name}_l{layer}"))
        states = [torch.zeros(2, 6), torch.zeros(2, 6)]
        for row in range(5):
            features = torch.cat([images[:, channel, row, :] for channel in range(3)], dim=1)
            states[0] = cells[0](features, states[0])
            states[1] = cells[1](states[0], states[1])
        torch.testing.assert_close(rnn(images), rnn.head(states[1]))
    with pytest.raises(ValueError, match="channels \\* width"):
        rnn(torch.zeros(1, 3, 4, 6))


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed"
)
def test_torchvision_names_say_that_torchvision_is_missing():
    with pytest.raises(ModuleNotFoundError, match="'torchvision:resnet18' needs torchvision"):
        build_model(ModelConfig(name="torchvision:resnet18"), (3, 32, 32), 5)


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed"
)
def test_torchvision_models_by_name():
    model = build_model(ModelConfig(name="torchvision:resnet18"), (3, 32, 32), 5)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 5)


def test_build_model_rejects_bad_shapes():
    with pytest.raises(ValueError, match="input_shape"):
        build_model(ModelConfig(name="linear"), (32, 32), 5)
    with pytest.raises(ValueError, match="num_classes"):
        build_model(ModelConfig(name="linear"), (3, 32, 32), 0)


# --- optimizers x losses x penalties -----------------------------------------------------------


@pytest.mark.parametrize("penalty", sorted(PENALTIES))
@pytest.mark.parametrize("loss_name", sorted(DATA_LOSSES))
@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
def test_every_optimizer_loss_and_penalty_goes_downhill(optimizer_name, loss_name, penalty):
    torch.manual_seed(0)
    num_classes = 2 if loss_name == "binary_cross_entropy" else 3
    loss_function = build_loss(LossConfig(name=loss_name, **PENALTIES[penalty]))
    model = build_model(
        ModelConfig(name="mlp", hidden_sizes=(16,)),
        (3, 4, 4),
        loss_function.output_size(num_classes),
    )
    optimizer = build_optimizer(
        OptimizerConfig(
            name=optimizer_name, learning_rate=LEARNING_RATES[optimizer_name], weight_decay=1e-4
        ),
        model,
    )
    images, labels = random_batch(32, (3, 4, 4), num_classes)
    totals = train_steps(model, optimizer, loss_function, images, labels, steps=8)
    assert totals[-1] < totals[0], totals


def test_binary_cross_entropy_has_one_logit_for_two_classes():
    loss_function = build_loss(LossConfig(name="binary_cross_entropy"))
    assert loss_function.output_size(2) == 1
    with pytest.raises(ValueError, match="exactly 2 classes"):
        loss_function.output_size(3)
    logits = torch.tensor([[2.0], [-1.0], [0.5]])
    labels = torch.tensor([1, 0, 0])
    parts = loss_function(logits, labels, nn.Linear(1, 1))
    expected = torch.nn.functional.binary_cross_entropy(torch.sigmoid(logits[:, 0]), labels.float())
    torch.testing.assert_close(parts.data, expected)
    assert loss_function.predictions(logits).tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match=r"logits \[N, 1\]"):
        loss_function(torch.zeros(3, 2), labels, nn.Linear(1, 1))


def test_mse_compares_softmax_probabilities_with_one_hot_labels():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2])
    parts = build_loss(LossConfig(name="mse"))(logits, labels, nn.Linear(1, 1))
    one_hot = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(parts.data, ((logits.softmax(1) - one_hot) ** 2).mean())
    assert build_loss(LossConfig(name="mse")).predictions(logits).tolist() == [0, 0]


# --- penalties ---------------------------------------------------------------------------------


def small_network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))


@pytest.mark.parametrize("include_biases", [False, True])
def test_l2_penalty_gradient_is_two_lambda_theta_on_weights_only(include_biases):
    model = small_network()
    l2 = 0.03
    loss_function = build_loss(LossConfig(l2=l2, penalize_biases_and_norms=include_biases))
    loss_function.penalty(model).backward()
    for name, parameter in model.named_parameters():
        penalized = include_biases or parameter.dim() >= 2
        expected = 2 * l2 * parameter.detach() if penalized else torch.zeros_like(parameter)
        grad = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
        torch.testing.assert_close(grad, expected, msg=name)


def test_penalties_are_the_explicit_sums_and_separate_from_the_data_loss():
    model = small_network()
    weights = [p for p in model.parameters() if p.dim() >= 2]
    l1_sum = sum(p.abs().sum() for p in weights).item()
    l2_sum = sum(p.square().sum() for p in weights).item()
    images, labels = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    for config, expected in [
        (LossConfig(), 0.0),
        (LossConfig(l1=0.1), 0.1 * l1_sum),
        (LossConfig(l2=0.2), 0.2 * l2_sum),
        (LossConfig(l1=0.1, l2=0.2), 0.1 * l1_sum + 0.2 * l2_sum),
    ]:
        parts = build_loss(config)(model(images), labels, model)
        assert isinstance(parts, LossParts)
        assert parts.penalty.item() == pytest.approx(expected, rel=1e-5)
        assert parts.data.item() == pytest.approx(
            torch.nn.functional.cross_entropy(model(images), labels).item()
        )
        torch.testing.assert_close(parts.total, parts.data + parts.penalty)
    assert [LossConfig(l1=a, l2=b).regularization for a, b in [(0, 0), (1, 0), (0, 1), (1, 1)]] == [
        "none",
        "l1",
        "l2",
        "elastic_net",
    ]


def test_l1_drives_weights_to_zero():
    images, labels = random_batch(64, (3, 4, 4), 3, seed=1)

    def near_zero_fraction(l1: float) -> float:
        torch.manual_seed(0)
        model = build_model(ModelConfig(name="linear"), (3, 4, 4), 3)
        optimizer = build_optimizer(OptimizerConfig(name="sgd", learning_rate=0.05), model)
        train_steps(model, optimizer, build_loss(LossConfig(l1=l1)), images, labels, steps=200)
        weight = model[1][1].weight.detach()
        return (weight.abs() < 1e-2).float().mean().item()

    without, with_l1 = near_zero_fraction(0.0), near_zero_fraction(0.05)
    assert with_l1 > without + 0.3, (without, with_l1)


def test_split_parameters_puts_biases_and_norms_apart_unless_asked():
    model = small_network()
    split = split_parameters(model)
    assert [tuple(p.shape) for p in split.regularized] == [(4, 6), (3, 4)]
    assert [tuple(p.shape) for p in split.unregularized] == [(4,), (4,), (4,), (3,)]
    assert len(split_parameters(model, include_biases_and_norms=True).regularized) == 6
    model[0].bias.requires_grad_(False)
    assert len(split_parameters(model).unregularized) == 3


def test_weight_decay_goes_to_the_weight_group_only():
    model = small_network()
    optimizer = build_optimizer(
        OptimizerConfig(name="sgd", learning_rate=0.1, weight_decay=0.5), model
    )
    decays = {
        group["name"]: (group["weight_decay"], len(group["params"]))
        for group in optimizer.param_groups
    }
    assert decays == {"decay": (0.5, 2), "no_decay": (0.0, 4)}
    everything = build_optimizer(
        OptimizerConfig(weight_decay=0.5, decay_biases_and_norms=True), model
    )
    assert [(group["name"], len(group["params"])) for group in everything.param_groups] == [
        ("decay", 6)
    ]


# --- full-batch gradient descent ---------------------------------------------------------------


def test_gd_accumulated_over_minibatches_equals_one_full_batch_step():
    torch.manual_seed(0)
    config = OptimizerConfig(name="gd", learning_rate=0.5, weight_decay=0.1)
    assert config.one_step_per_epoch and not OptimizerConfig(name="sgd").one_step_per_epoch
    loss_function = build_loss(LossConfig(l1=0.01, l2=0.02, penalize_biases_and_norms=True))
    images, labels = random_batch(23, (3, 2, 2), 3)
    accumulated = build_model(ModelConfig(name="linear"), (3, 2, 2), 3)
    direct = copy.deepcopy(accumulated)
    initial = copy.deepcopy(accumulated)

    optimizer = build_optimizer(config, accumulated)
    optimizer.zero_grad(set_to_none=True)
    for start in range(0, 23, 10):  # mini-batches of 10, 10 and 3
        batch_images, batch_labels = images[start : start + 10], labels[start : start + 10]
        parts = loss_function(accumulated(batch_images), batch_labels, accumulated)
        backward_sum(parts.data, len(batch_labels))
    average_gradients(accumulated.parameters(), 23)
    loss_function.penalty(accumulated).backward()
    optimizer.step()

    direct_optimizer = build_optimizer(config, direct)
    direct_optimizer.zero_grad(set_to_none=True)
    loss_function(direct(images), labels, direct).total.backward()
    direct_optimizer.step()

    moved = False
    for after_accumulation, after_full_batch, before in zip(
        accumulated.parameters(),
        direct.parameters(),
        initial.parameters(),
        strict=True,
    ):
        torch.testing.assert_close(after_accumulation, after_full_batch, atol=1e-6, rtol=0)
        moved = moved or (after_full_batch - before).abs().max().item() > 1e-3
    assert moved  # by far more than the tolerance


def test_constant_schedule_is_constant():
    config = ScheduleConfig(name="constant")
    assert {learning_rate(config, step, 50, 0.3) for step in range(60)} == {0.3}


def test_step_schedule_multiplies_by_gamma_at_the_boundaries():
    config = ScheduleConfig(name="step", decay_every_steps=10, gamma=0.5)
    rates = [learning_rate(config, step, 100, 0.8) for step in range(31)]
    assert rates[:10] == [0.8] * 10
    assert rates[10:20] == [0.4] * 10
    assert rates[20:30] == [0.2] * 10
    assert rates[30] == 0.1


@pytest.mark.parametrize("floor", [0.0, 0.1])
def test_cosine_schedule_with_warmup(floor):
    config = ScheduleConfig(name="cosine", warmup_steps=10, min_learning_rate_fraction=floor)
    base, total = 0.2, 100
    rates = [learning_rate(config, step, total, base) for step in range(total + 1)]
    warmup = rates[:11]
    assert warmup[0] < 0.1 * base
    increments = [b - a for a, b in zip(warmup, warmup[1:], strict=False)]
    assert increments == pytest.approx([base / 11] * 10)  # linear from ~0
    assert rates[10] == pytest.approx(base)  # the base rate at the end of warmup
    assert all(later <= earlier for earlier, later in zip(rates[10:], rates[11:], strict=False))
    assert rates[total] == pytest.approx(floor * base, abs=1e-12)
    assert rates[total - 1] == pytest.approx(floor * base, abs=1e-3 * base)
    assert learning_rate(config, total + 50, total, base) == pytest.approx(floor * base, abs=1e-12)


def test_warmup_then_cosine_at_chosen_steps():
    """Base 0.8, 4 warmup steps of 12, floor 0.25 * 0.8 = 0.2; worked out by hand from the
    formulas in trainer/schedule.py's docstrings."""
    config = ScheduleConfig(name="cosine", warmup_steps=4, min_learning_rate_fraction=0.25)
    expected = {
        0: 0.16,  # warmup: 0.8 * (0 + 1) / (4 + 1)
        3: 0.64,  # 0.8 * 4 / 5
        4: 0.8,  # warmup over: cosine at progress 0 of its 8 steps
        6: 0.7121320343559643,  # progress 1/4: 0.2 + 0.6 * (1 + cos(pi / 4)) / 2
        8: 0.5,  # half way: 0.2 + 0.6 / 2
        10: 0.2878679656440358,  # progress 3/4: 0.2 + 0.6 * (1 - cos(pi / 4)) / 2
        12: 0.2,  # the floor at step == total_steps
        30: 0.2,  # and ever after
    }
    actual = {step: learning_rate(config, step, 12, 0.8) for step in expected}
    assert actual == pytest.approx(expected, rel=1e-12)


def torch_reference_rates(config: ScheduleConfig, total_steps: int, base_lr: float) -> list[float]:
    """The rates of steps 0..total_steps from torch.optim.lr_scheduler's own schedulers: LinearLR
    for the warmup, then CosineAnnealingLR, StepLR or a constant factor of 1."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base_lr)
    schedulers = torch.optim.lr_scheduler
    if config.name == "cosine":
        eta_min = config.min_learning_rate_fraction * base_lr
        decay = schedulers.CosineAnnealingLR(optimizer, total_steps - config.warmup_steps, eta_min)
    elif config.name == "step":
        decay = schedulers.StepLR(optimizer, config.decay_every_steps, config.gamma)
    else:
        decay = schedulers.ConstantLR(optimizer, factor=1.0, total_iters=0)
    scheduler = decay
    if config.warmup_steps:
        warmup = schedulers.LinearLR(
            optimizer, 1 / (config.warmup_steps + 1), 1.0, total_iters=config.warmup_steps
        )
        scheduler = schedulers.SequentialLR(optimizer, [warmup, decay], [config.warmup_steps])
    rates = []
    for _ in range(total_steps + 1):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradients: nothing moves, but torch wants it before scheduler.step
        scheduler.step()
    return rates


@pytest.mark.parametrize(
    "config",
    [
        ScheduleConfig(name="constant"),
        ScheduleConfig(name="constant", warmup_steps=3),
        ScheduleConfig(name="step", decay_every_steps=4, gamma=0.5),
        ScheduleConfig(name="step", warmup_steps=5, decay_every_steps=7, gamma=0.3),
        ScheduleConfig(name="cosine"),
        ScheduleConfig(name="cosine", warmup_steps=7, min_learning_rate_fraction=0.1),
    ],
    ids=lambda config: f"{config.name}-warmup{config.warmup_steps}",
)
def test_schedules_equal_torch_lr_schedulers(config):
    total, base = 40, 0.3
    ours = [learning_rate(config, step, total, base) for step in range(total + 1)]
    # torch's cosine is recursive (each rate from the one before): rounding, not a formula, apart.
    assert ours == pytest.approx(torch_reference_rates(config, total, base), rel=1e-9, abs=1e-15)


def test_schedule_depends_only_on_its_arguments():
    """A resumed run asks for its first step with no calls before it: rates asked for in a
    shuffled order equal those asked for in order (a schedule that kept state, as torch's
    recursive schedulers do, would not)."""
    config = ScheduleConfig(name="cosine", warmup_steps=3)
    in_order = [learning_rate(config, step, 20, 0.1) for step in range(25)]
    steps = list(range(25))
    random.Random(0).shuffle(steps)
    shuffled = {step: learning_rate(config, step, 20, 0.1) for step in steps}
    assert [shuffled[step] for step in range(25)] == in_order
    assert len(set(in_order)) > 20  # a schedule that moves, so the orders could disagree


def test_set_learning_rate_applies_to_every_group_and_steps_are_checked():
    config = ScheduleConfig(name="cosine", warmup_steps=3)
    model = small_network()
    optimizer = build_optimizer(OptimizerConfig(name="sgd", learning_rate=0.1), model)
    set_learning_rate(optimizer, learning_rate(config, 0, 20, 0.1))
    assert [group["lr"] for group in optimizer.param_groups] == [pytest.approx(0.025)] * 2
    with pytest.raises(ValueError, match="step"):
        learning_rate(config, -1, 20, 0.1)
    with pytest.raises(ValueError, match="total_steps"):
        learning_rate(config, 0, 0, 0.1)


# --- config validation -------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("config_class", "data", "field"),
    [
        (ModelConfig, {"name": "vgg"}, "model.name"),
        (ModelConfig, {"widths": [8]}, "model.widths"),
        (ModelConfig, {"hidden_sizes": [16, 0]}, "model.hidden_sizes[1]"),
        (ModelConfig, {"conv_widths": []}, "model.conv_widths"),
        (ModelConfig, {"blocks_per_stage": 0}, "model.blocks_per_stage"),
        (ModelConfig, {"rnn_layers": 1.5}, "model.rnn_layers"),
        (ModelConfig, {"dropout": 1.0}, "model.dropout"),
        (OptimizerConfig, {"name": "lbfgs"}, "optimizer.name"),
        (OptimizerConfig, {"lr": 0.1}, "optimizer.lr"),
        (OptimizerConfig, {"learning_rate": 0}, "optimizer.learning_rate"),
        (OptimizerConfig, {"momentum": 1.0}, "optimizer.momentum"),
        (OptimizerConfig, {"betas": [0.9]}, "optimizer.betas"),
        (OptimizerConfig, {"betas": [0.9, 1.0]}, "optimizer.betas[1]"),
        (OptimizerConfig, {"eps": -1e-8}, "optimizer.eps"),
        (OptimizerConfig, {"weight_decay": -0.1}, "optimizer.weight_decay"),
        (OptimizerConfig, {"decay_biases_and_norms": "yes"}, "optimizer.decay_biases_and_norms"),
        (ScheduleConfig, {"name": "linear"}, "schedule.name"),
        (ScheduleConfig, {"step_size": 3}, "schedule.step_size"),
        (ScheduleConfig, {"warmup_steps": -1}, "schedule.warmup_steps"),
        (ScheduleConfig, {"decay_every_steps": 0}, "schedule.decay_every_steps"),
        (ScheduleConfig, {"gamma": 0}, "schedule.gamma"),
        (ScheduleConfig, {"min_learning_rate_fraction": 2}, "schedule.min_learning_rate_fraction"),
        (LossConfig, {"name": "hinge"}, "loss.name"),
        (LossConfig, {"label_smoothing": 0.1}, "loss.label_smoothing"),
        (LossConfig, {"l1": -1}, "loss.l1"),
        (LossConfig, {"l2": "0.1"}, "loss.l2"),
        (LossConfig, {"l2": float("nan")}, "loss.l2"),
        (LossConfig, {"penalize_biases_and_norms": 1}, "loss.penalize_biases_and_norms"),
    ],
)
def test_bad_config_values_and_unknown_keys_name_the_field(config_class, data, field):
    with pytest.raises(ValueError, match=f"^{re.escape(field)}: ") as raised:
        config_class.from_dict(data)
    assert raised.value.field == field


def test_configs_validate_on_construction_too():
    with pytest.raises(ValueError, match="^learning_rate: "):
        OptimizerConfig(learning_rate=-1.0)
    with pytest.raises(ValueError, match="^name: expected one of"):
        ModelConfig(name="vgg")


# Every field away from its default: a round trip of defaults alone would pass even if
# from_dict ignored its input.
NON_DEFAULT_CONFIGS = [
    ModelConfig(
        name="rnn", hidden_sizes=(7, 5), conv_widths=(4,), stage_widths=(8, 8, 16, 16),
        blocks_per_stage=1, rnn_hidden_size=9, rnn_layers=2, dropout=0.25,
    ),
    OptimizerConfig(
        name="rmsprop", learning_rate=0.02, momentum=0.5, betas=(0.8, 0.95), eps=1e-6,
        rmsprop_alpha=0.9, weight_decay=0.01, decay_biases_and_norms=True,
    ),
    ScheduleConfig(
        name="step", warmup_steps=3, decay_every_steps=7, gamma=0.5, min_learning_rate_fraction=0.1
    ),
    LossConfig(name="mse", l1=0.01, l2=0.02, penalize_biases_and_norms=True),
]


@pytest.mark.parametrize("config", NON_DEFAULT_CONFIGS, ids=lambda config: type(config).__name__)
def test_configs_round_trip_through_yaml(config):
    config_class = type(config)
    defaults = config_class()
    assert all(
        getattr(config, name) != getattr(defaults, name) for name in config.to_dict()
    ), "every field should differ from its default"
    data = yaml.safe_load(yaml.safe_dump(config.to_dict()))
    assert config_class.from_dict(data) == config
    assert config_class.from_dict(None) == defaults == config_class.from_dict({})


def test_from_dict_converts_lists_and_integers():
    model = ModelConfig.from_dict({"name": "mlp", "hidden_sizes": [32, 16]})
    assert model.hidden_sizes == (32, 16)
    optimizer = OptimizerConfig.from_dict({"learning_rate": 1, "betas": [0, 0.5]})
    assert optimizer.learning_rate == 1.0 and isinstance(optimizer.learning_rate, float)
    assert optimizer.betas == (0.0, 0.5)
    assert ModelConfig(name="torchvision:resnet18").name == "torchvision:resnet18"
