"""What a screening profile reads of a model run in process on images in [0, 1].

Owns `screening_inputs`: the mapping `ScreeningProfile` scores (pooled activations of the
named layers, the logits under LOGITS, the feature-squeezing distances under SQUEEZE) from one
forward with hooks (workers.extraction.hooks.capture, removed on every exit) and the
squeezed forwards. The pooled activation is the spatial mean per channel, as extraction
stores it. For fitting a profile on benign corruptions and for benchmarks and tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from workers.analysis.screening import LOGITS, SQUEEZE
from workers.analysis.squeezing import squeeze_distance, squeezers_for
from workers.extraction.attacks import normaliser
from workers.extraction.hooks import capture
from workers.jobs import Preprocessing

__all__ = ["screening_inputs"]


@torch.inference_mode()
def screening_inputs(
    model: nn.Module,
    x: Tensor,
    preprocessing: Preprocessing,
    layers: Sequence[str],
    batch: int = 500,
) -> dict[str, np.ndarray]:
    """{layer: (n, C), LOGITS: (n, K), SQUEEZE: (n, 2)} of pixels x (n, C, H, W) in [0, 1]."""
    normalise = normaliser(preprocessing)
    bits, median = squeezers_for(x.shape[1])

    def on_pixels(v: Tensor) -> Tensor:
        out: Tensor = model(normalise(v))
        return out

    parts: dict[str, list[np.ndarray]] = {name: [] for name in (*layers, LOGITS, SQUEEZE)}
    with capture(model, layers) as forward:
        for start in range(0, x.shape[0], batch):
            xb = x[start : start + batch]
            logits, outputs = forward(normalise(xb))
            parts[LOGITS].append(logits.float().numpy())
            for name, out in outputs.items():
                spatial = tuple(range(2, out.dim()))
                parts[name].append((out.float().mean(dim=spatial) if spatial else out).numpy())
    # The squeezed passes run without hooks: only their softmax is needed.
    for start in range(0, x.shape[0], batch):
        squeezed = squeeze_distance(on_pixels, x[start : start + batch], bits, median)
        parts[SQUEEZE].append(squeezed.numpy())
    return {n: np.concatenate(p).astype(np.float64) for n, p in parts.items()}
