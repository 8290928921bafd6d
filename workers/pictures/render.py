"""PNG pictures of activation maps and filter weights, drawn with numpy and Pillow.

Owns the tile sheet: a grid of small images, each labelled with its channel (or filter)
index, under a title and a caption that says what is shown (and what the caps left out).
Every sheet keeps a bounded size whatever the layer's width: at most `MAX_TILES` tiles,
tiny maps enlarged by nearest neighbour to `MIN_TILE` pixels, at most `MAX_SIDE` pixels a
side. Charts (bars, histograms, signed difference maps) live in render_charts.py.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Literal

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

from workers.errors import SpecError
from workers.pictures.weights import normalise_filters

__all__ = [
    "MAX_SIDE",
    "MAX_TILES",
    "MIN_TILE",
    "Scale",
    "Sheet",
    "activation_grid",
    "activation_sheet",
    "choose_channels",
    "filter_grid",
    "filter_sheet",
    "scale_bar",
    "span_of",
    "to_uint8",
]

MAX_TILES = 256
MIN_TILE = 48  # a 7 x 7 map is drawn 7 times larger, each value a visible square
MAX_SIDE = 4096
INPUT_SIDE = 192  # the input image beside a grid: about this many pixels a side
PAD = 4
LABEL_H = 12  # the strip above each tile holding its index
LINE_H = 14
BACKGROUND = (255, 255, 255)
INK = (40, 40, 40)

Font = ImageFont.ImageFont | ImageFont.FreeTypeFont
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Sheet:
    """A drawn picture with where each tile lies, (left, top, right, bottom), in order."""

    image: Image.Image
    boxes: tuple[Box, ...]
    labels: tuple[str, ...]
    note: str

    def png(self) -> bytes:
        return png_bytes(self.image)


@dataclass(frozen=True)
class Chosen:
    """Rows of an activation array to draw, in drawing order, and a caption saying why."""

    rows: np.ndarray
    note: str


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    # Level 1: four times faster than the default 6 on sheets of noisy maps, and no larger.
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


@cache
def font() -> Font:
    """Pillow's bundled font: no font files to ship, the same on every host."""
    return ImageFont.load_default()


def _drawable(text: str) -> str:
    # Without FreeType, Pillow's bitmap font covers Latin-1 only; a sample id may not.
    if isinstance(font(), ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def text_width(text: str) -> int:
    return int(math.ceil(font().getlength(_drawable(text))))


def draw_text(
    draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, fill: tuple[int, ...] = INK
) -> None:
    draw.text(xy, _drawable(text), fill=fill, font=font())


Scale = Literal["layer", "tile"]


def span_of(values: npt.ArrayLike) -> tuple[float, float]:
    """(low, high) of the finite values, (0, 0) when there are none."""
    x = np.asarray(values, dtype=np.float64)
    finite = x[np.isfinite(x)]
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)


def to_uint8(values: npt.ArrayLike, span: tuple[float, float] | None = None) -> np.ndarray:
    """Into 0..255 by the `span` (low, high) given, else by the array's own min and max,
    clipped; a constant array (or no finite value) gives zeros, and non-finite values
    (NaN of a failed sample) draw as 0."""
    x = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(x)
    if not finite.any():
        return np.zeros(x.shape, np.uint8)
    low, high = span if span is not None else span_of(x)
    if high <= low:
        return np.zeros(x.shape, np.uint8)
    scaled = np.where(finite, np.clip((x - low) / (high - low), 0.0, 1.0), 0.0)
    return np.rint(scaled * 255.0).astype(np.uint8)


BAR_W, BAR_H = 160, 10
SCALE_H = BAR_H + LINE_H + PAD  # the colour bar and its labels under a sheet's title


def scale_bar(canvas: Image.Image, xy: tuple[int, int], span: tuple[float, float]) -> None:
    """A gray ramp from black (low) to white (high), labelled with both ends."""
    ramp = np.repeat(np.linspace(0, 255, BAR_W).astype(np.uint8)[None], BAR_H, axis=0)
    canvas.paste(Image.fromarray(ramp).convert("RGB"), xy)
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([xy[0], xy[1], xy[0] + BAR_W, xy[1] + BAR_H], outline=INK)
    low, high = (f"{v:.4g}" for v in span)
    draw_text(draw, (xy[0], xy[1] + BAR_H + 1), low)
    draw_text(draw, (xy[0] + BAR_W - text_width(high), xy[1] + BAR_H + 1), high)


