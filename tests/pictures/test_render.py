"""The PNG renderers: pictures that decode, tiles normalised one by one, bounded sizes."""

from __future__ import annotations

import io
import re
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from workers.errors import SpecError
from workers.pictures.charts import (
    NEGATIVE,
    POSITIVE,
    bar_chart,
    difference_sheet,
    nice_ticks,
    score_histogram,
    signed_colours,
)
from workers.pictures.render import (
    MAX_SIDE,
    MAX_TILES,
    MIN_TILE,
    Sheet,
    activation_grid,
    activation_sheet,
    filter_grid,
    filter_sheet,
)


def _decode(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as picture:
        assert picture.format == "PNG"
        return np.asarray(picture.convert("RGB"))


def _tiles(sheet: Sheet) -> list[np.ndarray]:
    """Each tile's pixels, cut from the decoded PNG (not from the in-memory image)."""
    pixels = _decode(sheet.png())
    return [pixels[top:bottom, left:right] for left, top, right, bottom in sheet.boxes]


def _maps(channels: int, size: int = 7, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((channels, size, size)).astype(np.float32)


def test_an_activation_grid_decodes_with_the_input_beside_the_tiles() -> None:
    image = np.zeros((28, 28), np.uint8)
    image[10:18, 10:18] = 255
    png = activation_grid(_maps(16), image, title="conv1 of 3/0001.png")
    pixels = _decode(png)
    sheet = activation_sheet(_maps(16), image, title="conv1 of 3/0001.png")
    assert pixels.shape[:2] == (sheet.image.height, sheet.image.width)
    first_tile_left = min(box[0] for box in sheet.boxes)
    left_panel = pixels[:, :first_tile_left]
    assert (left_panel == 255).all(axis=-1).any()  # the input's white square is drawn
    assert (left_panel == 0).all(axis=-1).sum() > 28 * 28  # and its black background, enlarged


def test_each_tile_spans_black_to_white_on_its_own_scale_and_a_constant_one_is_black() -> None:
    acts = _maps(6) * (10.0 ** np.arange(6))[:, None, None]  # scales from 1 to 100 000
    acts[2] = 3.5  # constant
    acts[4] = -np.linspace(0, 1, 49).reshape(7, 7) - 1e3  # negative only
    tiles = _tiles(activation_sheet(acts, scale="tile"))
    for channel, tile in enumerate(tiles):
        gray = tile[..., 0]
        assert (tile == gray[..., None]).all(), "activation tiles are grayscale"
        if channel == 2:
            assert gray.max() == 0
        else:
            assert (gray.min(), gray.max()) == (0, 255)


def test_a_nearly_silent_channel_is_dark_on_the_layers_scale_and_bright_on_its_own() -> None:
    acts = _maps(3)
    acts[1] *= 1e-3  # a thousand times weaker than its neighbours
    layer = _tiles(activation_sheet(acts))
    tile = _tiles(activation_sheet(acts, scale="tile"))
    assert layer[1].max() <= 1
    assert max(layer[0].max(), layer[2].max()) == 255
    assert tile[0].max() == tile[1].max() == tile[2].max() == 255


def test_the_layers_scale_is_drawn_as_a_bar_under_the_title_and_said_in_the_note() -> None:
    layer = activation_sheet(_maps(3), title="conv1")
    tile = activation_sheet(_maps(3), title="conv1", scale="tile")
    assert layer.boxes[0][1] > tile.boxes[0][1]  # the tiles start below the bar
    pixels = _decode(layer.png())
    bar = pixels[layer.boxes[0][1] - 12 - 40 : layer.boxes[0][1] - 12, 4:164, 0]
    assert bar.min() < 20
    assert bar.max() > 235
    given = _tiles(activation_sheet(_maps(3), span=(0.0, 1000.0)))
    assert max(t.max() for t in given) < 128  # a wider span given: every tile darker


def test_a_failed_sample_of_nan_draws_black_instead_of_failing() -> None:
    acts = np.full((3, 5, 5), np.nan, np.float32)
    acts[1, 0, 0], acts[1, 1, 1] = 1.0, 2.0
    tiles = _tiles(activation_sheet(acts, scale="tile"))
    assert tiles[0].max() == 0
    assert tiles[1].max() == 255


def test_tiles_are_labelled_with_the_layers_own_channel_indices() -> None:
    sheet = activation_sheet(_maps(3), channel_ids=[5, 17, 300])
    assert sheet.labels == ("5", "17", "300")
    pixels = _decode(sheet.png())
    for left, top, right, _ in sheet.boxes:
        strip = pixels[top - 12 : top, left:right]
        assert (strip < 128).any(), "a label is drawn above each tile"


def test_top_n_draws_the_strongest_channels_by_mean_activation_first() -> None:
    acts = _maps(10) + np.arange(10, dtype=np.float32)[:, None, None]
    acts[3] += 100.0
    sheet = activation_sheet(acts, top=3)
    assert sheet.labels == ("3", "9", "8")
    assert "top 3 of 10 channels" in sheet.note


def test_tiny_maps_are_enlarged_by_nearest_neighbour_to_the_minimum_tile() -> None:
    sheet = activation_sheet(_maps(4, size=7))
    left, top, right, bottom = sheet.boxes[0]
    assert right - left >= MIN_TILE
    assert (right - left) % 7 == 0
    tile = _tiles(sheet)[0][..., 0]
    factor = (right - left) // 7
    blocks = tile.reshape(7, factor, 7, factor)
    assert (blocks == blocks[:, :1, :, :1]).all(), "each value is one flat square"


@pytest.mark.parametrize(("channels", "size"), [(512, 28), (2048, 7), (256, 300)])
def test_the_size_caps_hold_whatever_the_layer_width(channels: int, size: int) -> None:
    acts = np.random.default_rng(1).random((channels, size, size), dtype=np.float32)
    sheet = activation_sheet(
        acts.astype(np.float16), np.zeros((224, 224, 3), np.uint8), scale="tile"
    )
    assert len(sheet.boxes) == min(channels, MAX_TILES)
    assert max(sheet.image.size) <= MAX_SIDE
    if channels > MAX_TILES:
        assert f"at most {MAX_TILES} tiles" in sheet.note
    tiles = _tiles(sheet)
    assert all(t.min() == 0 and t.max() == 255 for t in tiles)


def test_a_smaller_side_limit_shrinks_the_tiles_to_fit() -> None:
    sheet = activation_sheet(_maps(64, size=224), max_side=1024)
    assert max(sheet.image.size) <= 1024
    assert len(sheet.boxes) == 64


def test_a_first_layer_with_three_inputs_is_drawn_in_colour_normalised_per_filter() -> None:
    weights = np.random.default_rng(2).standard_normal((8, 3, 5, 5)).astype(np.float32)
    weights[5] = 0.25
    sheet = filter_sheet(weights)
    assert "RGB" in sheet.note
    for index, tile in enumerate(_tiles(sheet)):
        if index == 5:
            assert tile.max() == 0, "a constant filter draws black"
        else:
            assert (tile.min(), tile.max()) == (0, 255)
            assert not (tile[..., 0] == tile[..., 1]).all(), "colour, not grey"


def test_deeper_filters_are_the_mean_over_inputs_or_one_chosen_input() -> None:
    rng = np.random.default_rng(3)
    weights = rng.standard_normal((4, 16, 3, 3)).astype(np.float32)
    mean_tiles = _tiles(filter_sheet(weights))
    assert all((t[..., 0] == t[..., 1]).all() for t in mean_tiles), "grey tiles"
    chosen = _tiles(filter_sheet(weights, input_channel=7))[1][..., 0]
    factor = chosen.shape[0] // 3
    expected = weights[1, 7]
    expected = np.rint((expected - expected.min()) / np.ptp(expected) * 255)
    assert (chosen[::factor, ::factor] == expected).all()


def test_per_layer_normalisation_keeps_filters_comparable() -> None:
    weights = np.stack(
        [np.linspace(0, 1, 9).reshape(1, 3, 3), np.linspace(0, 2, 9).reshape(1, 3, 3)]
    )
    weak, strong = _tiles(filter_sheet(weights, over="layer"))
    assert strong.max() == 255
    assert weak.max() == 128
    assert all(t.max() == 255 for t in _tiles(filter_sheet(weights, over="filter")))


def test_a_filter_grid_is_png_bytes_and_its_tiles_are_capped() -> None:
    weights = np.random.default_rng(4).standard_normal((2048, 8, 1, 1))
    sheet = filter_sheet(weights)
    assert len(sheet.boxes) == MAX_TILES
    assert max(sheet.image.size) <= MAX_SIDE
    assert _decode(filter_grid(weights[:10])).shape[2] == 3


def test_the_signed_colour_map_is_white_at_zero_and_symmetric() -> None:
    colours = signed_colours(np.array([-2.0, -1.0, 0.0, 1.0, 2.0]), limit=2.0)
    assert tuple(colours[2]) == (255, 255, 255)
    assert tuple(colours[0]) == NEGATIVE
    assert tuple(colours[4]) == POSITIVE
    white = np.array([255, 255, 255])
    assert np.abs(white - colours[1]).sum() == pytest.approx(
        np.abs(white - np.array(NEGATIVE)).sum() / 2, abs=3
    )
    assert np.abs(white - colours[3]).sum() == pytest.approx(
        np.abs(white - np.array(POSITIVE)).sum() / 2, abs=3
    )
    assert tuple(signed_colours(np.zeros(3))[1]) == (255, 255, 255)


def test_difference_maps_share_one_symmetric_scale_white_where_equal() -> None:
    diff = np.zeros((2, 8, 8), np.float32)
    diff[0, :4] = 1.0
    diff[1, :4] = -4.0
    sheet = difference_sheet(diff, channel_ids=[10, 20], title="adversarial - clean")
    first, second = _tiles(sheet)
    assert sheet.labels == ("10", "20")
    assert (first[-1] == 255).all()
    assert (second[-1] == 255).all()
    assert tuple(second[0, 0]) == NEGATIVE  # the largest |difference| is full colour
    assert first[0, 0, 0] > first[0, 0, 2]  # positive leans red, and is paler
    assert first[0, 0, 1] > POSITIVE[1]


def test_difference_maps_are_capped_like_activation_grids() -> None:
    sheet = difference_sheet(np.random.default_rng(5).standard_normal((2048, 7, 7)))
    assert len(sheet.boxes) == MAX_TILES
    assert max(sheet.image.size) <= MAX_SIDE


def test_a_bar_chart_draws_signed_bars_and_survives_infinities() -> None:
    values = np.array([2.5, -1.0, np.inf, np.nan, 0.0])
    pixels = _decode(bar_chart([f"filter {i}" for i in range(5)], values, "d", "Cohen's d"))
    assert (pixels == POSITIVE).all(axis=-1).any()
    assert (pixels == NEGATIVE).all(axis=-1).any()
    with pytest.raises(SpecError, match="2 labels for 3 values"):
        bar_chart(["a", "b"], [1.0, 2.0, 3.0])


def test_the_score_histogram_marks_the_threshold_and_the_flagged_samples() -> None:
    scores = np.random.default_rng(6).standard_normal(300)
    scores[0] = np.nan
    pixels = _decode(score_histogram(scores, 1.5, scores > 1.5))
    assert (pixels == POSITIVE).all(axis=-1).any(), "flagged samples in red"
    assert pixels.shape[0] < 600
    assert pixels.shape[1] < 800
    assert _decode(score_histogram([], None)).size > 0


def test_nice_ticks_are_round_and_cover_the_range() -> None:
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    ticks = nice_ticks(-2.3, 4.1)
    assert ticks[0] <= -2.3
    assert ticks[-1] >= 4.1
    assert len(nice_ticks(5.0, 5.0)) > 1


@pytest.mark.parametrize(
    ("draw", "message"),
    [
        (lambda: activation_grid(np.zeros((4, 4))), "(C, H, W)"),
        (lambda: activation_grid(_maps(4), channels=[9]), "channels lie in"),
        (lambda: filter_grid(np.zeros((4, 4))), "conv weights"),
        (lambda: filter_grid(np.zeros((4, 2, 3, 3)), input_channel=2), "input_channel"),
    ],
)
def test_impossible_requests_are_spec_errors(draw: Callable[[], object], message: str) -> None:
    with pytest.raises(SpecError, match=re.escape(message)):
        draw()
