"""Learning-rate schedules as a pure function of the optimizer step.

`learning_rate(config, step, total_steps, base_lr)` depends on nothing but its arguments, so a
resumed run needs only the step from its checkpoint, and the schedule is tested without an
optimizer. `set_learning_rate` writes the value into an optimizer's parameter groups; the
training loop calls both before every optimizer step::

    lr = learning_rate(config.schedule, step, total_steps, config.optimizer.learning_rate)
    set_learning_rate(optimizer, lr)
    optimizer.step()

A "step" is one optimizer step: one mini-batch normally, one epoch for the `gd` optimizer.

Every schedule starts with an optional linear warmup; after it the named decay runs over the
remaining `total_steps - warmup_steps` steps:

- `constant`: the base rate.
- `step`: the base rate times `gamma` once every `decay_every_steps` steps.
- `cosine`: half a cosine from the base rate down to `min_learning_rate_fraction * base_lr`,
  reached at `step == total_steps`.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Protocol

from pydantic import Field

from augserve.core.config import ConfigModel, NonNegativeInteger, Number, PositiveInteger, Text, config_dataclass, one_of
from trainer.config import registrar

# --- schedules ---------------------------------------------------------------------------------


class DecayFunction(Protocol):
    def __call__(self, config: ScheduleConfig, steps_since_warmup: int, decay_steps: int) -> float:
        """The multiplier of the base rate, in [0, 1], `steps_since_warmup` steps after warmup."""
        ...


DECAYS: dict[str, DecayFunction] = {}


register_decay = registrar("schedule", DECAYS)


@register_decay("constant")
def _constant(config: ScheduleConfig, steps_since_warmup: int, decay_steps: int) -> float:
    return 1.0


@register_decay("step")
def _step(config: ScheduleConfig, steps_since_warmup: int, decay_steps: int) -> float:
    return config.gamma ** (steps_since_warmup // config.decay_every_steps)


@register_decay("cosine")
def _cosine(config: ScheduleConfig, steps_since_warmup: int, decay_steps: int) -> float:
    progress = min(1.0, steps_since_warmup / decay_steps)
    floor = config.min_learning_rate_fraction
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@config_dataclass
class ScheduleConfig(ConfigModel):
    """How the learning rate changes with the optimizer step (see the module docstring)."""

    config_name = "schedule"

    name: Annotated[Text, one_of(DECAYS)] = Field("cosine", description="constant | step | cosine")
    warmup_steps: NonNegativeInteger = 0  # linear ramp up to the base rate, reached at step == warmup_steps
    decay_every_steps: PositiveInteger = 1000  # step: steps between two multiplications by gamma
    gamma: Annotated[Number, Field(gt=0.0, le=1.0)] = 0.1  # step: factor applied every decay_every_steps
    # cosine: final rate as a fraction of the base
    min_learning_rate_fraction: Annotated[Number, Field(ge=0.0, le=1.0)] = 0.0


def learning_rate(config: ScheduleConfig, step: int, total_steps: int, base_lr: float) -> float:
    """The learning rate for optimizer step `step` (0-based) of `total_steps`.

    Warmup (nanoGPT's): ``base_lr * (step + 1) / (warmup_steps + 1)`` for step < warmup_steps,
    rising linearly from near 0 to `base_lr` at ``step == warmup_steps``. After it the decay runs
    over ``max(1, total_steps - warmup_steps)`` steps; cosine reaches its floor at
    ``step == total_steps`` and stays there for any later step. Pure: same arguments, same value.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected an integer >= 0, got {step!r}")
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps: expected an integer >= 1, got {total_steps!r}")
    if step < config.warmup_steps:
        return base_lr * (step + 1) / (config.warmup_steps + 1)
    decay_steps = max(1, total_steps - config.warmup_steps)
    return base_lr * DECAYS[config.name](config, step - config.warmup_steps, decay_steps)


def set_learning_rate(optimizer: Any, value: float) -> None:
    """Write `value` into every parameter group of a torch optimizer (all groups share one rate)."""
    for group in optimizer.param_groups:
        group["lr"] = value
