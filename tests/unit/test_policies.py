"""The policies (rand_augment, trivial_augment_wide, auto_augment) draw what torchvision's do.

- Magnitude tables equal torchvision's, evaluated here with torch from torchvision's own
  definitions (copied from torchvision/transforms/v2/_auto_augment.py, 0.28) to 1e-5.
- Over many samples, each sub-op, magnitude level, sign and (AutoAugment) sub-policy and firing
  occurs as often as the policy says: Pearson chi-square tests on seed-fixed draws, each
  required to have p >= P_MIN (so a correct policy fails one test in a thousand seeds, and a
  policy that drops one of 14 sub-ops, or biases a sign by 5 %, fails all of them; see
  test_a_skewed_policy_fails_the_frequency_test).
- Draws that change nothing (Identity, AutoAugment sub-ops that did not fire) leave the image
  exactly as it was on both backends; every plan of a spec has the same number of pixel steps.
- Spec rules: geometry and colour ops before pixel ops and policies; magnitude below bins.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import scipy.stats
import torch
from helpers import encode, run_images, spec_of

from augserve.backends.batch import SourceImage, augment_batch
from augserve.core.errors import SpecError
from augserve.core.ops import OPS
from augserve.core.ops.policies import (
    AUTO_AUGMENT_BINS,
    AUTO_AUGMENT_POLICIES,
    AUTO_AUGMENT_SPACE,
    PIXEL_SUB_OPS,
    RAND_AUGMENT_SPACE,
    TRIVIAL_AUGMENT_WIDE_SPACE,
    SubOp,
    magnitudes_of,
)
from augserve.core.plan import make_plan, uniforms

P_MIN = 1e-3
SIZE = (180, 240)  # (height, width) of the canvas the policies draw for
SAMPLES = 14_000

# torchvision's magnitude tables, as torchvision/transforms/v2/_auto_augment.py defines them
# (torchvision's Solarize is a fraction of 255 in v2: scaled here as _apply_image_or_video_transform
# does).
TORCHVISION_RAND_AUGMENT = {
    "Identity": (lambda num_bins, height, width: None, False),
    "ShearX": (lambda num_bins, height, width: torch.linspace(0.0, 0.3, num_bins), True),
    "ShearY": (lambda num_bins, height, width: torch.linspace(0.0, 0.3, num_bins), True),
    "TranslateX": (lambda num_bins, height, width: torch.linspace(0.0, 150.0 / 331.0 * width, num_bins), True),
    "TranslateY": (lambda num_bins, height, width: torch.linspace(0.0, 150.0 / 331.0 * height, num_bins), True),
    "Rotate": (lambda num_bins, height, width: torch.linspace(0.0, 30.0, num_bins), True),
    "Brightness": (lambda num_bins, height, width: torch.linspace(0.0, 0.9, num_bins), True),
    "Color": (lambda num_bins, height, width: torch.linspace(0.0, 0.9, num_bins), True),
    "Contrast": (lambda num_bins, height, width: torch.linspace(0.0, 0.9, num_bins), True),
    "Sharpness": (lambda num_bins, height, width: torch.linspace(0.0, 0.9, num_bins), True),
    "Posterize": (
        lambda num_bins, height, width: (8 - (torch.arange(num_bins) / ((num_bins - 1) / 4))).round().int(),
        False,
    ),
    "Solarize": (lambda num_bins, height, width: 255.0 * torch.linspace(1.0, 0.0, num_bins), False),
    "AutoContrast": (lambda num_bins, height, width: None, False),
    "Equalize": (lambda num_bins, height, width: None, False),
}
TORCHVISION_TRIVIAL_AUGMENT_WIDE = {
    "Identity": (lambda num_bins, height, width: None, False),
    "ShearX": (lambda num_bins, height, width: torch.linspace(0.0, 0.99, num_bins), True),
    "ShearY": (lambda num_bins, height, width: torch.linspace(0.0, 0.99, num_bins), True),
    "TranslateX": (lambda num_bins, height, width: torch.linspace(0.0, 32.0, num_bins), True),
    "TranslateY": (lambda num_bins, height, width: torch.linspace(0.0, 32.0, num_bins), True),
    "Rotate": (lambda num_bins, height, width: torch.linspace(0.0, 135.0, num_bins), True),
    "Brightness": (lambda num_bins, height, width: torch.linspace(0.0, 0.99, num_bins), True),
    "Color": (lambda num_bins, height, width: torch.linspace(0.0, 0.99, num_bins), True),
    "Contrast": (lambda num_bins, height, width: torch.linspace(0.0, 0.99, num_bins), True),
    "Sharpness": (lambda num_bins, height, width: torch.linspace(0.0, 0.99, num_bins), True),
    "Posterize": (
        lambda num_bins, height, width: (8 - (torch.arange(num_bins) / ((num_bins - 1) / 6))).round().int(),
        False,
    ),
    "Solarize": (lambda num_bins, height, width: 255.0 * torch.linspace(1.0, 0.0, num_bins), False),
    "AutoContrast": (lambda num_bins, height, width: None, False),
    "Equalize": (lambda num_bins, height, width: None, False),
}
TORCHVISION_AUTO_AUGMENT = {
    **{name: entry for name, entry in TORCHVISION_RAND_AUGMENT.items() if name != "Identity"},
    "Invert": (lambda num_bins, height, width: None, False),
}
# torchvision's AutoAugmentPolicy.IMAGENET, as its _get_policies lists it.
TORCHVISION_IMAGENET_POLICY = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
    (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)


@pytest.mark.parametrize(
    "space, torchvision_space",
    [
        (RAND_AUGMENT_SPACE, TORCHVISION_RAND_AUGMENT),
        (TRIVIAL_AUGMENT_WIDE_SPACE, TORCHVISION_TRIVIAL_AUGMENT_WIDE),
        (AUTO_AUGMENT_SPACE, TORCHVISION_AUTO_AUGMENT),
    ],
    ids=["rand_augment", "trivial_augment_wide", "auto_augment"],
)
@pytest.mark.parametrize("bins", [2, 10, 31, 101])
def test_magnitude_tables_are_torchvisions(space, torchvision_space, bins):
    assert list(space) == list(torchvision_space)  # the same sub-ops, in the same order
    for name, (table_of, signed) in torchvision_space.items():
        assert space[name].signed == signed, name
        expected = table_of(bins, *SIZE)
        ours = magnitudes_of(space, name, bins, SIZE)
        if expected is None:
            assert ours is None, name
        else:
            assert len(ours) == bins
            np.testing.assert_allclose(ours, expected.double().numpy(), rtol=1e-5, atol=1e-5, err_msg=name)


def test_the_imagenet_policy_is_torchvisions():
    assert AUTO_AUGMENT_POLICIES["imagenet"] == TORCHVISION_IMAGENET_POLICY
    assert {name for policy in AUTO_AUGMENT_POLICIES.values() for pair in policy for name, _, _ in pair} <= set(
        AUTO_AUGMENT_SPACE
    )
    assert all(len(policy) == 25 for policy in AUTO_AUGMENT_POLICIES.values())


# --- frequencies ------------------------------------------------------------------------------


def draws(op: dict[str, dict[str, Any]], count: int, seed: int = 5) -> list[dict[str, Any]]:
    """The op's record for `count` sample ids, drawn as make_plan draws it (Philox per sample)."""
    spec = spec_of(op)
    definition = OPS[spec.ops[0].name]
    values = spec.ops[0].values
    return [
        definition.draw(values, uniforms(seed, 0, sample_id, definition.uniforms).tolist(), SIZE)
        for sample_id in range(count)
    ]


