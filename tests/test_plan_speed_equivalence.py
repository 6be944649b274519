"""`uniforms` re-keys one Philox generator per thread the fast way (`plan._PhiloxStream`); the numbers must stay
those of the plain `Philox(key=...)` construction, or every stored plan would change."""

from __future__ import annotations

import numpy as np
import pytest

from augserve.core.plan import MAX_EPOCH, MAX_SAMPLE_ID, MAX_SEED, uniforms


@pytest.mark.parametrize(
    ("seed", "epoch", "sample_id"),
    [(0, 0, 0), (3, 1, 10), (2**62 + 5, 7, 2**33 + 1), (MAX_SEED, MAX_EPOCH, MAX_SAMPLE_ID)],
)
def test_uniforms_are_the_philox_stream_keyed_by_seed_epoch_and_sample(seed, epoch, sample_id):
    key = np.array([seed, (epoch << 40) | sample_id], dtype=np.uint64)
    expected = np.random.Generator(np.random.Philox(key=key)).random(101)
    assert np.array_equal(uniforms(seed, epoch, sample_id, 101), expected)
