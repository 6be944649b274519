"""What ops drew, made visible: `explain_plan`, `augserve explain` and `augserve preview`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from augserve.cli import main
from augserve.core.plan import explain_plan, make_plan
from augserve.core.spec import AugmentSpec

SPEC = {
    "fill_mode": "nearest",
    "ops": [
        {"rotate": {"degrees": 20}},
        {"flip": {"horizontal": 0.5}},
        {"random_resized_crop": {"size": [48, 64]}},
        {"brightness": {"factor": 0.2}},
        {"cutout": {"size": 8, "holes": 2}},
    ],
}


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(SPEC))
    return path


def as_json(value: object) -> object:
    """`value` as JSON gives it back (tuples become lists)."""
    return json.loads(json.dumps(value))


def test_explain_plan_lists_each_ops_record_in_spec_order():
    spec = AugmentSpec.from_dict(SPEC)
    plan = make_plan(spec, 4, 2, 17, (375, 500), orientation=6)
    explanation = explain_plan(plan)
    assert [draw["op"] for draw in explanation["draws"]] == [op.name for op in spec.ops]
    assert [draw["record"] for draw in explanation["draws"]] == [record for _, record in plan.draws]
    assert explanation["output_size"] == [48, 64] and explanation["source_size"] == [375, 500]
    # Orientation 6 turns the 375x500 image upright to 500x375 before any op draws.
    crop = explanation["draws"][2]["record"]
    assert crop["top"] + crop["height"] <= 500 and crop["left"] + crop["width"] <= 375
    json.dumps(explanation, allow_nan=False)


def test_explain_json_holds_make_plans_draws(spec_file, capsys):
    code = main(
        [
            "explain",
            "--spec",
            str(spec_file),
            "--size",
            "375x500",
            "--samples",
            "3",
            "7-8",
            "--seed",
            "5",
            "--epoch",
            "1",
            "--orientation",
            "6",
            "--json",
        ]
    )
    assert code == 0
    document = json.loads(capsys.readouterr().out)
    spec = AugmentSpec.from_dict(SPEC)
    assert (document["seed"], document["epoch"], document["orientation"]) == (5, 1, 6)
    assert AugmentSpec.from_dict(document["spec"]) == spec
    assert [sample["sample_id"] for sample in document["samples"]] == [3, 7, 8]
    for sample in document["samples"]:
        plan = make_plan(spec, 5, 1, sample["sample_id"], (375, 500), orientation=6)
        assert sample == as_json(explain_plan(plan))


def test_explain_text_has_one_line_per_op(spec_file, capsys):
    assert main(["explain", "--spec", str(spec_file), "--size", "100x120", "--samples", "0-1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    headers = [line for line in lines if line.startswith("sample ")]
    assert headers == [line for line in lines if "100x120 -> 48x64" in line] and len(headers) == 2
    op_lines = [line.split()[0] for line in lines if line.startswith("  ")]
    assert op_lines == [next(iter(op)) for op in SPEC["ops"]] * 2
    record = make_plan(AugmentSpec.from_dict(SPEC), 0, 0, 1, (100, 120)).draws[0][1]
    assert f"angle={record['angle']:.6g}" in lines[len(SPEC["ops"]) + 3]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--size", "100"], "expected HEIGHTxWIDTH"),
        (["--size", "0x5"], "expected HEIGHTxWIDTH"),
        (["--size", "9x9", "--samples", "4-2"], "is empty"),
        (["--size", "9x9", "--samples", "x"], "expected a sample id"),
    ],
)
def test_explain_rejects_bad_sizes_and_sample_ranges(arguments, message, capsys):
    with pytest.raises(SystemExit):
        main(["explain", *arguments])
    assert message in capsys.readouterr().err


def test_preview_writes_the_draws_beside_its_picture(spec_file, tmp_path, capsys):
    output = tmp_path / "grid.png"
    assert (
        main(
            [
                "preview",
                "--spec",
                str(spec_file),
                "--backend",
                "opencv",
                "--images",
                "4",
                "--epochs",
                "2",
                "--seed",
                "3",
                "--output",
                str(output),
            ]
        )
        == 0
    )
    document = json.loads(output.with_suffix(".draws.json").read_text())
    assert document["epoch"] == 1 and document["seed"] == 3 and len(document["samples"]) == 4
    spec = AugmentSpec.from_dict(SPEC)
    for sample in document["samples"]:
        height, width = sample["source_size"]
        plan = make_plan(spec, 3, 1, sample["sample_id"], (height, width))
        assert sample == as_json(explain_plan(plan))
    assert "random_resized_crop" in capsys.readouterr().out