def chi_square_p(observed: dict[Any, int], expected: dict[Any, float]) -> float:
    """Pearson's chi-square p-value of counts against expected counts (same keys)."""
    assert set(observed) <= set(expected), set(observed) - set(expected)
    keys = sorted(expected, key=repr)
    return float(
        scipy.stats.chisquare([observed.get(key, 0) for key in keys], [expected[key] for key in keys]).pvalue
    )


def assert_frequencies(observed: dict[Any, int], probabilities: dict[Any, float], what: str) -> None:
    total = sum(observed.values())
    expected = {key: probability * total for key, probability in probabilities.items()}
    assert min(expected.values()) >= 5, f"{what}: too few draws for a chi-square test"
    p_value = chi_square_p(observed, expected)
    assert p_value >= P_MIN, f"{what}: p = {p_value:.2g} < {P_MIN}; counts {dict(observed)}"


def sign_counts(pairs: Sequence[tuple[str, float]], space: dict[str, SubOp]) -> dict[tuple[str, bool], int]:
    """(sub-op, negative) counts over signed sub-ops with a non-zero magnitude."""
    return collections.Counter((name, magnitude < 0) for name, magnitude in pairs if space[name].signed and magnitude)


def assert_signs_are_fair(pairs: Sequence[tuple[str, float]], space: dict[str, SubOp], what: str) -> None:
    """Each signed sub-op is negative half the time: per sub-op chi-squares, pooled."""
    counts = sign_counts(pairs, space)
    names = {name for name, _ in counts}
    assert names, f"{what}: no signed draws"
    statistic = 0.0
    for name in names:
        negative, positive = counts[(name, True)], counts[(name, False)]
        half = (negative + positive) / 2
        assert half >= 5, f"{what}: too few draws of {name}"
        statistic += ((negative - half) ** 2 + (positive - half) ** 2) / half
    p_value = float(scipy.stats.chi2.sf(statistic, len(names)))
    assert p_value >= P_MIN, f"{what}: p = {p_value:.2g} < {P_MIN}; counts {dict(counts)}"


