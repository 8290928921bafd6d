"""What a screening profile reads of a model run in process on images in [0, 1].

Owns `screening_inputs`: what `ScreeningProfile` scores (pooled activations of the named
layers, the logits, the feature-squeezing distances; workers.analysis.screening keys the
last two LOGITS and SQUEEZE) from one forward with hooks (hooks.capture, removed on every
exit) and the squeezed forwards. The pooled activation is the spatial mean per channel, as
extraction stores it. For fitting a profile on benign corruptions, benchmarks and tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from workers.extraction.attacks import normaliser
from workers.extraction.hooks import capture
from workers.extraction.squeezing import squeeze_distance, squeezers_for
from workers.jobs import Preprocessing

__all__ = ["screening_inputs"]


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
                spatial = tuple(range(2, out.dim()))
                parts[name].append((out.float().mean(dim=spatial) if spatial else out).numpy())
    # The squeezed passes run without hooks: only their softmax is needed.
    for start in range(0, x.shape[0], batch):
        squeezed = squeeze_distance(on_pixels, x[start : start + batch], bits, median)
        parts[squeeze].append(squeezed.numpy())
    found = {n: np.concatenate(p).astype(np.float64) for n, p in parts.items()}
    return found, found.pop(logits_), found.pop(squeeze)
