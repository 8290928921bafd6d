"""The atlas's pictures: one sheet per channel with the input crops of its strongest
responses, its filter weights (a first conv layer's), and the activation maps they came
from, all maps on the layer's one scale; and the atlas section of the HTML report.

Owns `crop` (a box of the model's input, padded where it reaches past the border),
`channel_sheet` and `atlas_sections`. The analysis is read from `analyses/{id}`
(storage/analyses.py), the job through storage/stored_job.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from workers.errors import ActmapError, NotFound, SpecError
from workers.extraction.inputs import OutsideRoots, decode
from workers.jobs import AnalysisKind, Preprocessing
from workers.pictures.html import Raw, Section, e, figure, table
from workers.pictures.render import (
    LABEL_H,
    PAD,
    SCALE_H,
    Scale,
    Sheet,
    header,
    new_canvas,
    paste_grid,
    resized,
    scale_bar,
    to_uint8,
)
from workers.pictures.weights import normalise_filters
from workers.storage.analyses import analysis_ids, open_analysis
from workers.storage.layout import array, attrs, layer_path, read
from workers.storage.stored_job import StoredJob

__all__ = ["OUTSIDE", "Channel", "atlas_sections", "channel_png", "channel_sheet", "crop"]

OUTSIDE = (150, 190, 255)  # the padding beyond the input's border: no input pixel there
TILE = 72  # crops and maps are drawn about this many pixels a side
REPORT_CHANNELS = 8  # channel sheets per atlas in the report


def crop(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The box (top, left, bottom right exclusive) of an (H, W) or (H, W, 3) uint8 image
    as RGB, the part beyond the border filled with OUTSIDE."""
    rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
    top, left, bottom, right = box
    out = np.empty((bottom - top, right - left, 3), np.uint8)
    out[...] = OUTSIDE
    h, w = rgb.shape[:2]
    y0, y1, x0, x1 = max(top, 0), min(bottom, h), max(left, 0), min(right, w)
    if y0 < y1 and x0 < x1:
        out[y0 - top : y1 - top, x0 - left : x1 - left] = rgb[y0:y1, x0:x1]
    return out


@dataclass(frozen=True)
class Channel:
    """What one channel's sheet shows: its id, each response's sample, value, crop (RGB
    uint8, None when the input is not readable here) and map (h, w), and the position."""

    layer: str
    channel: int
    samples: list[str]
    values: np.ndarray
    crops: list[np.ndarray | None]
    maps: list[np.ndarray]
    positions: list[tuple[int, int]]
    weights: np.ndarray | None  # (in, kh, kw)