@pytest.mark.parametrize("num_ops, magnitude, bins", [(2, 9, 31), (3, 5, 11)])
def test_rand_augment_draws_each_pair_of_sub_ops_uniformly(num_ops, magnitude, bins):
    """Every ordered pair of the first two sub-ops is equally likely (uniform and independent),
    every sub-op of every place equally likely, magnitudes are the level's, signs fair."""
    records = draws({"rand_augment": {"num_ops": num_ops, "magnitude": magnitude, "bins": bins}}, SAMPLES)
    names = list(RAND_AUGMENT_SPACE)
    pairs = collections.Counter(tuple(record["ops"][:2]) for record in records)
    assert_frequencies(pairs, {(a, b): 1 / len(names) ** 2 for a in names for b in names}, "pairs")
    for place in range(num_ops):
        counts = collections.Counter(record["ops"][place] for record in records)
        assert_frequencies(counts, {name: 1 / len(names) for name in names}, f"place {place}")
    drawn = [pair for record in records for pair in zip(record["ops"], record["magnitudes"])]
    for name, value in drawn:
        table = magnitudes_of(RAND_AUGMENT_SPACE, name, bins, SIZE)
        assert abs(value) == (0.0 if table is None else table[magnitude]), (name, value)
    assert_signs_are_fair(drawn, RAND_AUGMENT_SPACE, "signs")


def test_trivial_augment_draws_sub_ops_levels_and_signs_uniformly():
    bins = 31
    records = draws({"trivial_augment_wide": {"bins": bins}}, SAMPLES * 2)
    names = list(TRIVIAL_AUGMENT_WIDE_SPACE)
    counts = collections.Counter(record["op"] for record in records)
    assert_frequencies(counts, {name: 1 / len(names) for name in names}, "sub-ops")
    levels: collections.Counter = collections.Counter()
    for record in records:
        table = magnitudes_of(TRIVIAL_AUGMENT_WIDE_SPACE, record["op"], bins, SIZE)
        if table is None:
            assert record["magnitude"] == 0.0
            continue
        # Posterize's and some linspace levels repeat values: count the level's index.
        matches = [index for index, value in enumerate(table) if value == abs(record["magnitude"])]
        assert matches, record
        if len(set(table)) == bins:  # every level its own value
            levels[matches[0]] += 1
    assert_frequencies(levels, {level: 1 / bins for level in range(bins)}, "levels")
    pairs = [(record["op"], record["magnitude"]) for record in records]
    assert_signs_are_fair(pairs, TRIVIAL_AUGMENT_WIDE_SPACE, "signs")


