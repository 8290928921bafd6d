"""The Fisher combination of screening columns (workers/analysis/combining.py)."""

from __future__ import annotations

import numpy as np
import pytest

from workers.analysis.combining import FisherCombination, families_of


def _fitted(rng: np.random.Generator) -> tuple[FisherCombination, np.ndarray]:
    """Two columns, one per family: benign copies push the first one far from clean."""
    clean = rng.standard_normal((400, 2))
    benign = np.c_[rng.normal(5.0, 1.0, 1200), rng.standard_normal(1200)]
    families = families_of(["block1", "logits"])
    combination = FisherCombination.fit(np.r_[clean, benign], families, np.ones(2, dtype=bool))
    fresh = combination.score(rng.standard_normal((2000, 2)))
    return combination, np.quantile(fresh, 0.95)


def test_being_as_far_from_clean_as_benign_copies_weighs_little_and_going_beyond_weighs_much() -> (
    None
):
    combination, clean_95 = _fitted(np.random.default_rng(0))
    like_benign = combination.score(np.array([[5.0, 0.0]]))
    attacked = combination.score(np.array([[0.0, 4.0]]))
    beyond = combination.score(np.array([[12.0, 0.0]]))
    assert like_benign[0] < clean_95 < attacked[0]
    assert beyond[0] > attacked[0]  # past every reference value, the tail keeps rising


def test_a_column_left_out_changes_nothing_and_weights_split_evenly_per_family() -> None:
    rng = np.random.default_rng(1)
    negatives = rng.standard_normal((300, 3))
    families = families_of(["conv1", "conv2", "input"])
    use = np.array([True, False, True])
    combination = FisherCombination.fit(negatives, families, use)
    x = rng.standard_normal((5, 3))
    moved = x.copy()
    moved[:, 1] += 100.0
    np.testing.assert_array_equal(combination.score(x), combination.score(moved))
    np.testing.assert_allclose(combination.weights(), [0.5, 0.0, 0.5])


def test_a_score_moves_continuously_with_float_noise_of_its_columns() -> None:
    """The same sample in another batch differs by float noise (about 1e-6 here); crossing
    a reference value must not move its score by a whole rank."""
    rng = np.random.default_rng(2)
    negatives = rng.standard_normal((40, 2))
    combination = FisherCombination.fit(
        negatives, families_of(["conv1", "logits"]), np.ones(2, bool)
    )
    at = np.sort(negatives[:, 0])[20]  # a reference value, inside the empirical range
    below, above = combination.score(np.array([[at - 1e-9, 0.0], [at + 1e-9, 0.0]]))
    assert above == pytest.approx(below, abs=1e-6)
    # It still ranks: a value past more of the reference scores higher.
    assert combination.score(np.array([[at + 0.5, 0.0]]))[0] > above