def _enlarged(pixels: np.ndarray) -> np.ndarray:
    h, w = pixels.shape[:2]
    factor = max(1, TILE // max(h, w, 1))
    picture = Image.fromarray(pixels).resize((w * factor, h * factor), Image.Resampling.NEAREST)
    return np.asarray(picture.convert("RGB"))


def _map_tile(values: np.ndarray, at: tuple[int, int], span: tuple[float, float]) -> np.ndarray:
    """A map on the layer's scale, enlarged, the response's position outlined in red."""
    h, w = values.shape
    factor = max(1, TILE // max(h, w, 1))
    gray = to_uint8(resized(values, h * factor, w * factor), span)
    picture = Image.fromarray(gray).convert("RGB")
    y, x = at
    box = [x * factor, y * factor, (x + 1) * factor - 1, (y + 1) * factor - 1]
    ImageDraw.Draw(picture).rectangle(box, outline=(220, 30, 30))
    return np.asarray(picture)


def channel_sheet(found: Channel, span: tuple[float, float], title: str = "") -> Sheet:
    """Weights (when given), then a row of crops, then a row of maps, one column per
    response, strongest first. `span` is the layer's range: one scale for every channel."""
    n = len(found.samples)
    note = f"{n} strongest responses of channel {found.channel}; maps on the layer's scale"
    lines = [title or f"{found.layer}: channel {found.channel}", note]
    crops = [_enlarged(c) if c is not None else None for c in found.crops]
    maps = [_map_tile(m, p, span) for m, p in zip(found.maps, found.positions, strict=True)]
    side = max([t.shape[0] for t in (*maps, *(c for c in crops if c is not None))] or [TILE])
    weights = None
    if found.weights is not None:
        w = normalise_filters(found.weights[None])[0].mean(axis=0)
        weights = _enlarged(np.rint(w * 255).astype(np.uint8))
    top_y = header(lines) + SCALE_H
    row_h = LABEL_H + side + PAD
    width = PAD + max(n, 1) * (side + PAD) + (0 if weights is None else weights.shape[1] + PAD)
    canvas = new_canvas(width + 2 * PAD, top_y + 2 * row_h + PAD, lines, 4096)
    scale_bar(canvas, (PAD, header(lines)), span)
    left = 0
    boxes: tuple[tuple[int, int, int, int], ...] = ()
    if weights is not None:
        boxes += paste_grid(canvas, (0, top_y), [weights], ["weights"], 1)
        left = weights.shape[1] + PAD
    blank = np.full((side, side, 3), 255, np.uint8)
    shown = [c if c is not None else blank for c in crops]
    labels = [f"{v:.3g}" for v in found.values]
    boxes += paste_grid(canvas, (left, top_y), _padded(shown, side), labels, n)
    names = [s.rsplit("/", 1)[-1][:12] for s in found.samples]
    boxes += paste_grid(canvas, (left, top_y + row_h), _padded(maps, side), names, n)
    return Sheet(canvas, boxes, tuple(labels), note)


def _padded(tiles: list[np.ndarray], side: int) -> list[np.ndarray]:
    """Tiles on white squares of one side, so the columns line up."""
    out = []
    for t in tiles:
        square = np.full((side, side, 3), 255, np.uint8)
        square[: min(side, t.shape[0]), : min(side, t.shape[1])] = t[:side, :side]
        out.append(square)
    return out


def _display(source: str, prep: dict[str, Any], roots: tuple[str, ...] | None) -> np.ndarray:
    """The input as the model saw it, back in 0..255: (H, W) or (H, W, 3) uint8."""
    p = Preprocessing.model_validate(prep)
    x = decode(source, p, roots=roots)
    mean = np.asarray(p.mean, np.float32).reshape(-1, 1, 1)
    std = np.asarray(p.std, np.float32).reshape(-1, 1, 1)
    pixels = np.clip((x * std + mean) / p.scale, 0, 255).astype(np.uint8)
    return pixels[0] if pixels.shape[0] == 1 else np.moveaxis(pixels, 0, -1)


def load_channel(store: str, analysis_id: str, channel: int, *, sources: bool = True) -> Channel:
    """One channel of a stored atlas, with the crops cut from its job's inputs (read
    beneath the job's roots) and the maps read one sample at a time."""
    group = open_analysis(store, analysis_id)
    meta = attrs(group)
    if meta.get("kind") != AnalysisKind.ATLAS or meta.get("state") != "succeeded":
        raise NotFound(f"analysis {analysis_id} is not a finished atlas")
    layer = str(meta["inputs"]["layer"])
    ids = read(group, layer_path(layer, "channel"))
    where = np.flatnonzero(ids == channel)
    if where.size == 0:
        raise SpecError(f"channel {channel} is not in this atlas; its channels are "
                        f"{int(ids.min())}..{int(ids.max())} ({ids.size} stored)")  # fmt: skip
    c = int(where[0])

    def of(name: str) -> np.ndarray:
        return np.asarray(array(group, layer_path(layer, name))[c])

    rows, boxes = of("row"), of("crop")
    job = StoredJob(store, str(meta["inputs"]["job_id"]))
    acts = job.acts(layer)  # 8-bit maps decoded
    prep = job.attrs.get("spec", {}).get("preprocessing") or job.attrs["catalogue"]["preprocessing"]
    roots = job.attrs.get("spec", {}).get("roots")
    crops: list[np.ndarray | None] = []
    for row, box in zip(rows, boxes, strict=True):
        try:
            source = str(job.sources[int(row)]) if sources and job.sources is not None else ""
            image = _display(source, prep, None if roots is None else tuple(roots))
            top, left, bottom, right = (int(v) for v in box)
            crops.append(crop(image, (top, left, bottom, right)))
        except (ActmapError, OutsideRoots, OSError, ValueError):  # gone or unreadable: blank
            crops.append(None)
    weights = job.filters(layer)
    return Channel(
        layer, channel, [str(s) for s in of("sample_id")], of("value").astype(np.float64),
        crops, [np.asarray(acts[int(r), c], np.float32) for r in rows],
        list(zip(of("y").tolist(), of("x").tolist(), strict=True)),
        None if weights is None else weights[channel],
    )  # fmt: skip


def _layer_span(store: str, analysis_id: str) -> tuple[float, float]:
    group = open_analysis(store, analysis_id)
    layer = str(attrs(group)["inputs"]["layer"])
    values = read(group, layer_path(layer, "value")).astype(np.float64)
    finite = values[np.isfinite(values)]
    return (min(0.0, float(finite.min())), float(finite.max())) if finite.size else (0.0, 1.0)


def channel_png(store: str, analysis_id: str, channel: int, scale: Scale = "layer") -> bytes:
    """A channel's sheet as PNG: on the layer's scale (the atlas's strongest value over
    every channel), or with `scale="tile"` on the channel's own."""
    found = load_channel(store, analysis_id, channel)
    own = (min(0.0, float(np.min(found.maps))), float(np.max(found.maps)))
    span = _layer_span(store, analysis_id) if scale == "layer" else own
    return channel_sheet(found, span).png()


def atlas_sections(store: str, job_id: str) -> list[Section]:
    """A section per stored atlas of this job: the channels' strongest responses as a
    table, and the sheets of the strongest channels."""
    sections = []
    for analysis_id in analysis_ids(store):
        meta = attrs(open_analysis(store, analysis_id))
        if meta.get("kind") != AnalysisKind.ATLAS or meta.get("inputs", {}).get("job_id") != job_id:
            continue
        if meta.get("state") != "succeeded":
            continue
        layer = str(meta["inputs"]["layer"])
        summary = meta["layers"][layer]
        best = sorted(summary["best"], key=lambda b: -b[4])
        span = _layer_span(store, analysis_id)
        images: dict[str, bytes] = {}
        figures = []
        for row in best[:REPORT_CHANNELS]:
            sheet = channel_sheet(load_channel(store, analysis_id, int(row[0])), span)
            name = f"atlas-{analysis_id}-{layer}-{row[0]}.png"
            figures.append(figure(images, name, sheet.png(), f"channel {row[0]}: {sheet.note}"))
        rows = [(b[0], b[1], f"{b[2]}, {b[3]}", f"{b[4]:.4g}", tuple(b[5:9])) for b in best]
        body: str = Raw(
            f"<p>Atlas {e(analysis_id)} of layer <code>{e(layer)}</code>: each channel's "
            f"{summary['top']} strongest responses over {meta['inputs']['n_samples']} samples; "
            f"the crops are what each position sees (receptive field "
            f"{'x'.join(map(str, summary['receptive_field']))}), blue where it reaches past "
            "the input. The sheets of the strongest channels, all on the layer's scale:</p>"
        )
        body += Raw('<div class="figures">' + "".join(figures) + "</div>")
        head = ("channel", "sample", "y, x", "value", "crop (top, left, bottom, right)")
        body += Raw("<details><summary>every channel's strongest response</summary>")
        body += table(head, rows) + Raw("</details>")
        sections.append(Section(f"Atlas {layer}", body, images))
    return sections