@pytest.mark.parametrize("policy", sorted(AUTO_AUGMENT_POLICIES))
def test_auto_augment_draws_sub_policies_uniformly_and_fires_with_their_probabilities(policy):
    table = AUTO_AUGMENT_POLICIES[policy]
    records = draws({"auto_augment": {"policy": policy}}, SAMPLES)
    counts = collections.Counter(record["sub_policy"] for record in records)
    assert_frequencies(counts, {index: 1 / len(table) for index in range(len(table))}, "sub-policies")
    # Firing: per (sub-policy, place), fired / not fired against its probability, pooled into one
    # chi-square (probabilities 0 and 1 are exact instead).
    statistic, dof = 0.0, 0
    for index, sub_policy in enumerate(table):
        mine = [record for record in records if record["sub_policy"] == index]
        for place, (name, probability, level) in enumerate(sub_policy):
            fired = sum(record["applied"][place] for record in mine)
            if probability in (0.0, 1.0):
                assert fired == probability * len(mine), (index, place)
                continue
            expected = np.array([probability, 1 - probability]) * len(mine)
            observed = np.array([fired, len(mine) - fired])
            statistic += float(((observed - expected) ** 2 / expected).sum())
            dof += 1
    p_value = float(scipy.stats.chi2.sf(statistic, dof))
    assert p_value >= P_MIN, f"firing: chi-square {statistic:.1f} on {dof} dof, p = {p_value:.2g}"
    pairs = []
    for record in records:
        for (name, _, level), fired, magnitude in zip(table[record["sub_policy"]], record["applied"], record["magnitudes"]):
            magnitudes = magnitudes_of(AUTO_AUGMENT_SPACE, name, AUTO_AUGMENT_BINS, SIZE)
            if fired and magnitudes is not None and level is not None:
                assert abs(magnitude) == magnitudes[level]
                pairs.append((name, magnitude))
            else:
                assert magnitude == 0.0
    assert_signs_are_fair(pairs, AUTO_AUGMENT_SPACE, "signs")


def test_a_skewed_policy_fails_the_frequency_test():
    """The frequency test has power at SAMPLES draws: one sub-op of 14 left out, or a sign 55 %
    negative, gives p far below P_MIN."""
    names = list(RAND_AUGMENT_SPACE)
    rng = np.random.default_rng(0)
    dropped = collections.Counter(names[1 + int(index)] for index in rng.integers(0, len(names) - 1, SAMPLES))
    assert chi_square_p(dropped, {name: SAMPLES / len(names) for name in names}) < P_MIN
    negative = int((rng.random(SAMPLES) < 0.55).sum())
    skewed = {("Rotate", True): negative, ("Rotate", False): SAMPLES - negative}
    assert chi_square_p(skewed, {key: SAMPLES / 2 for key in skewed}) < P_MIN


# --- what the draws do to images ---------------------------------------------------------------


def test_sub_op_kinds_become_their_stages():
    """Pixel sub-ops add their step, the others an identity step (so the count stays fixed);
    geometric ones change the warp, colour ones the colour matrix."""
    # One sub-op per sample, so that two draws cannot cancel (TranslateY up, then down).
    spec = spec_of({"rand_augment": {"num_ops": 1, "magnitude": 20}})
    stages_seen = collections.Counter()
    for sample_id in range(400):
        plan = make_plan(spec, 1, 0, sample_id, SIZE)
        record = plan.draws[0][1]
        assert len(plan.pixel_steps) == 1
        for name, step in zip(record["ops"], plan.pixel_steps):
            is_pixel = name in PIXEL_SUB_OPS and step.kind != "identity"
            assert is_pixel == (name in PIXEL_SUB_OPS), (name, step)
            stages_seen[step.kind] += 1
        geometric = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"} & set(record["ops"])
        colour = {"Brightness", "Color", "Contrast"} & set(record["ops"])
        assert (not np.array_equal(plan.warp, np.eye(2, 3))) == bool(geometric), record
        assert (plan.color is not None) == bool(colour), record
    assert set(stages_seen) == {"identity", "posterize", "solarize", "autocontrast", "equalize", "sharpness"}