def choose_channels(
    acts: npt.ArrayLike,
    channels: Sequence[int] | None = None,
    top: int | None = None,
    limit: int = MAX_TILES,
) -> Chosen:
    """Which rows of `acts` (C, ...) to draw: `channels` (positions in `acts`) as given,
    else the `top` ones by mean activation (strongest first), else all; at most `limit`."""
    a = np.asarray(acts)
    width = a.shape[0]
    if channels is not None:
        rows = np.asarray(list(channels), dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= width):
            raise SpecError(f"channels lie in 0..{width - 1} for this layer of {width}")
        note = f"{rows.size} chosen of {width} channels"
    elif top is not None:
        if top < 1:
            raise SpecError(f"top is at least 1, got {top}")
        means = np.nanmean(a.reshape(width, -1).astype(np.float64), axis=1) if a.size else a
        means = np.where(np.isfinite(means), means, -np.inf)
        rows = np.argsort(-means, kind="stable")[:top]
        note = f"top {rows.size} of {width} channels by mean activation"
    else:
        rows = np.arange(width)
        note = f"{width} channels"
    if rows.size > limit:
        note += f"; the first {limit} drawn (at most {limit} tiles)"
        rows = rows[:limit]
    return Chosen(rows, note)


def fit_tiles(
    n: int, map_hw: tuple[int, int], room: tuple[int, int], min_tile: int = MIN_TILE
) -> tuple[int, int, int, int]:
    """(cols, rows, tile_h, tile_w) for n maps of map_hw in a room of (width, height) px:
    enlarged by a whole factor up to `min_tile`, shrunk to fit the room when needed."""
    h, w = map_hw
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    factor = max(1, math.ceil(min_tile / max(h, w, 1)))
    th, tw = h * factor, w * factor
    fit_w = (room[0] - PAD) / cols - PAD
    fit_h = (room[1] - PAD) / rows - PAD - LABEL_H
    shrink = min(1.0, fit_w / tw, fit_h / th)
    return cols, rows, max(1, int(th * shrink)), max(1, int(tw * shrink))


