"""Grad-CAM overlays: viridis as people know it, the map where the evidence is."""

from __future__ import annotations

import numpy as np
import pytest

from workers.errors import SpecError
from workers.pictures.overlay import BLEND, colour, gradcam_sheet


def test_the_colour_map_is_matplotlibs_viridis_within_6_of_255() -> None:
    from matplotlib import colormaps  # a test dependency only: never at run time

    x = np.linspace(0.0, 1.0, 1001)
    expected = np.asarray(colormaps["viridis"](x))[:, :3] * 255.0
    assert np.abs(colour(x).astype(float) - expected).max() <= 6.0


def test_the_overlay_is_brightest_where_the_map_is_and_grey_input_shows_through() -> None:
    cam = np.zeros((7, 7), np.float16)
    cam[1, 5] = 2.0  # top right
    image = np.full((28, 28), 200, np.uint8)
    sheet = gradcam_sheet(cam, image, "a title")
    assert sheet.labels == ("input", "Grad-CAM")
    left, top, right, bottom = sheet.boxes[1]
    overlay = np.asarray(sheet.image)[top:bottom, left:right].astype(float)
    h, w = overlay.shape[:2]
    hot = overlay[int(h * 1.5 / 7), int(w * 5.5 / 7)]
    cold = overlay[int(h * 5.5 / 7), int(w * 1.5 / 7)]
    # Yellow (viridis at 1) over grey 200 is brighter in red and green than purple (at 0).
    assert hot[0] > cold[0] + 50
    assert hot[1] > cold[1] + 50
    np.testing.assert_allclose(cold, (1 - BLEND) * 200 + BLEND * colour(0.0), atol=1.0)


def test_without_the_input_the_map_is_drawn_alone() -> None:
    sheet = gradcam_sheet(np.eye(7, dtype=np.float16), None)
    assert sheet.labels == ("Grad-CAM",)


def test_a_sample_without_a_map_is_refused_with_one_line() -> None:
    with pytest.raises(SpecError, match="no Grad-CAM map"):
        gradcam_sheet(np.full((7, 7), np.nan, np.float16), None)
