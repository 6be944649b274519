"""MixUp and CutMix: drawn from (seed, epoch, position, shard) alone, with torchvision v2's
conventions and the configured frequencies; applied to tensors as the draw says; every data
loss takes the soft targets."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from augserve.core.errors import SpecError
from augserve.core.mixing import BatchMix, MixSpec, draw_mix, rolled_partners, soft_targets
from trainer.losses import LossConfig, build_loss
from trainer.mixing import MixingConfig, apply_mix

P_MIN = 1e-3
SIZE = (24, 40)
DRAWS = 4000


def many(spec: MixSpec, count: int = DRAWS, seed: int = 3) -> list[BatchMix]:
    return [draw_mix(spec, seed, 1, 16 * index, 16, SIZE) for index in range(count)]


def test_a_mix_is_a_function_of_its_key_alone():
    spec = MixSpec(mixup_alpha=0.2, cutmix_alpha=1.0)
    first = draw_mix(spec, 7, 2, 64, 16, SIZE, shard=1)
    again = draw_mix(spec, 7, 2, 64, 16, SIZE, shard=1)
    assert (first.kind, first.weight, first.box) == (again.kind, again.weight, again.box)
    others = [
        draw_mix(spec, 8, 2, 64, 16, SIZE, shard=1),
        draw_mix(spec, 7, 3, 64, 16, SIZE, shard=1),
        draw_mix(spec, 7, 2, 80, 16, SIZE, shard=1),
        draw_mix(spec, 7, 2, 64, 16, SIZE, shard=0),
    ]
    assert all(other.weight != first.weight for other in others)


def test_partners_are_the_previous_row():
    assert rolled_partners(4).tolist() == [3, 0, 1, 2]  # torchvision's roll(1, 0)


def test_mixup_weights_follow_their_beta_distribution():
    """alpha 1: uniform weights (Kolmogorov-Smirnov); alpha 0.2: mostly near 0 or 1."""
    uniform = [mix.weight for mix in many(MixSpec(mixup_alpha=1.0))]
    assert scipy.stats.kstest(uniform, "uniform").pvalue >= P_MIN
    peaked = [mix.weight for mix in many(MixSpec(mixup_alpha=0.2))]
    assert scipy.stats.kstest(peaked, scipy.stats.beta(0.2, 0.2).cdf).pvalue >= P_MIN
    assert scipy.stats.kstest(peaked, "uniform").pvalue < P_MIN  # the test tells them apart


def test_probability_and_share_set_how_often_batches_are_mixed_and_how():
    mixes = many(MixSpec(mixup_alpha=0.2, cutmix_alpha=1.0, probability=0.6, cutmix_share=0.25))
    counts = [sum(mix.kind == kind for mix in mixes) for kind in ("none", "mixup", "cutmix")]
    expected = np.array([0.4, 0.6 * 0.75, 0.6 * 0.25]) * DRAWS
    assert scipy.stats.chisquare(counts, expected).pvalue >= P_MIN, counts
    assert all(mix.weight == 1.0 for mix in mixes if mix.kind == "none")
    assert {mix.kind for mix in many(MixSpec(), 50)} == {"none"}  # both alphas 0: off
    assert draw_mix(MixSpec(cutmix_alpha=1.0), 0, 0, 0, 1, SIZE).kind == "none"  # one row


def test_cutmix_boxes_lie_inside_and_weigh_what_they_leave():
    mixes = [mix for mix in many(MixSpec(cutmix_alpha=1.0)) if mix.kind == "cutmix"]
    height, width = SIZE
    for mix in mixes:
        top, left, box_h, box_w = mix.box
        assert 0 <= top and top + box_h <= height and 0 <= left and left + box_w <= width
        assert mix.weight == pytest.approx(1 - box_h * box_w / (height * width))
    # Centres are uniform, so boxes touch every edge; unclipped boxes cover about 1 - lambda.
    assert min(mix.box[0] for mix in mixes) == 0 and max(mix.box[0] + mix.box[2] for mix in mixes) == height
    assert np.mean([mix.weight for mix in mixes]) > 0.5  # clipping only ever keeps more


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_apply_mix_blends_or_pastes_the_partner_and_its_label(kind):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((4, 3, *SIZE), generator=generator)
    labels = torch.tensor([0, 1, 2, 1])
    mix = BatchMix(kind, 0.7, rolled_partners(4), (2, 5, 10, 20) if kind == "cutmix" else None)
    if kind == "cutmix":
        mix = BatchMix(kind, 1 - 10 * 20 / (SIZE[0] * SIZE[1]), mix.partners, mix.box)
    original = images.clone()
    mixed, targets = apply_mix(images, labels, 3, mix)
    assert torch.equal(images, original)  # the input is left alone
    partner = images[[3, 0, 1, 2]]
    if kind == "mixup":
        torch.testing.assert_close(mixed, 0.7 * images + 0.3 * partner)
    else:
        inside = torch.zeros(SIZE, dtype=torch.bool)
        inside[2:12, 5:25] = True
        assert torch.equal(mixed[..., inside], partner[..., inside])
        assert torch.equal(mixed[..., ~inside], images[..., ~inside])
    expected = soft_targets(labels.numpy(), 3, mix)
    torch.testing.assert_close(targets, torch.from_numpy(expected))
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(4))
    assert targets[0, 0] == pytest.approx(mix.weight) and targets[0, 1] == pytest.approx(1 - mix.weight)


# Each data loss on soft targets t [N, C], written out.
SOFT_LOSSES = {
    "cross_entropy": lambda logits, t: -(t * logits.log_softmax(dim=1)).sum(dim=1).mean(),
    "mse": lambda logits, t: ((logits.softmax(dim=1) - t) ** 2).mean(),
    "binary_cross_entropy": lambda logits, t: -(
        t[:, 1] * torch.nn.functional.logsigmoid(logits[:, 0])
        + t[:, 0] * torch.nn.functional.logsigmoid(-logits[:, 0])
    ).mean(),
}


@pytest.mark.parametrize("name", sorted(SOFT_LOSSES))
def test_every_data_loss_takes_soft_targets(name):
    """Soft targets give the loss written out in SOFT_LOSSES; one-hot ones the hard-label loss."""
    classes = 2 if name == "binary_cross_entropy" else 3
    loss = build_loss(LossConfig(name=name))
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn((5, loss.output_size(classes)), generator=generator)
    labels = torch.tensor([0, 1, 1, 0, 1])
    one_hot = torch.nn.functional.one_hot(labels, classes).float()
    model = torch.nn.Linear(1, 1)
    torch.testing.assert_close(loss(logits, one_hot, model).data, loss(logits, labels, model).data)
    soft = torch.rand((5, classes), generator=generator)
    soft = soft / soft.sum(dim=1, keepdim=True)
    torch.testing.assert_close(loss(logits, soft, model).data, SOFT_LOSSES[name](logits, soft))


def test_the_mixing_section_names_bad_fields():
    with pytest.raises(SpecError) as raised:
        MixingConfig.from_dict({"cutmix_alpha": -1})
    assert raised.value.field == "mixing.cutmix_alpha"
    with pytest.raises(SpecError) as raised:
        MixingConfig.from_dict({"cutmix": 1.0})
    assert raised.value.field == "mixing.cutmix"
    assert not MixingConfig().enabled and MixingConfig(mixup_alpha=0.2).enabled
