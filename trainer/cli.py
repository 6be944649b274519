"""`augserve-train` (also `python -m trainer`): train a model on batches from augserve servers.

    augserve-train --config train.yaml --lr 3e-4 --epochs 10
    augserve-train --endpoint 127.0.0.1:50051 --dataset demo --image-size 64 \\
        --rotation-range 20 --horizontal-flip --optimizer adam --l2 1e-4
    augserve-train --config train.yaml --optimizer.betas "[0.9, 0.95]" --set model.dropout=0.1
    torchrun --nproc-per-node 2 -m trainer --config train.yaml      # data parallel

A YAML file gives defaults (sections data, model, optimizer, schedule, loss, mixing, run);
flags and then `--set section.field=value` override them. Every field has a flag, its dotted
name with dashes (`--optimizer.learning-rate`); the usual ones also have a short one (`--lr`).
A flag's or --set's value is YAML (`[64, 32]`, `true`, `1e-4`), except that a text field
takes the text as it is. Keras ImageDataGenerator flags build the spec.
"""

from __future__ import annotations

import argparse
import logging
import sys

from augserve.core.config import ConfigFlags, read_config_file, set_dotted
from augserve.core.errors import AugserveError
from augserve.core.keras import spec_dict_from_keras
from trainer.run_config import TrainConfig

# Short flags beside the generated ones (README commands and scripts use them).
ALIASES = {
    "--dataset": "data.dataset",
    "--spec": "data.spec_file",
    "--batch-size": "data.batch_size",
    "--eval-batch-size": "data.eval_batch_size",
    "--epochs": "data.epochs",
    "--steps-per-epoch": "data.steps_per_epoch",
    "--seed": "data.seed",
    "--transport": "data.transport",
    "--prefetch": "data.prefetch",
    "--group-policy": "data.group_policy",
    "--model": "model.name",
    "--optimizer": "optimizer.name",
    "--lr": "optimizer.learning_rate",
    "--momentum": "optimizer.momentum",
    "--weight-decay": "optimizer.weight_decay",
    "--schedule": "schedule.name",
    "--warmup-steps": "schedule.warmup_steps",
    "--loss": "loss.name",
    "--l1": "loss.l1",
    "--l2": "loss.l2",
    "--output": "run.output",
    "--name": "run.name",
    "--device": "run.device",
    "--log-every": "run.log_every",
    "--checkpoint-every": "run.checkpoint_every",
    "--threads": "run.threads",
    "--metrics-port": "run.metrics_port",
}
# Switches that set one field to one value.
SWITCHES = {
    "--no-validate": ("data.validate", False),
    "--no-amp": ("run.amp", False),
    "--no-progress": ("run.progress", False),
    "--deterministic": ("run.deterministic", True),
}
FLAGS = ConfigFlags(TrainConfig, ALIASES)
KERAS_FLAGS = (
    "rotation_range", "width_shift_range", "height_shift_range", "zoom_range", "shear_range",
    "horizontal_flip", "vertical_flip", "brightness_range", "fill_mode", "cval",
)


def _image_size(text: str) -> list[int]:
    height, _, width = text.lower().partition("x")
    return [int(height), int(width or height)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="augserve-train", usage="%(prog)s [--config FILE] [--FLAG VALUE ...] [--set SECTION.FIELD=VALUE ...]",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file with sections data, model, optimizer, schedule, loss, mixing, run")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override any field (YAML value)")
    parser.add_argument("--resume", help="continue from a checkpoint file or run folder")
    parser.add_argument("--log-level", default="INFO")

    groups = FLAGS.add_to(parser)
    groups["data"].add_argument("--endpoint", action="append", help="server host:port (repeat for several servers)")
    groups["data"].add_argument("--image-size", type=_image_size, help="resize to HxW (or N) first, like Keras target_size")
    for flag, (dotted, value) in SWITCHES.items():
        groups[dotted.partition(".")[0]].add_argument(flag, action="store_true", help=f"{dotted}: {str(value).lower()}")

    keras = parser.add_argument_group("Keras ImageDataGenerator-style augmentation (builds data.spec)")
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
    return parser


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """The YAML file, then flags, then --set overrides, validated as one TrainConfig."""
    data = read_config_file(args.config)
    FLAGS.apply(data, args)
    if args.endpoint:
        set_dotted(data, "data.endpoints", args.endpoint)
    if args.image_size:
        set_dotted(data, "data.image_size", args.image_size)
    keras = {name: getattr(args, name) for name in KERAS_FLAGS if getattr(args, name) is not None}
    if keras:
        if "zoom_range" in keras:
            keras["zoom_range"] = float(keras["zoom_range"])
        set_dotted(data, "data.spec", spec_dict_from_keras(keras))
    for flag, (dotted, value) in SWITCHES.items():
        if getattr(args, flag[2:].replace("-", "_")):
            set_dotted(data, dotted, value)
    FLAGS.apply_assignments(data, args.set)
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
