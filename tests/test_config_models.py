"""The configuration models (augserve/core/config.py) of the trainer and the server: unknown keys
and bad values refused naming the dotted field, every field reachable alike by its flag, a YAML
file and `--set`, and the trainer's progress bar only on a terminal."""

from __future__ import annotations

import dataclasses
import io
from typing import Any, Callable

import pytest
import yaml

from augserve.cli import _server_config
from augserve.cli import build_parser as augserve_parser
from augserve.core.config import ConfigFlags, set_dotted
from augserve.core.errors import SpecError
from augserve.rpc.server import DatasetConfig, ServerConfig
from augserve.streaming.limits import Limits
from trainer.cli import ALIASES, SWITCHES, build_parser, resolve_config
from trainer.metrics import Progress
from trainer.models import ModelConfig
from trainer.run_config import TrainConfig

# Every trainer field away from its default (a list where the field holds a tuple).
TRAIN_VALUES: dict[str, Any] = {
    "data.endpoints": ["10.0.0.1:5000", "10.0.0.2:5000"],
    "data.dataset": "pets",
    "data.task": "segmentation",
    "data.spec": {"ops": [{"flip": {"horizontal": 0.5}}]},
    "data.spec_file": "spec.yaml",
    "data.image_size": [32, 48],
    "data.batch_size": 16,
    "data.eval_batch_size": 32,
    "data.epochs": 3,
    "data.steps_per_epoch": 7,
    "data.seed": 11,
    "data.transport": "inband",
    "data.prefetch": 2,
    "data.group_policy": "detach",
    "data.group_size": 2,
    "data.decode_group_size": 3,
    "data.eval_group_epochs": [2, 3],
    "data.validate": False,
    "data.tls_ca": "ca.pem",
    "data.tls_cert": "client.pem",
    "data.tls_key": "client.key",
    "model.name": "mlp",
    "model.hidden_sizes": [7, 5],
    "model.conv_widths": [4],
    "model.stage_widths": [8, 8],
    "model.blocks_per_stage": 1,
    "model.rnn_hidden_size": 9,
    "model.rnn_layers": 2,
    "model.dropout": 0.25,
    "optimizer.name": "sgd",
    "optimizer.learning_rate": 0.02,
    "optimizer.momentum": 0.5,
    "optimizer.betas": [0.8, 0.95],
    "optimizer.eps": 1e-6,
    "optimizer.rmsprop_alpha": 0.9,
    "optimizer.weight_decay": 0.01,
    "optimizer.decay_biases_and_norms": True,
    "schedule.name": "step",
    "schedule.warmup_steps": 3,
    "schedule.decay_every_steps": 7,
    "schedule.gamma": 0.5,
    "schedule.min_learning_rate_fraction": 0.1,
    "loss.name": "mse",
    "loss.l1": 0.01,
    "loss.l2": 0.02,
    "loss.penalize_biases_and_norms": True,
    "mixing.mixup_alpha": 0.2,
    "mixing.cutmix_alpha": 1.0,
    "mixing.probability": 0.5,
    "mixing.cutmix_share": 0.25,
    "mixing.seed": 5,
    "run.output": "runs/x",
    "run.name": "123",  # a text field takes digits as text
    "run.device": "cpu",
    "run.amp": False,
    "run.deterministic": True,
    "run.log_every": 5,
    "run.checkpoint_every": 10,
    "run.max_steps": 100,
    "run.progress": False,
    "run.threads": 2,
    "run.metrics_port": 9400,
}