def resized(tile: np.ndarray, th: int, tw: int) -> np.ndarray:
    """A float map at (th, tw): nearest neighbour when enlarging (each value stays a
    square), box averaging when shrinking (no aliasing of fine patterns)."""
    x = np.nan_to_num(np.asarray(tile, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if x.shape == (th, tw):
        return x
    method = Image.Resampling.NEAREST if th >= x.shape[0] else Image.Resampling.BOX
    return np.asarray(Image.fromarray(x).resize((tw, th), method), dtype=np.float32)


def paste_grid(
    canvas: Image.Image,
    origin: tuple[int, int],
    tiles: Sequence[np.ndarray],
    labels: Sequence[str],
    cols: int,
) -> tuple[Box, ...]:
    """Paste uint8 tiles (h, w) or (h, w, 3), row-major, each under its label."""
    draw = ImageDraw.Draw(canvas)
    boxes = []
    for i, (tile, label) in enumerate(zip(tiles, labels, strict=True)):
        th, tw = tile.shape[:2]
        x = origin[0] + PAD + (i % cols) * (tw + PAD)
        y = origin[1] + PAD + (i // cols) * (th + LABEL_H + PAD)
        draw_text(draw, (x, y), label)
        picture = Image.fromarray(tile)
        canvas.paste(picture.convert("RGB"), (x, y + LABEL_H))
        boxes.append((x, y + LABEL_H, x + tw, y + LABEL_H + th))
    return tuple(boxes)


def grid_size(cols: int, rows: int, th: int, tw: int) -> tuple[int, int]:
    return PAD + cols * (tw + PAD), PAD + rows * (th + LABEL_H + PAD)


def header(lines: Sequence[str]) -> int:
    return PAD + LINE_H * len([line for line in lines if line]) + PAD


def new_canvas(width: int, height: int, lines: Sequence[str], max_side: int) -> Image.Image:
    """A white canvas wide enough for its title lines (within max_side), with them drawn."""
    shown = [line for line in lines if line]
    width = min(max_side, max([width, *(2 * PAD + text_width(t) for t in shown)]))
    canvas = Image.new("RGB", (width, min(max_side, height)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(shown):
        draw_text(draw, (PAD, PAD + i * LINE_H), line)
    return canvas


def input_picture(image: npt.ArrayLike) -> Image.Image:
    """The input, (h, w) or (h, w, 1|3|4), as RGB about INPUT_SIDE px a side: uint8 as it
    is, anything else min-max scaled; small images enlarged by nearest neighbour."""
    x = np.asarray(image)
    if x.ndim == 3 and x.shape[2] in (1, 3, 4):
        x = x[:, :, 0] if x.shape[2] == 1 else x[:, :, :3]
    if x.ndim not in (2, 3) or min(x.shape[:2]) < 1:
        raise SpecError(f"an input image is (h, w) or (h, w, 3), got shape {x.shape}")
    pixels = np.ascontiguousarray(x if x.dtype == np.uint8 else to_uint8(x))
    picture = Image.fromarray(pixels).convert("RGB")
    longest = max(picture.size)
    if longest < INPUT_SIDE:
        factor = max(1, INPUT_SIDE // longest)
        return picture.resize(
            (picture.width * factor, picture.height * factor), Image.Resampling.NEAREST
        )
    picture.thumbnail((INPUT_SIDE, INPUT_SIDE), Image.Resampling.BOX)
    return picture


def activation_sheet(
    acts: npt.ArrayLike,
    image: npt.ArrayLike | None = None,
    *,
    channels: Sequence[int] | None = None,
    top: int | None = None,
    channel_ids: npt.ArrayLike | None = None,
    title: str = "",
    max_tiles: int = MAX_TILES,
    max_side: int = MAX_SIDE,
    scale: Scale = "layer",
    span: tuple[float, float] | None = None,
) -> Sheet:
    """One sample's maps (C, H, W) as grayscale tiles labelled with their channel index
    (`channel_ids[row]` when the stored channels are a subset), the input `image` beside
    them. See `choose_channels` for channels and top.

    `scale="layer"` draws every tile on one range, `span` or else the min and max of all
    the maps, shown by a bar under the title, so a nearly silent channel stays dark beside
    a strong one; `"tile"` normalises each tile by its own min and max."""
    a = np.asarray(acts)
    if a.ndim != 3:
        raise SpecError(f"activation maps of one sample are (C, H, W), got shape {a.shape}")
    chosen = choose_channels(a, channels, top, max_tiles)
    ids = np.arange(a.shape[0]) if channel_ids is None else np.asarray(channel_ids)
    if ids.shape != (a.shape[0],):
        raise SpecError(f"channel_ids names each of the {a.shape[0]} channels, got {ids.shape}")
    side = input_picture(image) if image is not None else None
    shared = (span or span_of(a)) if scale == "layer" else None
    how = "one scale for the layer" if shared is not None else "each tile on its own scale"
    lines = [title, f"{chosen.note}; {how}"]
    top_y = header(lines) + (SCALE_H if shared is not None else 0)
    left = 0 if side is None else PAD + side.width + 2 * PAD
    room = (max_side - left, max_side - top_y)
    cols, rows, th, tw = fit_tiles(max(1, chosen.rows.size), (a.shape[1], a.shape[2]), room)
    grid_w, grid_h = grid_size(cols, rows, th, tw)
    side_h = 0 if side is None else LABEL_H + side.height + 2 * PAD
    canvas = new_canvas(left + grid_w, top_y + max(grid_h, side_h), lines, max_side)
    if side is not None:
        draw_text(ImageDraw.Draw(canvas), (PAD, top_y + PAD), "input")
        canvas.paste(side, (PAD, top_y + PAD + LABEL_H))
    if shared is not None:
        scale_bar(canvas, (PAD, header(lines)), shared)
    tiles = [to_uint8(resized(a[r], th, tw), shared) for r in chosen.rows]
    labels = [str(int(ids[r])) for r in chosen.rows]
    boxes = paste_grid(canvas, (left, top_y), tiles, labels, cols)
    return Sheet(canvas, boxes, tuple(labels), chosen.note)


def activation_grid(
    acts: npt.ArrayLike,
    image: npt.ArrayLike | None = None,
    channels: Sequence[int] | None = None,
    top: int | None = None,
    title: str = "",
    *,
    channel_ids: npt.ArrayLike | None = None,
    max_tiles: int = MAX_TILES,
    max_side: int = MAX_SIDE,
    scale: Scale = "layer",
) -> bytes:
    """`activation_sheet` as PNG bytes."""
    return activation_sheet(
        acts, image, channels=channels, top=top, channel_ids=channel_ids, title=title,
        max_tiles=max_tiles, max_side=max_side, scale=scale,
    ).png()  # fmt: skip


def _filter_tiles(
    weights: np.ndarray, over: Literal["filter", "layer"], input_channel: int | None
) -> tuple[np.ndarray, str]:
    """(out, kh, kw) or (out, kh, kw, 3) values in [0, 1], and what they show.

    Deeper filters are reduced to one map (mean over input channels, or the chosen one)
    before normalising: the mean of already-normalised values crowds toward grey."""
    out, inputs = weights.shape[:2]
    if input_channel is not None:
        if not 0 <= input_channel < inputs:
            raise SpecError(f"input_channel lies in 0..{inputs - 1}, got {input_channel}")
        picked = weights[:, input_channel : input_channel + 1]
        how = f"input channel {input_channel} of {inputs}"
    elif inputs == 3:
        return np.moveaxis(normalise_filters(weights, over), 1, -1), "RGB"
    else:
        picked = weights.mean(axis=1, keepdims=True)
        how = "1 input channel" if inputs == 1 else f"mean over {inputs} input channels"
    return normalise_filters(picked, over)[:, 0], how


def filter_sheet(
    weights: npt.ArrayLike,
    over: Literal["filter", "layer"] = "filter",
    input_channel: int | None = None,
    *,
    title: str = "",
    max_tiles: int = MAX_TILES,
    max_side: int = MAX_SIDE,
) -> Sheet:
    """Conv filters (out, in, kh, kw), or (out, in, k) for Conv1d, min-max normalised per
    filter or over the whole layer; a first layer (in = 3) in colour."""
    w = np.asarray(weights, dtype=np.float32)
    if w.ndim == 3:
        w = w[:, :, None, :]
    if w.ndim != 4:
        raise SpecError(f"conv weights are (out, in, kh, kw) or (out, in, k), got {w.shape}")
    values, how = _filter_tiles(w, over, input_channel)
    shown = min(w.shape[0], max_tiles)
    note = f"{w.shape[0]} filters, {w.shape[2]}x{w.shape[3]}, {how}, normalised per {over}" + (
        f"; the first {shown} drawn (at most {max_tiles} tiles)" if shown < w.shape[0] else ""
    )
    lines = [title, note]
    top_y = header(lines)
    cols, rows, th, tw = fit_tiles(shown, w.shape[2:], (max_side, max_side - top_y))
    grid_w, grid_h = grid_size(cols, rows, th, tw)
    canvas = new_canvas(grid_w, top_y + grid_h, lines, max_side)
    # Values are already in [0, 1] for the chosen normalisation: no per-tile rescaling here,
    # so "per layer" keeps filters comparable with each other.
    tiles = []
    for v in values[:shown]:
        pixels = np.rint(np.clip(v, 0.0, 1.0) * 255.0).astype(np.uint8)
        picture = Image.fromarray(pixels).resize((tw, th), Image.Resampling.NEAREST)
        tiles.append(np.asarray(picture))
    labels = [str(i) for i in range(shown)]
    boxes = paste_grid(canvas, (0, top_y), tiles, labels, cols)
    return Sheet(canvas, boxes, tuple(labels), note)


def filter_grid(
    weights: npt.ArrayLike,
    over: Literal["filter", "layer"] = "filter",
    input_channel: int | None = None,
    title: str = "",
) -> bytes:
    """`filter_sheet` as PNG bytes."""
    return filter_sheet(weights, over, input_channel, title=title).png()
