"""Filter health: the dead, always-on, saturated and look-alike filters a user is told about."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from workers.analysis.health import duplicate_filters, filter_health, layer_health
from workers.analysis.stats import channel_quantiles, channel_stats
from workers.errors import SpecError


def test_a_conv_filter_with_a_very_negative_bias_before_a_relu_is_found_dead() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 6, 3, padding=1)
    assert conv.bias is not None
    with torch.no_grad():
        conv.bias[4] = -100.0
        acts = torch.relu(conv(torch.rand(40, 1, 12, 12) * 2 - 1)).numpy()
    health = layer_health(acts, block=16)
    assert health.tau == 0.0
    assert health.summary()["dead"] == [4]
    assert health.apoz[4] == 1.0
    assert (health.apoz[[0, 1, 2, 3, 5]] < 1.0).all()


def test_without_a_relu_near_zero_everywhere_counts_as_dead_and_small_responses_do_not() -> None:
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((30, 3, 4, 4))
    acts[:, 1] *= 1e-9
    acts[:, 2] *= 1e-3
    health = filter_health(channel_stats(acts))
    assert health.tau > 0
    np.testing.assert_array_equal(health.dead, [False, True, False])
    assert filter_health(channel_stats(acts), tau=0.01).dead.tolist() == [False, True, True]


def test_a_filter_positive_at_every_position_is_always_on_and_a_selective_one_is_not() -> None:
    rng = np.random.default_rng(1)
    acts = np.maximum(rng.standard_normal((50, 2, 6, 6)), 0.0)
    acts[:, 0] += 0.5
    health = layer_health(acts)
    np.testing.assert_array_equal(health.always_on, [True, False])
    np.testing.assert_allclose(health.on_rate[1], (acts[:, 1] > 0).mean())
    np.testing.assert_allclose(health.apoz, 1.0 - health.on_rate)


def test_a_relu6_filter_stuck_at_its_clip_value_is_saturated_even_in_float16() -> None:
    rng = np.random.default_rng(2)
    acts = np.clip(rng.standard_normal((20, 3, 5, 5)) * 2, 0, 6)
    acts[:, 2] = np.clip(acts[:, 2] + 10, 0, 6)
    health = layer_health(acts.astype(np.float16), clip=6.0)
    assert health.extreme_rate is not None
    assert health.extreme_rate[2] == 1.0
    assert health.extreme_rate[0] < 0.05
    np.testing.assert_array_equal(health.saturated, [False, False, True])


def test_the_share_above_the_reference_99th_percentile_shows_an_extreme_filter() -> None:
    rng = np.random.default_rng(3)
    reference = rng.standard_normal((400, 2, 3, 3))
    shifted = rng.standard_normal((400, 2, 3, 3))
    shifted[:, 1] += 3.0
    p99 = channel_quantiles(reference, 0.99)
    health = layer_health(shifted, reference_p99=p99)
    assert health.extreme_rate is not None
    assert health.extreme_rate[0] == pytest.approx(0.01, abs=0.01)
    assert health.extreme_rate[1] > 0.5
    np.testing.assert_array_equal(health.saturated, [False, True])


def test_extremes_take_either_a_reference_percentile_or_a_clip_value() -> None:
    with pytest.raises(SpecError, match="not both"):
        layer_health(np.zeros((2, 2)), reference_p99=[1.0, 1.0], clip=6.0)
    with pytest.raises(SpecError, match="share"):
        layer_health(np.zeros((2, 2)), always_on=1.5)


def test_filters_that_are_scaled_copies_of_each_other_are_near_duplicates() -> None:
    rng = np.random.default_rng(4)
    w = rng.standard_normal((6, 3, 3, 3))
    w[3] = 2.5 * w[0]
    w[5] = w[0] + 1e-3 * rng.standard_normal((3, 3, 3))
    found = duplicate_filters(w, threshold=0.95)
    assert sorted(map(tuple, found.pairs.tolist())) == [(0, 3), (0, 5), (3, 5)]
    assert found.groups == [[0, 3, 5]]
    assert found.similarity[0] == pytest.approx(1.0)
    assert (np.diff(found.similarity) <= 0).all()


def test_centring_finds_filters_that_differ_by_an_offset_as_the_display_shows_them() -> None:
    rng = np.random.default_rng(5)
    w = rng.standard_normal((4, 2, 3, 3))
    w[2] = 0.5 * w[1] + 3.0
    assert duplicate_filters(w).pairs.size == 0
    assert duplicate_filters(w, centre=True).pairs.tolist() == [[1, 2]]


def test_all_filters_identical_is_one_group_and_zero_filters_match_only_each_other() -> None:
    w = np.ones((4, 1, 2, 2))
    assert duplicate_filters(w).groups == [[0, 1, 2, 3]]
    w[2:] = 0.0
    assert duplicate_filters(w).groups == [[0, 1], [2, 3]]
    with pytest.raises(SpecError, match="at least 3 dimensions"):
        duplicate_filters(np.ones((4, 9)))
