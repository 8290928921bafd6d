"""The overlap of activation maps with Grad-CAM maps, on maps small enough to check by hand."""

from __future__ import annotations

import numpy as np

from workers.analysis.overlap import class_counts, overlap, top_channels


def test_a_channel_equal_to_the_map_correlates_1_its_negative_minus_1_a_flat_one_0() -> None:
    cam = np.array([[[0.0, 1.0], [2.0, 5.0]]])
    acts = np.stack([cam[0], -cam[0], np.full((2, 2), 3.0), 2 * cam[0] + 1])[None]
    found = overlap(acts, cam)
    np.testing.assert_allclose(found.correlation[0], [1.0, -1.0, 0.0, 1.0], atol=1e-6)


def test_iou_compares_each_maps_own_top_fifth_of_positions_above_zero() -> None:
    cam = np.zeros((1, 5, 5))
    cam[0, 0, :5] = [9, 8, 7, 6, 5]  # top 20% of 25 positions: these five
    same = cam[0].copy()
    shifted = np.zeros((5, 5))
    shifted[0, 2:5] = [9, 8, 7]
    shifted[1, 0:2] = [6, 5]  # three of five shared: IoU 3 / 7
    dead = np.zeros((5, 5))  # no positive position: an empty mask
    found = overlap(np.stack([same, shifted, dead])[None], cam)
    np.testing.assert_allclose(found.iou[0], [1.0, 3 / 7, 0.0])


def test_channels_rank_by_correlation_ties_to_the_lower_channel() -> None:
    correlation = np.array([[0.1, 0.9, 0.9, -0.5], [0.3, 0.2, 0.1, 0.4]])
    np.testing.assert_array_equal(top_channels(correlation, 2), [[1, 2], [3, 0]])


def test_class_counts_count_each_channel_in_the_top_k_of_each_class_and_skip_unknowns() -> None:
    targets = np.array([0, 0, 2, -1])
    top = np.array([[1, 2], [1, 0], [2, 1], [0, 0]])
    counts = class_counts(targets, top, classes=3, channels=3)
    np.testing.assert_array_equal(counts, [[1, 2, 1], [0, 0, 0], [0, 1, 1]])


def test_maps_agree_with_numpy_corrcoef_on_random_maps() -> None:
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((3, 6, 4, 5)).astype(np.float16)
    cams = np.abs(rng.standard_normal((3, 4, 5))).astype(np.float16)
    found = overlap(acts, cams)
    for i in range(3):
        for c in range(6):
            expected = np.corrcoef(acts[i, c].ravel().astype(np.float64), cams[i].ravel())[0, 1]
            assert abs(found.correlation[i, c] - expected) < 1e-5