NEUTRAL_DRAWS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "rand_augment": lambda record: set(record["ops"]) == {"Identity"},
    "trivial_augment_wide": lambda record: record["op"] == "Identity",
    "auto_augment": lambda record: not any(record["applied"]),
}


@pytest.mark.parametrize(
    "op",
    [
        {"rand_augment": {"num_ops": 1}},
        {"trivial_augment_wide": {}},
        {"auto_augment": {"policy": "svhn"}},
    ],
    ids=lambda op: next(iter(op)),
)
def test_draws_that_change_nothing_leave_the_image_alone(backend, photos, op):
    """Identity draws (AutoAugment: nothing fired) give the input back, byte for byte."""
    name = next(iter(op))
    spec = spec_of(op)
    image = photos["chelsea"]
    neutral = [
        sample_id
        for sample_id in range(400)
        if NEUTRAL_DRAWS[name](make_plan(spec, 0, 0, sample_id, image.shape[:2]).draws[0][1])
    ][:4]
    assert len(neutral) >= 2, "too few neutral draws to check"
    for sample_id in neutral:
        batch = run_images(backend, spec, [encode(image)], first_id=sample_id)
        assert np.array_equal(batch.images[0], image), (name, sample_id)


# --- spec rules --------------------------------------------------------------------------------


@pytest.mark.parametrize("pixel_op", [{"rand_augment": {}}, {"equalize": {}}])
@pytest.mark.parametrize("later", [{"rotate": {"degrees": 10}}, {"brightness": {"factor": 0.2}}])
def test_geometry_and_colour_ops_must_come_before_the_pixel_stage(pixel_op, later):
    with pytest.raises(SpecError) as raised:
        spec_of(pixel_op, later)
    assert raised.value.field == f"ops[1].{next(iter(later))}"
    assert next(iter(pixel_op)) in raised.value.message
    spec_of(later, pixel_op, {"posterize": {}}, {"random_erasing": {}})  # the allowed order


def test_rand_augment_magnitude_must_be_a_level_of_its_table():
    with pytest.raises(SpecError) as raised:
        spec_of({"rand_augment": {"magnitude": 10, "bins": 10}})
    assert raised.value.field == "ops[0].rand_augment.magnitude"
    spec_of({"rand_augment": {"magnitude": 9, "bins": 10}})


def test_policies_are_keyed_by_sample_only():
    """A policy's draws for a sample do not depend on which other samples were drawn before."""
    spec = spec_of({"trivial_augment_wide": {}}, {"auto_augment": {}})
    alone = make_plan(spec, 3, 2, 77, SIZE).draws
    for sample_id in range(50):
        make_plan(spec, 3, 2, sample_id, SIZE)
    assert make_plan(spec, 3, 2, 77, SIZE).draws == alone
    assert math.isfinite(alone[0][1]["magnitude"])


def test_a_sample_does_not_depend_on_its_batch(backend, photos):
    """The same samples in one batch, one at a time and in reverse order give the same bytes
    (DALI's conditionals split and merge each batch by the samples' step kinds)."""
    spec = spec_of(
        {"random_resized_crop": {"size": 48}},
        {"rand_augment": {"num_ops": 2, "magnitude": 12}},
        {"auto_augment": {}},
    )
    images = [encode(image) for image in photos.values()] * 3
    together = run_images(backend, spec, images, seed=4).images
    alone = [run_images(backend, spec, [data], seed=4, first_id=index).images[0] for index, data in enumerate(images)]
    assert all(np.array_equal(together[index], image) for index, image in enumerate(alone))
    order = list(reversed(range(len(images))))
    reversed_batch = augment_batch(
        backend, spec, 4, 0, [SourceImage(index, 0, f"image-{index}", images[index]) for index in order]
    )
    assert reversed_batch.sample_ids.tolist() == order
    assert all(np.array_equal(together[index], image) for index, image in zip(order, reversed_batch.images))