SERVER_VALUES: dict[str, Any] = {
    "host": "0.0.0.0",
    "port": 6000,
    "backend": "opencv",
    "threads": 3,
    "cuda_ipc_device": 1,
    "datasets": {"pets": {"path": "/data/pets", "validation_fraction": 0.1}, "listed": "/data/list.csv"},
    "limits.max_sessions": 8,
    "limits.max_batch_size": 512,
    "limits.max_output_pixels": 1_000_000,
    "limits.max_spec_ops": 16,
    "limits.max_prefetch": 12,
    "limits.default_prefetch": 3,
    "limits.max_batch_bytes": 1 << 20,
    "limits.max_buffer_bytes": 1e9,  # YAML 1.2 reads it as a float: a whole one is an integer
    "limits.max_decoded_pixels": 10**6,
    "limits.group_window": 4,
    "limits.stall_seconds": 15.0,
    "limits.max_pause_seconds": 60.0,
    "limits.group_wait_seconds": 5.0,
    "limits.idle_session_seconds": 60.0,
    "limits.open_timeout_seconds": 5.0,
    "limits.max_pending_opens": 16,
    "limits.max_pending_opens_per_peer": 4,
    "limits.decoded_cache_bytes": 0,
    "limits.decode_share_bytes": 0,
    "grace_seconds": 2.5,
    "metrics_port": 9401,
    "metrics_host": "0.0.0.0",
    "tls_cert": "server.pem",
    "tls_key": "server.key",
    "tls_client_ca": "ca.pem",
    "token_file": "tokens.txt",
}


