"""Family signatures: channels a class activates consistently, with the evidence behind them."""

from __future__ import annotations

import numpy as np
import pytest

from workers.analysis.signatures import family_signatures
from workers.errors import SpecError


def _families(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Ten families of 15: each is 10% of the job, so its samples can fill the top decile.
    families = np.repeat(np.arange(10), 15)
    pooled = rng.standard_normal((150, 8))
    pooled[families == 0, 2] += 5.0
    pooled[families == 1, 5] += 5.0
    pooled[families == 1, 6] += 5.0
    return pooled.astype(np.float32), families


def test_a_channel_every_sample_of_a_family_drives_high_is_that_familys_signature() -> None:
    pooled, families = _families()
    sig = family_signatures(pooled, families)
    assert sig.families.tolist() == list(range(10))
    assert sig.n_samples.tolist() == [15] * 10
    assert sig.channels(0).tolist() == [2]
    assert sorted(sig.channels(1).tolist()) == [5, 6]
    assert sig.channels(2).size == 0
    np.testing.assert_array_equal(
        sig.threshold, np.quantile(pooled.astype(np.float64), 0.9, axis=0)
    )
    assert sig.consistent.sum() == 3


def test_shares_count_samples_above_the_reference_percentile_exactly() -> None:
    pooled = np.array([[1.0, 0.0], [3.0, 0.0], [5.0, 9.0], [7.0, 9.0]])
    reference = np.array([[2.0, 1.0], [4.0, 1.0], [6.0, 1.0]])
    sig = family_signatures(pooled, [0, 0, 1, 1], reference, q=0.5, min_share=0.5)
    # Reference medians: 4 and 1. Family 0: 1 of 2 above 4 in channel 0, none in channel 1.
    np.testing.assert_array_equal(sig.threshold, [4.0, 1.0])
    np.testing.assert_allclose(sig.share, [[0.0, 0.0], [1.0, 1.0]])
    pooled[1, 0] = 4.5
    assert family_signatures(pooled, [0, 0, 1, 1], reference, q=0.5).share[0, 0] == 0.5


@pytest.mark.parametrize("block", [1, 7, 1000])
def test_reading_in_blocks_of_any_size_gives_the_same_signatures(block: int) -> None:
    pooled, families = _families(1)
    whole = family_signatures(pooled, families, block=1000)
    parts = family_signatures(pooled, families, block=block)
    np.testing.assert_array_equal(parts.share, whole.share)
    np.testing.assert_array_equal(parts.n_samples, whole.n_samples)


def test_samples_of_unknown_family_join_no_family() -> None:
    pooled, families = _families(2)
    families[:20] = -1
    sig = family_signatures(pooled, families)
    assert sig.families.tolist() == list(range(1, 10))
    assert sig.n_samples.tolist() == [10] + [15] * 8
    with pytest.raises(SpecError, match="no family 0"):
        sig.channels(0)


def test_a_large_family_needs_a_reference_population_other_than_the_whole_job() -> None:
    rng = np.random.default_rng(3)
    families = np.repeat([0, 1], [60, 40])
    pooled = rng.standard_normal((100, 3))
    pooled[families == 0, 1] += 5.0
    # 60% of the job cannot all lie in its top decile; against the other family it does.
    assert family_signatures(pooled, families).channels(0).size == 0
    against_rest = family_signatures(pooled, families, pooled[families == 1])
    assert against_rest.channels(0).tolist() == [1]


def test_mismatched_inputs_are_user_errors() -> None:
    pooled, families = _families()
    with pytest.raises(SpecError, match="one family per sample"):
        family_signatures(pooled, families[:-1])
    with pytest.raises(SpecError, match="reference"):
        family_signatures(pooled, families, np.zeros((10, 3)))
    with pytest.raises(SpecError, match="known family"):
        family_signatures(pooled, np.full(150, -1))
