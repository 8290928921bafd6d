"""How much each channel's activation map overlaps a sample's Grad-CAM map.

Two measures, both at the layer's resolution:
- correlation: the Pearson correlation of the channel's map with the Grad-CAM map over
  the layer's positions; a flat map (either one) correlates with nothing: 0.
- IoU: each map thresholded at its own top 20% of positions (values above zero only),
  then intersection over union of the two masks; 0 when both masks are empty.
Channels are ranked by correlation, ties by channel index. Numpy only, no store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["MEASURE", "TOP_SHARE", "Overlap", "class_counts", "overlap", "top_channels"]

TOP_SHARE = 0.2
MEASURE = (
    "channels ranked by the Pearson correlation of their activation map with the sample's "
    "Grad-CAM map at the layer's resolution; iou: both maps thresholded at their own top "
    f"{TOP_SHARE:.0%} of positions (values above zero), intersection over union"
)


@dataclass(frozen=True)
class Overlap:
    """(n, C) float32 each: per sample and channel."""

    correlation: np.ndarray
    iou: np.ndarray


def _mask(values: np.ndarray) -> np.ndarray:
    """Each map's top TOP_SHARE of positions (last axis), above zero only."""
    positions = values.shape[-1]
    k = max(1, math.ceil(TOP_SHARE * positions))
    threshold = np.partition(values, positions - k, axis=-1)[..., positions - k]
    mask: np.ndarray = (values >= threshold[..., None]) & (values > 0)
    return mask


def overlap(acts: np.ndarray, cams: np.ndarray) -> Overlap:
    """`acts` (n, C, *spatial) against `cams` (n, *spatial) of the same samples."""
    n, channels = acts.shape[:2]
    if cams.shape != (n, *acts.shape[2:]):
        raise ValueError(f"maps of shape {cams.shape} do not match activations {acts.shape}")
    a = acts.reshape(n, channels, -1).astype(np.float32)
    g = cams.reshape(n, -1).astype(np.float32)
    a_c = a - a.mean(axis=-1, keepdims=True)
    g_c = g - g.mean(axis=-1, keepdims=True)
    num = np.einsum("ncp,np->nc", a_c, g_c)
    den = np.sqrt(np.einsum("ncp,ncp->nc", a_c, a_c) * np.einsum("np,np->n", g_c, g_c)[:, None])
    # Below this, the deviations are float32 rounding of a flat map, not a pattern.
    flat = den <= 1e-12 * np.maximum(1.0, np.abs(a).max(axis=-1) * np.abs(g).max(axis=-1)[:, None])
    correlation = np.where(flat, 0.0, num / np.where(flat, 1.0, den)).astype(np.float32)
    mask_a, mask_g = _mask(a), _mask(g)[:, None, :]
    inter = (mask_a & mask_g).sum(axis=-1)
    union = (mask_a | mask_g).sum(axis=-1)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0).astype(np.float32)
    return Overlap(np.clip(correlation, -1.0, 1.0), iou)


def top_channels(correlation: np.ndarray, k: int) -> np.ndarray:
    """(n, k) channel positions, the best overlap first (ties: the lower channel)."""
    order = np.argsort(-correlation, axis=1, kind="stable")
    top: np.ndarray = order[:, :k]
    return top


def class_counts(targets: np.ndarray, top: np.ndarray, classes: int, channels: int) -> np.ndarray:
    """(classes, channels) int64: how often each channel is in the top-k of the samples
    explained for each class (targets -1 count nowhere)."""
    counts = np.zeros((classes, channels), dtype=np.int64)
    known = targets >= 0
    rows = np.repeat(targets[known], top.shape[1])
    np.add.at(counts, (rows, top[known].ravel()), 1)
    return counts