def command_line_text(value: Any) -> str:
    """How a user types `value` after a flag or `--set PATH=`."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def nested(path: str, value: Any) -> dict[str, Any]:
    data: dict[str, Any] = {}
    set_dotted(data, path, value)
    return data


def dotted_get(data: Any, path: str) -> Any:
    for key in path.split("."):
        data = data[key] if isinstance(data, dict) else getattr(data, key)
    return data


def train_config(*argv: str, tmp_path=None, file_data: dict | None = None) -> TrainConfig:
    arguments = list(argv)
    if file_data is not None:
        config_file = tmp_path / "train.yaml"
        config_file.write_text(yaml.safe_dump(file_data))
        arguments = ["--config", str(config_file), *arguments]
    return resolve_config(build_parser().parse_args(arguments))


def server_config(*argv: str, tmp_path=None, file_data: dict | None = None) -> ServerConfig:
    arguments = ["serve", *argv]
    if file_data is not None:
        config_file = tmp_path / "server.yaml"
        config_file.write_text(yaml.safe_dump(file_data))
        arguments += ["--config", str(config_file)]
    return _server_config(augserve_parser().parse_args(arguments))


def every_route(configure: Callable[..., Any], path: str, value: Any, tmp_path) -> list[Callable[[], Any]]:
    """`configure` (train_config or server_config) with `path` set to `value`: by the field's
    flag, by a YAML file, by --set."""
    text = command_line_text(value)
    return [
        lambda: configure("--" + path.replace("_", "-"), text),
        lambda: configure(tmp_path=tmp_path, file_data=nested(path, value)),
        lambda: configure("--set", f"{path}={text}"),
    ]


def refusals(routes: list[Callable[[], Any]]) -> list[tuple[str, str]]:
    """(field, message) of the SpecError each route raises."""
    errors = []
    for route in routes:
        with pytest.raises(SpecError) as caught:
            route()
        errors.append((caught.value.field, caught.value.message))
    return errors


# --- every field, three ways ------------------------------------------------------------------


def test_the_value_tables_cover_every_field_of_both_models():
    sections = {f"{name}.{item.name}" for name, cls in TrainConfig.SECTIONS.items() for item in dataclasses.fields(cls)}
    assert set(TRAIN_VALUES) == sections == set(ConfigFlags(TrainConfig).fields)
    server = {item.name for item in dataclasses.fields(ServerConfig) if item.name != "limits"}
    server |= {f"limits.{item.name}" for item in dataclasses.fields(Limits)}
    assert set(SERVER_VALUES) == server == set(ConfigFlags(ServerConfig).fields)


@pytest.mark.parametrize("path", sorted(TRAIN_VALUES))
def test_every_trainer_field_is_set_alike_by_flag_file_and_set(path, tmp_path):
    value = TRAIN_VALUES[path]
    by_flag, by_file, by_set = (route() for route in every_route(train_config, path, value, tmp_path))
    assert by_flag == by_file == by_set
    assert dotted_get(by_flag.to_dict(), path) == value
    assert dotted_get(by_flag, path) != dotted_get(TrainConfig(), path)
    for alias in [alias for alias, target in ALIASES.items() if target == path]:
        assert train_config(alias, command_line_text(value)) == by_flag, alias


@pytest.mark.parametrize("path", sorted(SERVER_VALUES))
def test_every_server_field_is_set_alike_by_flag_file_and_set(path, tmp_path):
    by_flag, by_file, by_set = (route() for route in every_route(server_config, path, SERVER_VALUES[path], tmp_path))
    assert by_flag == by_file == by_set
    assert dotted_get(by_flag, path) != dotted_get(server_config(), path)


# The short flags from before the generated ones, and the field each sets (README commands,
# scripts and deploy files use them).
SHORT_FLAGS = {
    "--dataset": "data.dataset", "--spec": "data.spec_file", "--batch-size": "data.batch_size",
    "--eval-batch-size": "data.eval_batch_size", "--epochs": "data.epochs", "--steps-per-epoch": "data.steps_per_epoch",
    "--seed": "data.seed", "--transport": "data.transport", "--prefetch": "data.prefetch",
    "--group-policy": "data.group_policy", "--model": "model.name", "--optimizer": "optimizer.name",
    "--lr": "optimizer.learning_rate", "--momentum": "optimizer.momentum", "--weight-decay": "optimizer.weight_decay",
    "--schedule": "schedule.name", "--warmup-steps": "schedule.warmup_steps", "--loss": "loss.name", "--l1": "loss.l1",
    "--l2": "loss.l2", "--output": "run.output", "--name": "run.name", "--device": "run.device",
    "--log-every": "run.log_every", "--checkpoint-every": "run.checkpoint_every", "--threads": "run.threads",
    "--metrics-port": "run.metrics_port",
}


@pytest.mark.parametrize("flag", sorted(SHORT_FLAGS))
def test_the_short_trainer_flags_set_their_fields(flag):
    path = SHORT_FLAGS[flag]
    config = train_config(flag, command_line_text(TRAIN_VALUES[path]))
    assert dotted_get(config.to_dict(), path) == TRAIN_VALUES[path]


def test_the_server_command_keeps_its_flags_and_its_default_port():
    config = server_config(
        "--max-sessions", "3", "--stall-seconds", "2.5", "--group-window", "2", "--decoded-cache-bytes", "0",
        "--max-batch-size", "64", "--max-prefetch", "8", "--max-buffer-bytes", "1e9",
        "--dataset", "pets=/data/pets", "--validation-fraction", "0.1", "--split-seed", "4",
    )
    limits = config.limits
    assert (limits.max_sessions, limits.stall_seconds, limits.group_window, limits.decoded_cache_bytes) == (3, 2.5, 2, 0)
    assert (limits.max_batch_size, limits.max_prefetch, limits.max_buffer_bytes) == (64, 8, 10**9)
    assert config.datasets == {"pets": DatasetConfig("/data/pets", 0.1, 4)}
    assert config.port == 50051 and ServerConfig().port == 0


def test_switches_and_the_keras_flags_still_set_their_fields():
    config = train_config(*SWITCHES, "--endpoint", "a:1", "--endpoint", "b:2", "--image-size", "24x32", "--horizontal-flip")
    assert not config.data.validate and not config.run.amp and not config.run.progress and config.run.deterministic
    assert config.data.endpoints == ("a:1", "b:2") and config.data.image_size == (24, 32)
    assert config.data.spec["ops"] == [{"flip": {"horizontal": 0.5, "vertical": 0.0}}]


def test_a_set_below_a_mapping_field_reaches_into_it():
    config = train_config("--data.spec", "{ops: [{flip: {horizontal: 0.5}}]}", "--set", "data.spec.ops.0.flip.horizontal=0.25")
    assert config.data.spec == {"ops": [{"flip": {"horizontal": 0.25}}]}


# --- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("section", sorted(TrainConfig.SECTIONS))
def test_an_unknown_key_of_every_trainer_section_is_named(section):
    with pytest.raises(SpecError) as caught:
        TrainConfig.from_dict({section: {"colour": 1}})
    assert caught.value.field == f"{section}.colour"
    assert "unknown key" in caught.value.message and str(dataclasses.fields(TrainConfig.SECTIONS[section])[0].name) in caught.value.message


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"colour": 1}, "config.colour"),
        ({"limits": {"max_session": 8}}, "config.limits.max_session"),
        ({"datasets": {"pets": {"path": "/x", "validation": 0.1}}}, "config.datasets.pets.validation"),
    ],
)
def test_an_unknown_key_of_the_server_config_is_named(data, field):
    with pytest.raises(SpecError) as caught:
        ServerConfig.from_dict(data)
    assert caught.value.field == field and "unknown key" in caught.value.message


def test_an_unknown_section_of_the_trainer_is_named():
    with pytest.raises(SpecError) as caught:
        TrainConfig.from_dict({"optimiser": {}})
    assert caught.value.field == "optimiser" and "optimizer" in caught.value.message


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("optimizer.learning_rate", "fast", "expected a number, got 'fast'"),
        ("optimizer.learning_rate", 0, "expected a value > 0.0, got 0"),
        ("data.batch_size", 1.5, "expected an integer, got 1.5"),
        ("data.eval_group_epochs", [3, 2, 0], "expected a value >= 1, got 0"),
        ("data.image_size", [32, 0], "expected a value >= 1, got 0"),
        ("data.transport", "pigeon", "expected 'auto', 'inband' or 'shared_memory', got 'pigeon'"),
        ("run.amp", "maybe", "expected true or false, got 'maybe'"),
        ("run.device", "tpu", "expected one of ['auto', 'cpu', 'cuda'] (cuda:N for one GPU), got 'tpu'"),
        ("model.name", "vgg", "expected one of ['cnn', 'linear', 'mlp', 'resnet', 'rnn', 'unet'] or 'torchvision:<name>', got 'vgg'"),
        ("mixing.probability", 2, "expected a probability in [0, 1], got 2.0"),
    ],
)
def test_a_bad_trainer_value_names_its_field_alike_by_flag_file_and_set(path, value, message, tmp_path):
    indexed = {"data.eval_group_epochs": "[2]", "data.image_size": "[1]"}.get(path, "")
    assert refusals(every_route(train_config, path, value, tmp_path)) == [(path + indexed, message)] * 3


@pytest.mark.parametrize(
    ("path", "value", "field", "message"),
    [
        ("limits.max_sessions", 0, "config.limits.max_sessions", "must be at least 1"),  # Limits' own check
        ("limits.max_sessions", "many", "config.limits.max_sessions", "expected an integer, got 'many'"),
        ("limits.default_prefetch", 99, "config.limits.default_prefetch", "is over max_prefetch 16"),
        ("port", 70000, "config.port", "expected a value <= 65535, got 70000"),
        ("datasets", {"a b": "/x"}, "config.datasets.a b", "dataset name 'a b' must be letters, digits, '-', '_' or '.'"),
    ],
)
def test_a_bad_server_value_names_its_field_alike_by_flag_file_and_set(path, value, field, message, tmp_path):
    assert refusals(every_route(server_config, path, value, tmp_path)) == [(field, message)] * 3


def test_constructors_raise_spec_errors_naming_the_field_as_declared():
    with pytest.raises(SpecError) as caught:
        DatasetConfig("/x", 1.5)  # positional arguments are named too
    assert caught.value.field == "validation_fraction"
    with pytest.raises(SpecError) as caught:
        ServerConfig(limits={"max_sessions": 0})
    assert caught.value.field == "limits.max_sessions"
    with pytest.raises(SpecError) as caught:
        dataclasses.replace(ModelConfig(), dropout=1.0)
    assert caught.value.field == "dropout"
    with pytest.raises(SpecError) as caught:
        TrainConfig().replace("run", log_every=0)
    assert caught.value.field == "run.log_every"


def test_an_alias_of_a_field_the_model_lacks_is_refused():
    with pytest.raises(ValueError, match="learning_rte"):
        ConfigFlags(TrainConfig, {"--lr": "optimizer.learning_rte"})


# --- the progress bar ---------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def draw_an_epoch(progress: Progress) -> None:
    for done in range(1, 5):
        progress.update(0, 2, done, 4, f"loss {1.0 / done:.4f}")
    progress.finish()


def test_the_progress_bar_is_drawn_on_a_terminal_only():
    terminal = Terminal()
    draw_an_epoch(Progress(True, terminal))
    assert "epoch 1/2" in terminal.getvalue() and "\r" in terminal.getvalue() and "4/4" in terminal.getvalue()
    pipe = io.StringIO()
    draw_an_epoch(Progress(True, pipe))
    assert pipe.getvalue() == ""
    switched_off = Terminal()
    draw_an_epoch(Progress(False, switched_off))
    assert switched_off.getvalue() == ""
