"""A sample's output depends only on (seed, epoch, sample_id): not batch size, threads or order."""

from __future__ import annotations

import numpy as np
import pytest

from augserve.backends.dali import DaliBackend
from augserve.backends.opencv import OpenCVBackend
from augserve.core.plan import make_plan, uniforms
from helpers import run_images, spec_of
from test_parity import FULL_PIPELINE

SPEC = spec_of(*FULL_PIPELINE)


def test_uniforms_are_keyed_by_seed_epoch_and_sample():
    first = uniforms(3, 1, 10, 8)
    assert np.array_equal(first, uniforms(3, 1, 10, 8))
    assert np.array_equal(uniforms(3, 1, 10, 20)[:8], first)
    for other in (uniforms(4, 1, 10, 8), uniforms(3, 2, 10, 8), uniforms(3, 1, 11, 8)):
        assert not np.array_equal(first, other)
    assert ((first >= 0) & (first < 1)).all()


def test_plans_do_not_depend_on_batching_or_order():
    together = [make_plan(SPEC, 9, 2, sample_id, (96, 96)) for sample_id in range(10)]
    reversed_order = [make_plan(SPEC, 9, 2, sample_id, (96, 96)) for sample_id in range(9, -1, -1)][::-1]
    for a, b in zip(together, reversed_order):
        alone = make_plan(SPEC, 9, 2, a.sample_id, (96, 96))
        for plan in (b, alone):
            assert np.array_equal(a.warp, plan.warp)
            assert (a.color is None and plan.color is None) or np.array_equal(a.color, plan.color)
            assert a.erase_steps == plan.erase_steps and a.source_window == plan.source_window


@pytest.fixture(scope="module")
def encoded_demo(demo_files) -> list[bytes]:
    return [path.read_bytes() for path in demo_files[::25][:32]]


def run_in_batches(backend, encoded: list[bytes], batch_size: int, seed: int) -> np.ndarray:
    parts = []
    for start in range(0, len(encoded), batch_size):
        batch = run_images(backend, SPEC, encoded[start : start + batch_size], seed=seed, epoch=1, first_id=start)
        assert list(batch.sample_ids) == list(range(start, start + len(batch.sample_ids)))
        parts.append(batch.images)
    return np.concatenate(parts)


@pytest.mark.parametrize("kind", ["opencv", "dali-cpu"])
def test_byte_identical_across_batch_sizes_and_threads(kind, encoded_demo):
    assert len(encoded_demo) == 32
    reference = None
    for threads in (1, 2):
        backend = OpenCVBackend(threads) if kind == "opencv" else DaliBackend(None, threads)
        try:
            for batch_size in (1, 7, 32):
                images = run_in_batches(backend, encoded_demo, batch_size, seed=5)
                if reference is None:
                    reference = images
                assert np.array_equal(images, reference), (threads, batch_size)
            other_seed = run_in_batches(backend, encoded_demo, 32, seed=6)
        finally:
            backend.close()
        per_sample_equal = [np.array_equal(a, b) for a, b in zip(other_seed, reference)]
        assert not any(per_sample_equal)
