"""A sample's output depends only on (seed, epoch, sample_id): not batch size, threads or order."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import pytest

from augserve.backends.base import Backend
from augserve.backends.batch import SourceImage, augment_batch
from augserve.backends.dali import DaliBackend
from augserve.backends.opencv import OpenCVBackend
from augserve.core.plan import SamplePlan, make_plan, uniforms
from helpers import spec_of
from test_parity import FULL_PIPELINE

SPEC = spec_of(*FULL_PIPELINE)
SAMPLES = 32
# Orders to request the samples in: none of them is another with batch boundaries moved.
IN_ORDER = list(range(SAMPLES))
REVERSED = IN_ORDER[::-1]
SHUFFLED = random.Random(3).sample(IN_ORDER, SAMPLES)


def test_uniforms_are_keyed_by_seed_epoch_and_sample():
    first = uniforms(3, 1, 10, 8)
    assert np.array_equal(first, uniforms(3, 1, 10, 8))
    assert np.array_equal(uniforms(3, 1, 10, 20)[:8], first)
    for other in (uniforms(4, 1, 10, 8), uniforms(3, 2, 10, 8), uniforms(3, 1, 11, 8)):
        assert not np.array_equal(first, other)
    assert ((first >= 0) & (first < 1)).all()


def plan_numbers(plan: SamplePlan) -> tuple:
    """Everything a backend reads from a plan, in comparable form."""
    color = None if plan.color is None else plan.color.tobytes()
    return (plan.sample_id, plan.output_size, plan.warp.tobytes(), color, plan.erase_steps, plan.pixel_steps, plan.source_window)


def test_plans_do_not_depend_on_order_or_on_other_draws():
    """Each sample's plan drawn first and alone equals its plan drawn in a shuffled order between
    draws of other seeds, epochs and image sizes; and plans differ between samples, seeds and
    epochs (so a plan that ignored its key could not pass)."""
    alone = {sample_id: plan_numbers(make_plan(SPEC, 9, 2, sample_id, (96, 96))) for sample_id in range(20)}
    interleaved = {}
    for sample_id in random.Random(5).sample(range(20), 20):
        make_plan(SPEC, 10, 2, sample_id, (96, 96))
        interleaved[sample_id] = plan_numbers(make_plan(SPEC, 9, 2, sample_id, (96, 96)))
        make_plan(SPEC, 9, 3, 19 - sample_id, (61, 83), orientation=6)
    assert interleaved == alone
    warps = {numbers[2] for numbers in alone.values()}
    assert len(warps) == 20
    for other_key in ((10, 2), (9, 3)):
        other = plan_numbers(make_plan(SPEC, *other_key, 4, (96, 96)))
        assert other[2] != alone[4][2], other_key


@pytest.fixture(scope="module")
def encoded_demo(demo_files) -> list[bytes]:
    encoded = [path.read_bytes() for path in demo_files[::25][:SAMPLES]]
    assert len(encoded) == SAMPLES
    return encoded


def augment_in_order(
    backend: Backend, encoded: list[bytes], order: Sequence[int], batch_size: int, seed: int
) -> dict[int, np.ndarray]:
    """Augment the samples `order` names, in that order and in batches of `batch_size`; each
    sample's [H, W, 3] uint8 output by sample id."""
    outputs: dict[int, np.ndarray] = {}
    for start in range(0, len(order), batch_size):
        ids = order[start : start + batch_size]
        sources = [SourceImage(sample_id, 0, f"image-{sample_id}", encoded[sample_id]) for sample_id in ids]
        batch = augment_batch(backend, SPEC, seed, 1, sources)
        assert list(batch.sample_ids) == list(ids), batch.skipped
        outputs.update(zip(ids, batch.images))
    return outputs


@pytest.mark.parametrize("kind", ["opencv", "dali-cpu"])
def test_byte_identical_across_batch_sizes_threads_and_orders(kind, encoded_demo):
    """One sample at a time in order on one thread is the reference; batches of 7 in reverse and
    one batch of all in a shuffled order, on one and on two threads, give every sample the same
    bytes. Another seed gives every sample other bytes."""
    reference = None
    runs = {}
    for threads in (1, 2):
        backend = OpenCVBackend(threads) if kind == "opencv" else DaliBackend(None, threads)
        try:
            if reference is None:
                reference = augment_in_order(backend, encoded_demo, IN_ORDER, 1, seed=5)
                other_seed = augment_in_order(backend, encoded_demo, SHUFFLED, 7, seed=6)
            runs[threads, 7, "reversed"] = augment_in_order(backend, encoded_demo, REVERSED, 7, seed=5)
            runs[threads, SAMPLES, "shuffled"] = augment_in_order(backend, encoded_demo, SHUFFLED, SAMPLES, seed=5)
        finally:
            backend.close()
    for run, outputs in runs.items():
        differing = [sample_id for sample_id in IN_ORDER if not np.array_equal(outputs[sample_id], reference[sample_id])]
        assert not differing, (run, differing)
    assert not any(np.array_equal(other_seed[sample_id], reference[sample_id]) for sample_id in IN_ORDER)
