"""Specs: YAML/JSON round trips, every invalid-field case named, Keras conversion."""

from __future__ import annotations

import math

import pytest
import yaml

from augserve.core.errors import SpecError
from augserve.core.ops import OPS
from augserve.core.spec import MAX_OPS, AugmentSpec, eval_spec, load_spec_file

FULL_SPEC_YAML = """
fill_mode: nearest
fill_value: 12
ops:
  - rotate: {degrees: 20}
  - shift: {x: 0.1, y: [-0.2, 0.05]}
  - zoom: {range: [0.8, 1.25], independent: true}
  - shear: {degrees: 10}
  - flip: {horizontal: 0.5, vertical: 0.1}
  - crop: {size: [80, 90], mode: center}
  - resize_shorter_side: {size: 72, interpolation: nearest}
  - random_resized_crop: {size: 64, scale: [0.3, 1.0]}
  - resize: {size: [48, 56]}
  - brightness: {factor: 0.2}
  - contrast: {factor: [0.5, 1.5]}
  - saturation: {factor: 0.3}
  - hue: {degrees: 15}
  - grayscale: {p: 0.2}
  - posterize: {bits: 5}
  - solarize: {threshold: 200, p: 0.3}
  - invert: {p: 0.1}
  - autocontrast: {}
  - equalize: {p: 0.2}
  - sharpness: {factor: [0.5, 2.0]}
  - gaussian_blur: {sigma: [0.1, 1.5], p: 0.3}
  - rand_augment: {num_ops: 2, magnitude: 9}
  - trivial_augment_wide: {}
  - auto_augment: {policy: imagenet}
  - random_erasing: {p: 0.5}
  - cutout: {size: 8, holes: 3, value: 127}
"""


def test_every_registered_op_is_in_the_round_trip_spec():
    names = {next(iter(entry)) for entry in yaml.safe_load(FULL_SPEC_YAML)["ops"]}
    assert names == set(OPS)


def test_yaml_round_trip_is_stable_and_resolves_defaults():
    spec = AugmentSpec.from_yaml(FULL_SPEC_YAML)
    dumped = spec.to_yaml()
    again = AugmentSpec.from_yaml(dumped)
    assert again == spec
    assert again.to_yaml() == dumped
    data = yaml.safe_load(dumped)
    assert data["ops"][0] == {"rotate": {"degrees": [-20.0, 20.0]}}
    assert data["ops"][7]["random_resized_crop"]["ratio"] == pytest.approx([0.75, 4 / 3])
    assert data["ops"][9] == {"brightness": {"factor": [0.8, 1.2]}}
    assert data["fill_mode"] == "nearest" and data["fill_value"] == 12


def test_json_round_trip_and_spec_files(tmp_path):
    spec = AugmentSpec.from_yaml(FULL_SPEC_YAML)
    assert AugmentSpec.from_json(spec.to_json()) == spec
    (tmp_path / "a.json").write_text(spec.to_json())
    (tmp_path / "a.yaml").write_text(spec.to_yaml())
    assert load_spec_file(str(tmp_path / "a.json")) == spec == load_spec_file(str(tmp_path / "a.yaml"))


def test_output_size_is_known_from_the_spec():
    assert AugmentSpec.from_yaml(FULL_SPEC_YAML).fixed_output_size == (48, 56)
    assert AugmentSpec.from_dict({"ops": [{"rotate": {"degrees": 5}}]}).fixed_output_size is None
    assert eval_spec((64, 64)).fixed_output_size == (64, 64)


