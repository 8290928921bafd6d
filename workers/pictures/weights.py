"""Display normalisation of conv filter weights (numpy only).

Map to [0, 1] by min and max, giving zeros where the values are constant, either per
filter or over the whole layer.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["normalise_filters"]


def normalise_filters(
    weights: np.ndarray, over: Literal["filter", "layer"] = "filter"
) -> np.ndarray:
    """Weights (out, in, *kernel) scaled into [0, 1] as float32."""
    w = np.asarray(weights, dtype=np.float32)
    if w.ndim < 3:
        raise ValueError(
            f"conv weights have at least 3 dimensions (out, in, kernel), got {w.shape}"
        )
    axes = tuple(range(1, w.ndim)) if over == "filter" else tuple(range(w.ndim))
    low = w.min(axis=axes, keepdims=True)
    span = w.max(axis=axes, keepdims=True) - low
    safe = np.where(span > 0, span, 1.0)
    return np.where(span > 0, (w - low) / safe, 0.0).astype(np.float32)
