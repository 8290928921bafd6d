"""Grad-CAM drawn over the input: the map, upsampled to the input's size (bilinear) and
coloured with viridis, blended half and half with the input in grey, beside the input
itself and a colour bar from 0 to the map's largest value. Numpy and Pillow only.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

from workers.errors import SpecError
from workers.pictures.render import (
    LABEL_H,
    MAX_SIDE,
    PAD,
    Sheet,
    draw_text,
    header,
    input_picture,
    new_canvas,
    text_width,
)

__all__ = ["BLEND", "VIRIDIS", "colour", "gradcam_sheet"]

# matplotlib's viridis at 17 evenly spaced points, interpolated linearly in between
# (within 6 of 255 of the full table everywhere; tests/pictures/test_overlay.py checks).
VIRIDIS = np.array(
    [[68, 1, 84], [72, 24, 106], [71, 45, 123], [66, 64, 134], [59, 82, 139], [51, 99, 141],
     [44, 114, 142], [38, 130, 142], [33, 145, 140], [31, 160, 136], [40, 174, 128],
     [63, 188, 115], [94, 201, 98], [132, 212, 75], [173, 220, 48], [216, 226, 25],
     [253, 231, 37]], dtype=np.float64,
)  # fmt: skip
BLEND = 0.5  # the map's share of each overlay pixel
_BAR_H = 12


def colour(values: npt.ArrayLike) -> np.ndarray:
    """Values in [0, 1] (clipped; NaN as 0) to viridis RGB uint8, shape (*values, 3)."""
    x = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0), 0.0, 1.0)
    stops = np.linspace(0.0, 1.0, len(VIRIDIS))
    rgb = np.stack([np.interp(x, stops, VIRIDIS[:, i]) for i in range(3)], axis=-1)
    return np.rint(rgb).astype(np.uint8)


def _scaled(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The map over [0, 1] by its largest value (an all-zero map stays 0), at `size`."""
    finite = np.nan_to_num(cam.astype(np.float32), nan=0.0)
    top = float(finite.max()) if finite.size else 0.0
    unit = finite / top if top > 0 else np.zeros_like(finite)
    picture = Image.fromarray(unit.astype(np.float32), mode="F")
    return np.asarray(picture.resize(size, Image.Resampling.BILINEAR), dtype=np.float64)


def gradcam_sheet(cam: npt.ArrayLike, image: npt.ArrayLike | None, title: str = "") -> Sheet:
    """One sample's Grad-CAM map (y, x) over its input (h, w[, 3]): the input, the overlay
    and a colour bar; the map alone, coloured, when the input is not at hand."""
    c = np.asarray(cam)
    if c.ndim != 2:
        raise SpecError(f"a Grad-CAM map of one sample is (y, x), got shape {c.shape}")
    if not np.isfinite(c).any():
        raise SpecError("this sample has no Grad-CAM map (it failed, or had no target)")
    top = float(np.nanmax(c))
    side = input_picture(image) if image is not None else None
    if side is None:
        base = input_picture(np.zeros(c.shape, np.uint8))  # the map's own size, enlarged
        grey = None
    else:
        base = side
        grey = np.asarray(side.convert("L").convert("RGB"), dtype=np.float64)
    heat = colour(_scaled(c, base.size)).astype(np.float64)
    blended = heat if grey is None else (1 - BLEND) * grey + BLEND * heat
    overlay = Image.fromarray(np.rint(blended).astype(np.uint8), mode="RGB")
    note = f"viridis from 0 to {top:.3g} (the map's largest value), bilinear to the input"
    lines = [title, note]
    top_y = header(lines)
    tiles = [("Grad-CAM", overlay)] if side is None else [("input", side), ("Grad-CAM", overlay)]
    width = PAD + sum(t.width + 2 * PAD for _, t in tiles)
    height = top_y + LABEL_H + base.height + 2 * PAD + _BAR_H + LABEL_H + 2 * PAD
    canvas = new_canvas(width, height, lines, MAX_SIDE)
    draw = ImageDraw.Draw(canvas)
    boxes, labels, x = [], [], PAD
    for label, tile in tiles:
        assert tile is not None
        draw_text(draw, (x, top_y + PAD), label)
        canvas.paste(tile, (x, top_y + PAD + LABEL_H))
        y = top_y + PAD + LABEL_H
        boxes.append((x, y, x + tile.width, y + tile.height))
        labels.append(label)
        x += tile.width + 2 * PAD
    bar_y = top_y + PAD + LABEL_H + base.height + PAD
    bar_w = max(1, width - 2 * PAD)
    bar = colour(np.broadcast_to(np.linspace(0.0, 1.0, bar_w), (_BAR_H, bar_w)))
    canvas.paste(Image.fromarray(np.ascontiguousarray(bar), mode="RGB"), (PAD, bar_y))
    draw_text(draw, (PAD, bar_y + _BAR_H + 1), "0")
    end = f"{top:.3g}"
    draw_text(draw, (PAD + bar_w - text_width(end), bar_y + _BAR_H + 1), end)
    return Sheet(canvas, tuple(boxes), tuple(labels), note)
