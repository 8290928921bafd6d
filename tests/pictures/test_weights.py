"""Display normalisation of filter weights: each filter to [0, 1] by its own min and max, so
that filters of small and large weights are seen alike."""

from __future__ import annotations

import numpy as np
import pytest

from workers.pictures.weights import normalise_filters


def test_each_filter_is_mapped_to_the_unit_interval_by_its_own_min_and_max() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3, 5, 5)) * np.arange(1, 9).reshape(8, 1, 1, 1)
    out = normalise_filters(w, over="filter")
    assert out.dtype == np.float32
    for f in range(8):
        expected = (w[f] - w[f].min()) / (w[f].max() - w[f].min())
        np.testing.assert_allclose(out[f], expected, rtol=1e-6)
        assert out[f].min() == 0.0
        assert out[f].max() == pytest.approx(1.0)


def test_layer_normalisation_keeps_filters_comparable() -> None:
    w = np.stack([np.full((1, 3, 3), 1.0), np.full((1, 3, 3), 3.0)])
    w[1, 0, 0, 0] = 5.0
    out = normalise_filters(w, over="layer")
    assert out[0].max() == 0.0
    assert out[1, 0, 0, 0] == 1.0
    np.testing.assert_allclose(out[1, 0, 1, 1], 0.5)


def test_a_constant_filter_or_layer_gives_zeros_not_nan() -> None:
    w = np.ones((4, 2, 3, 3))
    w[1] = np.arange(18).reshape(2, 3, 3)
    per_filter = normalise_filters(w, over="filter")
    assert np.isfinite(per_filter).all()
    assert (per_filter[[0, 2, 3]] == 0).all()
    assert per_filter[1].max() == 1.0
    assert (normalise_filters(np.full((2, 1, 3), 7.0), over="layer") == 0).all()


def test_conv1d_and_conv3d_weights_normalise_too() -> None:
    rng = np.random.default_rng(1)
    for shape in ((4, 2, 5), (4, 2, 3, 3, 3)):
        out = normalise_filters(rng.standard_normal(shape))
        assert out.shape == shape
        assert out.min() == 0.0
        assert out.max() == pytest.approx(1.0)


def test_something_that_is_not_a_conv_weight_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 3 dimensions"):
        normalise_filters(np.ones((10, 64)))
