"""Comparing two populations channel by channel, and paired clean/adversarial samples."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from scipy import stats as st
from sklearn.metrics import roc_auc_score

from workers.analysis.compare import (
    auroc,
    benjamini_hochberg,
    cohen_d,
    compare,
    compare_rows,
    difference_maps,
    pair_by_id,
    paired_distances,
    welch_t,
)
from workers.analysis.stats import channel_stats
from workers.errors import SpecError

# Benjamini and Hochberg (1995), section 4: 15 p-values of a clinical trial; at q* = 0.05
# the procedure rejects the four smallest. Adjusted values: p_(i) * 15 / i, then the running
# minimum from the largest down (e.g. q_(5) = min(0.0603, 0.0695, 0.06386, ...) = 0.0603).
BH_P = [0.0001, 0.0004, 0.0019, 0.0095, 0.0201, 0.0278, 0.0298, 0.0344, 0.0459, 0.3240,
        0.4262, 0.5719, 0.6528, 0.7590, 1.0000]  # fmt: skip
BH_Q = [0.0015, 0.003, 0.0095, 0.035625, 0.0603, 0.0638571, 0.0638571, 0.0645, 0.0765, 0.486,
        0.5811818, 0.714875, 0.7532308, 0.8132143, 1.0]  # fmt: skip


def test_cohens_d_of_small_populations_matches_the_value_worked_out_by_hand() -> None:
    # A: 1, 2, 3 (mean 2, var 1); B: 4, 6, 8 (mean 6, var 4); pooled sd sqrt(2.5).
    a, b = np.array([[1.0], [2.0], [3.0]]), np.array([[4.0], [6.0], [8.0]])
    d = cohen_d(channel_stats(a), channel_stats(b))
    np.testing.assert_allclose(d, [-4.0 / np.sqrt(2.5)])


def test_welchs_t_equals_scipys_unequal_variance_test() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((30, 6)) * rng.uniform(0.5, 2, 6)
    b = rng.standard_normal((45, 6)) * 3 + np.linspace(0, 2, 6)
    t, _, p = welch_t(channel_stats(a), channel_stats(b))
    expected = st.ttest_ind(a, b, equal_var=False, axis=0)
    np.testing.assert_allclose(t, expected.statistic, rtol=1e-10)
    np.testing.assert_allclose(p, expected.pvalue, rtol=1e-8)


def test_constant_channels_give_no_difference_or_a_perfect_one_not_nan() -> None:
    a = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    b = np.array([[0.0, 2.0], [0.0, 2.0]])
    result = compare(a, b)
    np.testing.assert_array_equal(result.cohen_d, [0.0, -np.inf])
    np.testing.assert_array_equal(result.p, [1.0, 0.0])
    np.testing.assert_array_equal(result.auroc, [0.5, 0.0])


def test_benjamini_hochberg_reproduces_the_1995_papers_example_in_any_order() -> None:
    order = np.random.default_rng(1).permutation(15)
    q = benjamini_hochberg(np.array(BH_P)[order])
    np.testing.assert_allclose(q, np.array(BH_Q)[order], rtol=1e-6)
    assert np.sort(order[q <= 0.05]).tolist() == [0, 1, 2, 3]


def test_benjamini_hochberg_skips_untestable_channels() -> None:
    q = benjamini_hochberg([0.01, np.nan, 0.04])
    np.testing.assert_allclose(q, [0.02, np.nan, 0.04])


def test_per_channel_auroc_equals_sklearns_roc_auc_score_ties_included() -> None:
    rng = np.random.default_rng(2)
    a = rng.integers(0, 5, (23, 7)).astype(float) + np.arange(7) * 0.3
    b = rng.integers(0, 5, (31, 7)).astype(float)
    y = np.r_[np.ones(23), np.zeros(31)]
    expected = [roc_auc_score(y, np.r_[a[:, c], b[:, c]]) for c in range(7)]
    np.testing.assert_allclose(auroc(a, b), expected, rtol=1e-12)


class Reads:
    """A numpy array read as rows, noting the rows and bytes of each read."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values
        self.sizes: list[int] = []
        self.nbytes: list[int] = []

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def __getitem__(self, key: Any, /) -> np.ndarray:
        found: np.ndarray = self.values[key]
        self.sizes.append(found.shape[0])
        self.nbytes.append(found.nbytes)
        return found


