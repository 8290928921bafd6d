"""What a screening profile reads of a model, beyond one batch's activations.

Owns `screening_inputs`: what `ScreeningProfile` scores (pooled activations of the named
layers, the logits, the feature-squeezing distances; workers.analysis.screening keys the
last two LOGITS and SQUEEZE) from one forward with hooks (hooks.capture, removed on every
exit) and the squeezed forwards, of images in [0, 1] run in process: for fitting a profile
on benign corruptions, benchmarks and tests. And `batch_extras`: the same for an extraction
batch (the job's `squeeze` and `benign` options), which the pipeline stores. The pooled
activation is the spatial mean per channel, as extraction stores it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from workers.extraction.attacks import normaliser
from workers.extraction.hooks import capture
from workers.extraction.models import LoadedModel
from workers.extraction.squeezing import (
    benign_copy,
    normalised,
    pixels,
    squeeze_distance,
    squeeze_distances,
    squeezers_for,
)
from workers.jobs import BENIGN_COPIES, SQUEEZERS, Preprocessing

__all__ = ["Copy", "Extras", "batch_extras", "pooled", "screening_inputs"]


def pooled(out: Tensor) -> Tensor:
    """A layer output's per-channel spatial mean in float32 (the output itself when flat)."""
    spatial = tuple(range(2, out.dim()))
    return out.float().mean(dim=spatial) if spatial else out.float()


@torch.inference_mode()
def screening_inputs(
    model: nn.Module,
    x: Tensor,
    preprocessing: Preprocessing,
    layers: Sequence[str],
    batch: int = 500,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """({layer: (n, C)}, logits (n, K), squeezing distances (n, 2)) of pixels x (n, C, H, W)
    in [0, 1], as float64."""
    normalise = normaliser(preprocessing)
    bits, median = squeezers_for(x.shape[1])

    def on_pixels(v: Tensor) -> Tensor:
        out: Tensor = model(normalise(v))
        return out

    logits_, squeeze = ":logits", ":squeeze"  # never a module's dotted name
    parts: dict[str, list[np.ndarray]] = {name: [] for name in (*layers, logits_, squeeze)}
    with capture(model, layers) as forward:
        for start in range(0, x.shape[0], batch):
            xb = x[start : start + batch]
            logits, outputs = forward(normalise(xb))
            parts[logits_].append(logits.float().numpy())
            for name, out in outputs.items():
                parts[name].append(pooled(out).numpy())
    # The squeezed passes run without hooks: only their softmax is needed.
    for start in range(0, x.shape[0], batch):
        squeezed = squeeze_distance(on_pixels, x[start : start + batch], bits, median)
        parts[squeeze].append(squeezed.numpy())
    found = {n: np.concatenate(p).astype(np.float64) for n, p in parts.items()}
    return found, found.pop(logits_), found.pop(squeeze)


class Copy(NamedTuple):
    """One benign copy of a batch: logits (n, K), pooled activations {layer: (n, C)},
    squeezing distances (n, 2) or None; float32, NaN rows for failed samples."""

    logits: np.ndarray
    pooled: dict[str, np.ndarray]
    squeeze: np.ndarray | None


class Extras(NamedTuple):
    squeeze: np.ndarray | None  # (n, 2) float32
    benign: dict[str, Copy]  # by name, in BENIGN_COPIES' order; empty without `benign`


def batch_extras(
    model: LoadedModel,
    layers: Sequence[str],
    x: Tensor | None,
    logits: Tensor | None,
    ok: np.ndarray,
    start: int,
    *,
    squeeze: bool,
    benign: bool,
) -> Extras:
    """The squeezing distances and the benign copies of a batch's good samples x (as decode()
    returns them, its rows `start + flatnonzero(ok)` of the job) whose hooked forward gave
    `logits`, spread over the batch (x None when no sample is good). One copy at a time, so
    memory holds one copy of the batch; the squeezed passes run without hooks."""
    prep = model.info.preprocessing
    rows = (start + np.flatnonzero(ok)).tolist()

    def run(v: Tensor) -> Tensor:
        return model.run(lambda u: (model.module(u), {}), v)[0]

    def spread(values: Tensor | None, width: int) -> np.ndarray:
        full = np.full((ok.size, width), np.nan, dtype=np.float32)
        if values is not None:
            full[ok] = values.float().cpu().numpy()
        return full

    squeezed = None
    if squeeze:
        found = None if x is None else squeeze_distances(run, x, prep, logits)
        squeezed = spread(found, len(SQUEEZERS))
    copies = {}
    widths = {layer: model.info.layer(layer).output_shape[0] for layer in layers}
    for name in BENIGN_COPIES if benign else ():
        if x is None:
            empty = {layer: spread(None, w) for layer, w in widths.items()}
            squeezed_copy = spread(None, len(SQUEEZERS)) if squeeze else None
            copies[name] = Copy(spread(None, model.info.classes), empty, squeezed_copy)
            continue
        with torch.inference_mode():
            copy = normalised(benign_copy(name, pixels(x, prep), rows), prep)
            with capture(model.module, layers) as forward:
                out, captured = model.run(forward, copy)
            means = {layer: spread(pooled(t), widths[layer]) for layer, t in captured.items()}
            distances = squeeze_distances(run, copy, prep, out) if squeeze else None
        copies[name] = Copy(
            spread(out, model.info.classes),
            means,
            None if distances is None else spread(distances, len(SQUEEZERS)),
        )
    return Extras(squeezed, copies)
