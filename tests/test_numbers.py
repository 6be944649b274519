"""A number means the number it means wherever it is typed: flags, `--set`, YAML config files,
sweep files and spaces, spec files, server config files (scientific notation included)."""

from __future__ import annotations

import math

import pytest

from augserve.cli import _server_config
from augserve.cli import build_parser as server_parser
from augserve.core.spec import AugmentSpec
from augserve.core.yamlio import load_yaml
from trainer.cli import build_parser, resolve_config
from trainer.sweep import plan_runs

FORMS = {"1e-4": 1e-4, "1E-4": 1e-4, "1.0e-4": 1e-4, "0.0001": 1e-4, "+1e-4": 1e-4, ".5e-3": 5e-4}


@pytest.mark.parametrize("text", sorted(FORMS))
def test_yaml_reads_every_float_form(text):
    assert load_yaml(text) == pytest.approx(FORMS[text])
    assert load_yaml(f"[{text}]") == [pytest.approx(FORMS[text])]


def test_yaml_keeps_the_rest_of_the_safe_schema():
    assert load_yaml("3") == 3 and isinstance(load_yaml("3"), int)
    assert load_yaml("true") is True and load_yaml("null") is None and load_yaml("abc") == "abc"
    assert math.isinf(load_yaml(".inf")) and math.isnan(load_yaml(".nan"))
    assert load_yaml("1e3") == 1000.0


def trainer_config(tmp_path, *arguments: str, config_text: str | None = None):
    argv = list(arguments)
    if config_text is not None:
        path = tmp_path / "train.yaml"
        path.write_text(config_text)
        argv = ["--config", str(path), *argv]
    return resolve_config(build_parser().parse_args(argv))


def test_scientific_notation_in_set_flags_and_files_means_the_same(tmp_path):
    by_set = trainer_config(tmp_path, "--set", "loss.l2=1e-4", "--set", "optimizer.learning_rate=3E-3")
    by_file = trainer_config(tmp_path, config_text="loss: {l2: 1e-4}\noptimizer: {learning_rate: 3E-3}\n")
    by_flag = trainer_config(tmp_path, "--l2", "1e-4", "--lr", "3e-3")
    for config in (by_set, by_file, by_flag):
        assert config.loss.l2 == pytest.approx(1e-4)
        assert config.optimizer.learning_rate == pytest.approx(3e-3)


def test_sweep_spaces_and_grids_take_scientific_notation():
    sweep = load_yaml(
        "grid: {optimizer.learning_rate: [1e-3, 1E-2]}\n"
        "random: {samples: 2, seed: 1, space: {loss.l2: {log_uniform: [1e-6, 1e-3]}}}\n"
    )
    plans = plan_runs(sweep, {"loss.l1": load_yaml("2e-5")})
    rates = [plan.config.optimizer.learning_rate for plan in plans[:2]]
    assert rates == [pytest.approx(1e-3), pytest.approx(1e-2)]
    assert all(1e-6 <= plan.config.loss.l2 <= 1e-3 for plan in plans[2:])
    assert all(plan.config.loss.l1 == pytest.approx(2e-5) for plan in plans)


def test_spec_and_server_files_take_scientific_notation(tmp_path):
    spec = AugmentSpec.from_yaml("ops: [{brightness: {factor: [9e-1, 1.1E0]}}]")
    assert spec.ops[0].values["factor"] == (pytest.approx(0.9), pytest.approx(1.1))
    config_path = tmp_path / "server.yaml"
    config_path.write_text("limits: {stall_seconds: 1.5e1, max_buffer_bytes: 1e9}\n")
    config = _server_config(server_parser().parse_args(["serve", "--config", str(config_path)]))
    assert config.limits.stall_seconds == 15.0 and config.limits.max_buffer_bytes == 10**9