def test_rows_compared_in_many_small_blocks_give_the_one_block_numbers_scipys_and_sklearns() -> (
    None
):
    rng = np.random.default_rng(6)
    a = np.round(rng.standard_normal((300, 37)) * 2, 1) + np.linspace(0, 1, 37)  # with ties
    b = np.round(rng.standard_normal((410, 37)) * 3, 1)
    whole = compare(a, b)
    reads_a, reads_b = Reads(a), Reads(b)
    small = compare_rows(reads_a, reads_b, budget=8_000)
    # Each read took at most a quarter of the budget, and the channels took many passes.
    assert max(reads_a.nbytes + reads_b.nbytes) <= 8_000 // 4
    assert sum(reads_a.sizes) > 10 * a.shape[0]
    for name in ("mean_a", "mean_b", "cohen_d", "t", "df", "p", "q"):
        np.testing.assert_allclose(
            getattr(small, name), getattr(whole, name), rtol=1e-12, atol=1e-12, err_msg=name
        )
    np.testing.assert_array_equal(small.auroc, whole.auroc)
    assert small.auroc_error is None
    assert whole.auroc_error is None
    y = np.r_[np.ones(300), np.zeros(410)]
    expected = [roc_auc_score(y, np.r_[a[:, c], b[:, c]]) for c in range(37)]
    np.testing.assert_allclose(small.auroc, expected, rtol=1e-12)
    welch = st.ttest_ind(a, b, equal_var=False, axis=0)
    np.testing.assert_allclose(small.t, welch.statistic, rtol=1e-10)
    np.testing.assert_allclose(small.p, welch.pvalue, rtol=1e-8)
    # A the larger population: B is held and A streams past it, as exact.
    np.testing.assert_array_equal(compare_rows(b, a, budget=8_000).auroc, compare(b, a).auroc)


def test_a_channel_too_long_to_hold_within_the_budget_gets_an_auroc_within_its_stated_bound() -> (
    None
):
    rng = np.random.default_rng(7)
    a = rng.standard_normal((3000, 5)) + np.array([0.0, 0.2, 0.5, 1.0, 3.0])
    b = rng.standard_normal((4000, 5))
    exact = compare(a, b)
    # 3000 float64 values (24 kB) of one channel do not fit in three quarters of 20 kB.
    got = compare_rows(a, b, budget=20_000)
    assert got.auroc_error is not None
    assert 0.0 < got.auroc_error.max() < 0.01
    assert (np.abs(got.auroc - exact.auroc) <= got.auroc_error).all()
    np.testing.assert_allclose(got.t, exact.t, rtol=1e-10)


def test_planted_discriminative_channels_rank_first_and_the_rest_are_left_out() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((80, 40)), rng.standard_normal((90, 40))
    a[:, 7] += 2.0
    a[:, 21] -= 1.0
    result = compare(a, b)
    assert result.ranked().tolist() == [7, 21]
    assert result.ranked(top=1).tolist() == [7]
    assert result.auroc[7] > 0.9
    assert result.auroc[21] < 0.3
    np.testing.assert_allclose(result.mean_difference, a.mean(axis=0) - b.mean(axis=0))
    assert (result.n_a, result.n_b) == (80, 90)


def test_populations_of_different_layers_or_too_few_samples_are_refused() -> None:
    with pytest.raises(SpecError, match="same layer"):
        compare(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(SpecError, match="at least 2 samples"):
        compare(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(SpecError, match="no samples"):
        compare(np.zeros((0, 3)), np.zeros((5, 3)))
    with pytest.raises(SpecError, match="pooled"):
        compare(np.zeros((5, 3, 2, 2)), np.zeros((5, 3, 2, 2)))


def test_pairs_are_matched_by_sample_id_in_the_first_populations_order() -> None:
    rows_a, rows_b = pair_by_id(["x", "y", "z", "w"], ["z", "q", "x"])
    assert rows_a.tolist() == [0, 2]
    assert rows_b.tolist() == [2, 0]
    with pytest.raises(SpecError, match="matching ids"):
        pair_by_id(["x"], ["y"])


def test_paired_distances_are_zero_for_copies_and_measure_each_pair() -> None:
    rng = np.random.default_rng(4)
    clean = rng.standard_normal((9, 3, 4, 4))
    attacked = clean.copy()
    attacked[5] += 0.5
    attacked[6] = -clean[6]
    attacked[7] = 0.0
    got = paired_distances(clean, attacked, block=4)
    assert got.cosine[[0, 1, 2, 3, 4, 8]].max() == pytest.approx(0.0, abs=1e-12)
    assert got.l2[5] == pytest.approx(0.5 * np.sqrt(48))
    assert got.cosine[6] == pytest.approx(2.0)
    assert got.cosine[7] == 1.0
    zeros = paired_distances(np.zeros((1, 2)), np.zeros((1, 2)))
    assert zeros.cosine.tolist() == [0.0]


def test_difference_maps_show_where_the_chosen_channels_of_each_pair_differ() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((4, 5, 3, 3)), rng.standard_normal((6, 5, 3, 3))
    rows_a, rows_b = np.array([3, 0]), np.array([1, 5])
    maps = difference_maps(a, b, [4, 1], rows_a, rows_b, block=1)
    assert maps.shape == (2, 2, 3, 3)
    assert maps.dtype == np.float32
    np.testing.assert_allclose(maps[0, 0], a[3, 4] - b[1, 4], rtol=1e-6)
    np.testing.assert_allclose(maps[1, 1], a[0, 1] - b[5, 1], rtol=1e-6)
    with pytest.raises(SpecError, match="channels"):
        difference_maps(a, b, [5], rows_a, rows_b)
    with pytest.raises(SpecError, match="same shape"):
        paired_distances(a, b[:, :4])
