"""`augserve-train` (also `python -m trainer`): train a model on batches from augserve servers.

    augserve-train --config train.yaml --lr 3e-4 --epochs 10
    augserve-train --endpoint 127.0.0.1:50051 --dataset demo --image-size 64 \\
        --rotation-range 20 --horizontal-flip --optimizer adam --l2 1e-4
    torchrun --nproc-per-node 2 -m trainer --config train.yaml      # data parallel

A YAML file gives defaults (sections data, model, optimizer, schedule, loss, run); flags and
`--set section.field=value` override them. Keras ImageDataGenerator flags build the spec.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from augserve.core.errors import AugserveError, SpecError
from augserve.core.keras import spec_dict_from_keras
from augserve.core.yamlio import load_yaml
from trainer.run_config import TrainConfig, set_dotted

# flag -> dotted config field; each flag's type comes from argparse below.
FLAG_FIELDS = {
    "endpoint": "data.endpoints",
    "dataset": "data.dataset",
    "spec": "data.spec_file",
    "image_size": "data.image_size",
    "batch_size": "data.batch_size",
    "eval_batch_size": "data.eval_batch_size",
    "epochs": "data.epochs",
    "steps_per_epoch": "data.steps_per_epoch",
    "seed": "data.seed",
    "transport": "data.transport",
    "prefetch": "data.prefetch",
    "group_policy": "data.group_policy",
    "model": "model.name",
    "optimizer": "optimizer.name",
    "lr": "optimizer.learning_rate",
    "momentum": "optimizer.momentum",
    "weight_decay": "optimizer.weight_decay",
    "schedule": "schedule.name",
    "warmup_steps": "schedule.warmup_steps",
    "loss": "loss.name",
    "l1": "loss.l1",
    "l2": "loss.l2",
    "output": "run.output",
    "name": "run.name",
    "device": "run.device",
    "log_every": "run.log_every",
    "checkpoint_every": "run.checkpoint_every",
    "threads": "run.threads",
    "metrics_port": "run.metrics_port",
}
KERAS_FLAGS = (
    "rotation_range", "width_shift_range", "height_shift_range", "zoom_range", "shear_range",
    "horizontal_flip", "vertical_flip", "brightness_range", "fill_mode", "cval",
)


def _image_size(text: str) -> list[int]:
    height, _, width = text.lower().partition("x")
    return [int(height), int(width or height)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="augserve-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with sections data, model, optimizer, schedule, loss, run")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override any field (YAML value)")
    parser.add_argument("--resume", help="continue from a checkpoint file or run folder")
    parser.add_argument("--log-level", default="INFO")

    data = parser.add_argument_group("data")
    data.add_argument("--endpoint", action="append", help="server host:port (repeat for several servers)")
    data.add_argument("--dataset")
    data.add_argument("--spec", help="augmentation spec file (.yaml or .json)")
    data.add_argument("--image-size", type=_image_size, help="resize to HxW (or N) first, like Keras target_size")
    data.add_argument("--batch-size", type=int)
    data.add_argument("--eval-batch-size", type=int)
    data.add_argument("--epochs", type=int)
    data.add_argument("--steps-per-epoch", type=int, help="as Keras fit(steps_per_epoch=...)")
    data.add_argument("--seed", type=int)
    data.add_argument("--transport", choices=("auto", "inband", "shared_memory"))
    data.add_argument("--prefetch", type=int)
    data.add_argument("--group-policy", choices=("lockstep", "detach", "alone"))
    data.add_argument("--no-validate", action="store_true", help="skip the validation split")

    keras = parser.add_argument_group("Keras ImageDataGenerator-style augmentation (builds the spec)")
    keras.add_argument("--rotation-range", type=float)
    keras.add_argument("--width-shift-range", type=float)
    keras.add_argument("--height-shift-range", type=float)
    keras.add_argument("--zoom-range", type=float)
    keras.add_argument("--shear-range", type=float)
    keras.add_argument("--horizontal-flip", action="store_true", default=None)
    keras.add_argument("--vertical-flip", action="store_true", default=None)
    keras.add_argument("--brightness-range", type=float, nargs=2, metavar=("LOW", "HIGH"))
    keras.add_argument("--fill-mode", choices=("constant", "nearest"))
    keras.add_argument("--cval", type=int)

    model = parser.add_argument_group("model, optimizer, loss")
    model.add_argument("--model", help="linear | mlp | cnn | resnet | rnn | torchvision:NAME")
    model.add_argument("--optimizer", help="gd | sgd | momentum | nesterov | adam | adamw | rmsprop | adagrad")
    model.add_argument("--lr", type=float, help="learning rate")
    model.add_argument("--momentum", type=float)
    model.add_argument("--weight-decay", type=float)
    model.add_argument("--schedule", help="constant | step | cosine")
    model.add_argument("--warmup-steps", type=int)
    model.add_argument("--loss", help="cross_entropy | binary_cross_entropy | mse")
    model.add_argument("--l1", type=float, help="L1 penalty coefficient")
    model.add_argument("--l2", type=float, help="L2 penalty coefficient")

    run = parser.add_argument_group("run")
    run.add_argument("--output", help="folder for config.yaml, metrics and checkpoint.pt")
    run.add_argument("--name")
    run.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    run.add_argument("--deterministic", action="store_true", default=None)
    run.add_argument("--no-amp", action="store_true")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--log-every", type=int)
    run.add_argument("--checkpoint-every", type=int, help="optimizer steps between mid-epoch checkpoints")
    run.add_argument("--threads", type=int, help="torch CPU threads")
    run.add_argument("--metrics-port", type=int, help="serve Prometheus metrics (data-wait fraction, images/s, loss) here")
    return parser


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """The YAML file, then flags, then --set overrides, validated as one TrainConfig."""
    data: dict[str, Any] = {}
    if args.config:
        with open(args.config, encoding="utf-8") as handle:
            data = load_yaml(handle) or {}
        if not isinstance(data, dict):
            raise SpecError("config", f"{args.config} must hold a mapping of sections")
    for flag, dotted in FLAG_FIELDS.items():
        value = getattr(args, flag)
        if value is not None:
            set_dotted(data, dotted, value)
    keras = {name: getattr(args, name) for name in KERAS_FLAGS if getattr(args, name) is not None}
    if keras:
        if "zoom_range" in keras:
            keras["zoom_range"] = float(keras["zoom_range"])
        set_dotted(data, "data.spec", spec_dict_from_keras(keras))
    if args.no_validate:
        set_dotted(data, "data.validate", False)
    if args.no_amp:
        set_dotted(data, "run.amp", False)
    if args.no_progress:
        set_dotted(data, "run.progress", False)
    if args.deterministic:
        set_dotted(data, "run.deterministic", True)
    for assignment in args.set:
        dotted, separator, text = assignment.partition("=")
        if not separator:
            raise SpecError("--set", f"expected SECTION.FIELD=VALUE, got {assignment!r}")
        set_dotted(data, dotted, load_yaml(text))
    return TrainConfig.from_dict(data)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from trainer.loop import train

    try:
        config = resolve_config(args)
        summary = train(config, resume=args.resume)
    except (AugserveError, ValueError) as error:
        print(f"augserve-train: {error}", file=sys.stderr)
        return 2
    if summary.epochs:
        last = summary.epochs[-1]
        print(
            f"done: {len(summary.epochs)} epochs, {summary.step} steps; last epoch train accuracy "
            f"{last['train_accuracy']:.3f}, validation accuracy {last['val_accuracy']:.3f}; outputs in {summary.output}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
