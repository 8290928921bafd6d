"""Streaming per-channel statistics: what a health or comparison pass reads."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from workers.analysis.stats import (
    ChannelMoments,
    ChannelQuantiles,
    channel_quantiles,
    channel_stats,
)
from workers.errors import SpecError


def _split_points(rng: np.random.Generator, n: int) -> list[int]:
    cuts = np.sort(rng.choice(np.arange(1, n), size=rng.integers(1, 6), replace=False))
    return [0, *cuts.tolist(), n]


def test_statistics_of_a_small_array_match_the_values_worked_out_by_hand() -> None:
    # Channel 0 holds 1, 3, 5, -1 and channel 1 holds 0, -2, 0, 0 over 2 samples x 2 positions.
    x = np.array([[[1.0, 3.0], [0.0, -2.0]], [[5.0, -1.0], [0.0, 0.0]]])
    moments = ChannelMoments(2, high=2.0)
    moments.update(x)
    s = moments.result()
    assert (s.samples, s.positions) == (2, 2)
    np.testing.assert_allclose(s.mean, [2.0, -0.5])
    np.testing.assert_allclose(s.var, [5.0, 0.75])
    np.testing.assert_allclose(s.std, np.sqrt([5.0, 0.75]))
    np.testing.assert_array_equal(s.min, [-1.0, -2.0])
    np.testing.assert_array_equal(s.max, [5.0, 0.0])
    np.testing.assert_allclose(s.on_rate, [0.75, 0.0])
    assert s.high_rate is not None
    np.testing.assert_allclose(s.high_rate, [0.5, 0.0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_over_random_chunk_splits_equals_the_in_memory_result(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # A large offset is where a naive sum of squares loses every digit of the variance.
    x = (1e4 + rng.standard_normal((37, 5, 3, 4)) * rng.uniform(0.1, 3, (1, 5, 1, 1))).astype(
        np.float32
    )
    high = rng.uniform(1e4, 1e4 + 1, 5)
    moments = ChannelMoments(5, high=high)
    points = _split_points(rng, 37)
    for start, stop in zip(points[:-1], points[1:], strict=True):
        moments.update(x[start:stop])
    s = moments.result()
    v = x.astype(np.float64)
    axes = (0, 2, 3)
    assert (s.samples, s.positions) == (37, 12)
    np.testing.assert_allclose(s.mean, v.mean(axis=axes), rtol=1e-12)
    np.testing.assert_allclose(s.var, v.var(axis=axes), rtol=1e-9)
    np.testing.assert_array_equal(s.max, v.max(axis=axes))
    np.testing.assert_array_equal(s.min, v.min(axis=axes))
    assert s.high_rate is not None
    np.testing.assert_allclose(s.high_rate, (v > high.reshape(1, 5, 1, 1)).mean(axis=axes))


def test_accumulators_of_two_workers_merge_into_the_statistics_of_all_samples() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((10, 4)), rng.standard_normal((25, 4)) * 3 + 1
    first, second = ChannelMoments(4), ChannelMoments(4)
    first.update(a)
    second.update(b)
    first.merge(second)
    both = np.concatenate([a, b])
    s = first.result()
    assert s.samples == 35
    np.testing.assert_allclose(s.mean, both.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(s.var, both.var(axis=0), rtol=1e-12)
    np.testing.assert_allclose(s.on_rate, (both > 0).mean(axis=0))


def test_a_zarr_array_is_read_block_by_block_with_the_same_result() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((50, 3, 4, 4)).astype(np.float16)
    stored = zarr.create_array(store={}, shape=x.shape, chunks=(8, 3, 4, 4), dtype="float16")
    stored[:] = x
    s = channel_stats(stored, block=8)
    v = x.astype(np.float64)
    np.testing.assert_allclose(s.mean, v.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(s.var, v.var(axis=(0, 2, 3)), rtol=1e-9)


def test_blocks_of_the_wrong_layer_or_no_samples_at_all_are_refused() -> None:
    moments = ChannelMoments(3)
    with pytest.raises(SpecError, match="shape"):
        moments.update(np.zeros((2, 4, 5, 5)))
    with pytest.raises(SpecError, match="no samples"):
        moments.result()
    with pytest.raises(SpecError, match="one per channel"):
        ChannelMoments(3, high=[1.0, 2.0])


def test_quantiles_are_exact_while_the_values_fit_the_capacity() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((40, 3, 5)).astype(np.float32)
    quantiles = ChannelQuantiles(3, capacity=200)
    for start in range(0, 40, 7):
        quantiles.update(x[start : start + 7])
    values = np.moveaxis(x, 1, 0).reshape(3, -1).astype(np.float64)
    for q in (0.0, 0.5, 0.9, 0.99, 1.0):
        np.testing.assert_array_equal(quantiles.quantile(q), np.quantile(values, q, axis=1))


def test_quantiles_beyond_the_capacity_come_from_a_uniform_sample() -> None:
    rng = np.random.default_rng(6)
    # Sorted input: a reservoir that kept only early or late values would be far off.
    x = np.sort(rng.uniform(0, 1, 100_000)).reshape(-1, 1)
    p = channel_quantiles(np.stack([x, 2 * x], axis=1)[:, :, 0], 0.9, capacity=4000, block=997)
    np.testing.assert_allclose(p, [0.9, 1.8], atol=0.03)
