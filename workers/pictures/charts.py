"""Comparison and screening pictures drawn with Pillow's ImageDraw: signed difference maps
(blue-white-red, symmetric around 0), bar charts of discriminative filters and the
histogram of screening scores with its threshold. PNG bytes in, numpy arrays out; the tile
sheet and its size caps come from render.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from PIL import ImageDraw

from workers.errors import SpecError
from workers.pictures.render import (
    INK,
    LINE_H,
    MAX_SIDE,
    MAX_TILES,
    PAD,
    Sheet,
    draw_text,
    fit_tiles,
    grid_size,
    header,
    new_canvas,
    paste_grid,
    png_bytes,
    resized,
    text_width,
)

__all__ = [
    "NEGATIVE",
    "POSITIVE",
    "bar_chart",
    "difference_map",
    "difference_sheet",
    "nice_ticks",
    "score_histogram",
    "signed_colours",
]

NEGATIVE = (59, 76, 192)  # blue: B above A
POSITIVE = (180, 4, 38)  # red: A above B
WHITE = np.array([255.0, 255.0, 255.0])
NEUTRAL = (160, 160, 160)
LEGEND_H = 12 + LINE_H  # the colour bar and its tick labels
PLOT_W, PLOT_H = 480, 240
BAR_H, MAX_BARS = 14, 50


def signed_colours(values: npt.ArrayLike, limit: float | None = None) -> np.ndarray:
    """RGB uint8 (..., 3): white at 0, towards blue below and red above, full colour at
    +-limit (default: the largest |value|). Non-finite values draw white."""
    x = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(x)
    if limit is None:
        limit = float(np.abs(x[finite]).max()) if finite.any() else 0.0
    t = np.clip(np.where(finite, x, 0.0) / limit, -1.0, 1.0) if limit > 0 else np.zeros(x.shape)
    end = np.where((t > 0)[..., None], np.array(POSITIVE, float), np.array(NEGATIVE, float))
    rgb: np.ndarray = WHITE + np.abs(t)[..., None] * (end - WHITE)
    pixels: np.ndarray = np.rint(rgb).astype(np.uint8)
    return pixels


def nice_ticks(low: float, high: float, n: int = 5) -> list[float]:
    """About n round tick values (1, 2 or 5 times a power of ten) covering [low, high]."""
    span = high - low
    if not math.isfinite(span) or span <= 0:
        span = abs(low) or 1.0
        low, high = low - span / 2, low + span / 2
    magnitude = 10.0 ** math.floor(math.log10(span / n))
    step = next(m * magnitude for m in (1, 2, 5, 10) if span / (m * magnitude) <= n)
    first = math.floor(low / step) * step
    count = math.ceil(round((high - first) / step, 9))
    return [round(first + i * step, 12) + 0.0 for i in range(count + 1)]


def _label(value: float) -> str:
    return "0" if value == 0 else f"{value:.4g}"


def _colour_bar(draw: ImageDraw.ImageDraw, x: int, y: int, width: int, limit: float) -> None:
    colours = signed_colours(np.linspace(-1.0, 1.0, width), 1.0)
    for i, colour in enumerate(colours):
        draw.line([(x + i, y), (x + i, y + 10)], fill=tuple(int(c) for c in colour))
    draw.rectangle([x, y, x + width, y + 10], outline=INK)
    for value, at in ((-limit, x), (0.0, x + width // 2), (limit, x + width)):
        text = _label(value)
        draw_text(draw, (at - text_width(text) // 2, y + 12), text)


def difference_sheet(
    diff: npt.ArrayLike,
    *,
    channel_ids: npt.ArrayLike | None = None,
    title: str = "",
    limit: float | None = None,
    max_tiles: int = MAX_TILES,
    max_side: int = MAX_SIDE,
) -> Sheet:
    """Paired spatial differences A - B of one pair, (k, H, W) or (H, W), one tile per
    channel on one shared symmetric scale (so tiles compare), with its colour bar."""
    d = np.asarray(diff, dtype=np.float32)
    d = d[None] if d.ndim == 2 else d
    if d.ndim != 3:
        raise SpecError(f"difference maps are (k, H, W) or (H, W), got shape {d.shape}")
    ids = np.arange(d.shape[0]) if channel_ids is None else np.asarray(channel_ids)
    if ids.shape != (d.shape[0],):
        raise SpecError(f"channel_ids names each of the {d.shape[0]} maps, got {ids.shape}")
    shown = min(d.shape[0], max_tiles)
    values = d[:shown]
    finite = np.isfinite(values)
    if limit is None:
        limit = float(np.abs(values[finite]).max()) if finite.any() else 0.0
    note = f"A - B, {d.shape[0]} channels; blue: A < B, white: equal, red: A > B"
    if shown < d.shape[0]:
        note += f"; the first {shown} drawn (at most {max_tiles} tiles)"
    lines = [title, note]
    top_y = header(lines) + LEGEND_H
    cols, rows, th, tw = fit_tiles(shown, d.shape[1:], (max_side, max_side - top_y))
    grid_w, grid_h = grid_size(cols, rows, th, tw)
    canvas = new_canvas(max(grid_w, 200 + 2 * PAD + 40), top_y + grid_h, lines, max_side)
    _colour_bar(ImageDraw.Draw(canvas), PAD + 20, header(lines), 200, limit)
    tiles = [signed_colours(resized(v, th, tw), limit) for v in values]
    labels = [str(int(i)) for i in ids[:shown]]
    boxes = paste_grid(canvas, (0, top_y), tiles, labels, cols)
    return Sheet(canvas, boxes, tuple(labels), note)


def difference_map(
    diff: npt.ArrayLike,
    channel_ids: npt.ArrayLike | None = None,
    title: str = "",
    limit: float | None = None,
) -> bytes:
    """`difference_sheet` as PNG bytes."""
    return difference_sheet(diff, channel_ids=channel_ids, title=title, limit=limit).png()


class _Scale:
    """Data value -> pixel along one axis."""

    def __init__(self, low: float, high: float, start: int, length: int) -> None:
        self.low, self.span, self.start, self.length = low, (high - low) or 1.0, start, length

    def __call__(self, value: float) -> int:
        share = min(1.0, max(0.0, (value - self.low) / self.span))
        return self.start + round(share * self.length)


def _x_axis(
    draw: ImageDraw.ImageDraw, left: int, y: int, ticks: list[float], at: _Scale, name: str
) -> None:
    draw.line([(left, y), (left + PLOT_W, y)], fill=INK)
    for tick in ticks:
        x = at(tick)
        draw.line([(x, y), (x, y + 4)], fill=INK)
        text = _label(tick)
        draw_text(draw, (x - text_width(text) // 2, y + 5), text)
    if name:
        draw_text(draw, (left + (PLOT_W - text_width(name)) // 2, y + 5 + LINE_H), name)


def bar_chart(
    labels: Sequence[str], values: npt.ArrayLike, title: str = "", xlabel: str = ""
) -> bytes:
    """Horizontal bars from 0, red for positive and blue for negative values (an effect
    size like Cohen's d), in the order given; at most MAX_BARS, and infinities reach the
    end of the axis."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(labels) != v.size:
        raise SpecError(f"{len(labels)} labels for {v.size} values")
    shown = min(v.size, MAX_BARS)
    note = f"the first {shown} of {v.size}" if shown < v.size else ""
    v, names = v[:shown], [str(x) for x in labels[:shown]]
    finite = v[np.isfinite(v)]
    ticks = nice_ticks(min(0.0, *finite, 0.0), max(0.0, *finite, 0.0))
    lines = [title, note]
    top = header(lines)
    left = 2 * PAD + max([text_width(n) for n in names] or [0])
    width = left + PLOT_W + 6 * PAD + text_width("-0.0000")
    height = top + shown * (BAR_H + PAD) + PAD + 2 * LINE_H + 2 * PAD
    canvas = new_canvas(width, height, lines, MAX_SIDE)
    draw = ImageDraw.Draw(canvas)
    at = _Scale(ticks[0], ticks[-1], left, PLOT_W)
    for i, (name, value) in enumerate(zip(names, v, strict=True)):
        y = top + i * (BAR_H + PAD)
        draw_text(draw, (left - PAD - text_width(name), y + 1), name)
        end = at(value if math.isfinite(value) else math.copysign(math.inf, value))
        if not math.isnan(value):
            zero = at(0.0)
            draw.rectangle(
                [min(zero, end), y, max(zero, end), y + BAR_H - 1],
                fill=POSITIVE if value > 0 else NEGATIVE,
            )
        draw_text(draw, (max(end, at(0.0)) + PAD, y + 1), _label(value))
    axis_y = top + shown * (BAR_H + PAD)
    draw.line([(at(0.0), top - PAD), (at(0.0), axis_y)], fill=INK)
    _x_axis(draw, left, axis_y, ticks, at, xlabel)
    return png_bytes(canvas)


def _dashed(draw: ImageDraw.ImageDraw, x: int, top: int, bottom: int) -> None:
    for y in range(top, bottom, 8):
        draw.line([(x, y), (x, min(y + 4, bottom))], fill=INK, width=2)


def score_histogram(
    scores: npt.ArrayLike,
    threshold: float | None = None,
    flags: npt.ArrayLike | None = None,
    title: str = "screening scores",
    bins: int = 30,
) -> bytes:
    """Counts of `scores` per bin, flagged samples stacked in red over the others in grey,
    the threshold as a dashed line. Non-finite scores are counted in the caption only."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    flagged = np.zeros(s.shape, bool) if flags is None else np.asarray(flags, bool).reshape(-1)
    if flagged.shape != s.shape:
        raise SpecError(f"{flagged.size} flags for {s.size} scores")
    finite = np.isfinite(s)
    s, flagged = s[finite], flagged[finite]
    marks = [*s.tolist(), *([threshold] if threshold is not None else [])]
    ticks = nice_ticks(min(marks, default=0.0), max(marks, default=1.0))
    edges = np.linspace(ticks[0], ticks[-1], bins + 1)
    clear = np.histogram(s[~flagged], edges)[0]
    hot = np.histogram(s[flagged], edges)[0]
    note = f"{s.size} samples, {int(flagged.sum())} flagged (red)"
    if not finite.all():
        note += f"; {int((~finite).sum())} not finite, left out"
    y_ticks = [t for t in nice_ticks(0.0, max(1.0, float((clear + hot).max(initial=0)))) if t >= 0]
    lines = [title, note]
    top = header(lines) + LINE_H  # room for the threshold's label
    left = 2 * PAD + max(text_width(_label(t)) for t in y_ticks) + 4
    canvas = new_canvas(left + PLOT_W + 8 * PAD, top + PLOT_H + 3 * LINE_H + PAD, lines, MAX_SIDE)
    draw = ImageDraw.Draw(canvas)
    at = _Scale(ticks[0], ticks[-1], left, PLOT_W)
    up = _Scale(y_ticks[0], y_ticks[-1], 0, PLOT_H)
    base = top + PLOT_H
    for i in range(bins):
        x0, x1 = at(edges[i]), max(at(edges[i]), at(edges[i + 1]) - 1)
        low, high = base - up(clear[i]), base - up(clear[i] + hot[i])
        if clear[i]:
            draw.rectangle([x0, low, x1, base], fill=NEUTRAL)
        if hot[i]:
            draw.rectangle([x0, high, x1, low], fill=POSITIVE)
    draw.line([(left, top), (left, base)], fill=INK)
    for tick in y_ticks:
        text, y = _label(tick), base - up(tick)
        draw.line([(left - 4, y), (left, y)], fill=INK)
        draw_text(draw, (left - 6 - text_width(text), y - 6), text)
    _x_axis(draw, left, base, ticks, at, "score")
    if threshold is not None:
        x = at(threshold)
        _dashed(draw, x, top, base)
        text = f"threshold {_label(threshold)}"
        draw_text(draw, (min(x + PAD, canvas.width - text_width(text) - PAD), top - LINE_H), text)
    return png_bytes(canvas)