INVALID = [
    ({"ops": [{"spin": {}}]}, "ops[0]", "unknown op"),
    ({"ops": [{"rotate": {"degrees": 10, "fill": 3}}]}, "ops[0].rotate.fill", "unknown parameter"),
    ({"ops": [{"rotate": {}}]}, "ops[0].rotate.degrees", "required"),
    ({"ops": [{"rotate": {"degrees": 400}}]}, "ops[0].rotate.degrees", "[-360.0, 360.0]"),
    ({"ops": [{"rotate": {"degrees": [10, -10]}}]}, "ops[0].rotate.degrees", "greater than high"),
    ({"ops": [{"rotate": {"degrees": "ten"}}]}, "ops[0].rotate.degrees", "expected [low, high]"),
    ({"ops": [{"rotate": {"degrees": [1, 2, 3]}}]}, "ops[0].rotate.degrees", "expected [low, high]"),
    ({"ops": [{"rotate": {"degrees": [0, math.nan]}}]}, "ops[0].rotate.degrees", "expected [low, high]"),
    ({"ops": [{"rotate": {"degrees": -5}}]}, "ops[0].rotate.degrees", "half-width"),
    ({"ops": [{"flip": {"horizontal": 1.5}}]}, "ops[0].flip.horizontal", "[0.0, 1.0]"),
    ({"ops": [{"flip": {"horizontal": True}}]}, "ops[0].flip.horizontal", "expected a number"),
    ({"ops": [{"shift": {"x": 2.0}}]}, "ops[0].shift.x", "[-1.0, 1.0]"),
    ({"ops": [{"zoom": {"range": [0.0, 2.0]}}]}, "ops[0].zoom.range", "[0.05, 20.0]"),
    ({"ops": [{"zoom": {"range": 0.2, "independent": "yes"}}]}, "ops[0].zoom.independent", "true or false"),
    ({"ops": [{"shear": {"degrees": 85}}]}, "ops[0].shear.degrees", "[-80.0, 80.0]"),
    ({"ops": [{"crop": {"size": 0}}]}, "ops[0].crop.size", "[1, 8192]"),
    ({"ops": [{"crop": {"size": [10, 9000]}}]}, "ops[0].crop.size", "[1, 8192]"),
    ({"ops": [{"crop": {"size": [10.5, 3]}}]}, "ops[0].crop.size", "[height, width]"),
    ({"ops": [{"crop": {"size": 10, "mode": "middle"}}]}, "ops[0].crop.mode", "one of"),
    ({"ops": [{"random_resized_crop": {}}]}, "ops[0].random_resized_crop.size", "required"),
    ({"ops": [{"random_resized_crop": {"size": 8, "scale": [0.5, 1.2]}}]}, "ops[0].random_resized_crop.scale", "[0.0, 1.0]"),
    ({"ops": [{"resize": {"size": 8, "interpolation": "cubic"}}]}, "ops[0].resize.interpolation", "one of"),
    ({"ops": [{"resize_shorter_side": {"size": 0}}]}, "ops[0].resize_shorter_side.size", "[1, 8192]"),
    ({"ops": [{"brightness": {"factor": [0.5, 200]}}]}, "ops[0].brightness.factor", "[0.0, 100.0]"),
    ({"ops": [{"hue": {"degrees": 190}}]}, "ops[0].hue.degrees", "[-180.0, 180.0]"),
    ({"ops": [{"grayscale": {"p": -0.1}}]}, "ops[0].grayscale.p", "[0.0, 1.0]"),
    ({"ops": [{"cutout": {"size": 4, "holes": 17}}]}, "ops[0].cutout.holes", "[1, 16]"),
    ({"ops": [{"random_erasing": {"value": 256}}]}, "ops[0].random_erasing.value", "[0, 255]"),
    ({"ops": [{"flip": {}}, {"random_erasing": {}}, {"rotate": {"degrees": 3}}]}, "ops[2].rotate", "after every other op"),
    ({"ops": [{"rotate": {"degrees": 1}, "flip": {}}]}, "ops[0]", "single-key mapping"),
    ({"ops": ["rotate"]}, "ops[0]", "single-key mapping"),
    ({"ops": [{"rotate": [1, 2]}]}, "ops[0].rotate", "mapping of parameters"),
    ({"ops": {"rotate": {}}}, "ops", "list of ops"),
    ({"ops": [{"flip": {}}] * (MAX_OPS + 1)}, "ops", "over the limit"),
    ({"fill_mode": "reflect"}, "fill_mode", "one of"),
    ({"fill_value": 300}, "fill_value", "[0, 255]"),
    ({"fill_value": 1.5}, "fill_value", "[0, 255]"),
    ({"opz": []}, "opz", "unknown spec key"),
]


@pytest.mark.parametrize("data,field,text", INVALID, ids=[case[1] + ":" + case[2] for case in INVALID])
def test_invalid_fields_are_named(data, field, text):
    with pytest.raises(SpecError) as caught:
        AugmentSpec.from_dict(data)
    assert caught.value.field == field
    assert text in str(caught.value)


def test_broken_yaml_and_json_are_spec_errors():
    with pytest.raises(SpecError, match="not valid YAML"):
        AugmentSpec.from_yaml("ops: [rotate: {degrees: 3}")
    with pytest.raises(SpecError, match="not valid JSON"):
        AugmentSpec.from_json("{ops: ")
    with pytest.raises(SpecError, match="expected a mapping"):
        AugmentSpec.from_yaml("- 1\n- 2\n")


def test_keras_arguments_become_a_spec():
    spec = AugmentSpec.from_keras(
        rotation_range=20,
        width_shift_range=0.1,
        height_shift_range=0.2,
        shear_range=5,
        zoom_range=0.25,
        horizontal_flip=True,
        brightness_range=[0.7, 1.3],
        fill_mode="constant",
        cval=9,
    )
    assert spec.to_dict() == {
        "fill_mode": "constant",
        "fill_value": 9,
        "ops": [
            {"rotate": {"degrees": [-20.0, 20.0]}},
            {"shift": {"x": [-0.1, 0.1], "y": [-0.2, 0.2]}},
            {"shear": {"degrees": [-5.0, 5.0]}},
            {"zoom": {"range": [pytest.approx(0.8), pytest.approx(4 / 3)], "independent": True}},
            {"flip": {"horizontal": 0.5, "vertical": 0.0}},
            {"brightness": {"factor": [0.7, 1.3]}},
        ],
    }
    # Keras' own default fill is "nearest".
    assert AugmentSpec.from_keras(vertical_flip=True).fill_mode == "nearest"


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"rescale": 1 / 255}, "rescale"),
        ({"zca_whitening": True}, "zca_whitening"),
        ({"featurewise_center": True}, "featurewise_center"),
        ({"preprocessing_function": print}, "preprocessing_function"),
        ({"rotation_rnage": 10}, "rotation_rnage"),
        ({"fill_mode": "reflect"}, "fill_mode"),
        ({"fill_mode": "wrap"}, "fill_mode"),
        ({"width_shift_range": 12}, "width_shift_range"),
        ({"zoom_range": [1.2, 0.8]}, "zoom_range"),
        ({"horizontal_flip": "yes"}, "horizontal_flip"),
        ({"cval": 0.5}, "cval"),
        ({"rotation_range": -3}, "rotation_range"),
    ],
)
def test_unsupported_keras_arguments_are_rejected_by_name(kwargs, field):
    with pytest.raises(SpecError) as caught:
        AugmentSpec.from_keras(**kwargs)
    assert caught.value.field == field
