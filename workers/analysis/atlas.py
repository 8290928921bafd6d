"""The filter atlas's math (numpy only): each channel's strongest responses over a stream
of activation blocks, the input box each response sees, and the bytes of a binary drawn as
a Nataraj image that the box covers.

Owns `TopResponses` (a running top-n per channel over samples, each sample at its strongest
position, keeping n values and indices per channel whatever the number of samples
streamed), `field_boxes` and `byte_spans`. Ties rank deterministically: a larger value
first, then the earlier sample; within a sample, the earlier row and column.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from workers.jobs import nataraj_width

__all__ = ["Responses", "TopResponses", "byte_spans", "field_boxes"]

# The four numbers of a box, in this order; bottom and right are exclusive.
EDGES = ("top", "left", "bottom", "right")
# The four numbers of a byte span: the ranges [start + k * stride, start + k * stride + run)
# for k = 0, 1, ... while below stop; all -1 when the box covers no byte of the file.
SPAN = ("start", "stop", "stride", "run")


@dataclass(frozen=True)
class Responses:
    """Each channel's n samples with the strongest responses, strongest first, each at its
    strongest position: (C, n) values, the sample (in the order streamed) and the position
    in its map (y, x)."""

    values: np.ndarray
    sample: np.ndarray
    y: np.ndarray
    x: np.ndarray


def _first(values: np.ndarray, k: int) -> np.ndarray:
    """Column indices (C, k) of each row's k largest values, ties to the lower index, in
    ascending column order. Exactly k per row, whatever the ties."""
    width = values.shape[1]
    if k >= width:
        return np.broadcast_to(np.arange(width), values.shape).copy()
    kth = -np.partition(-values, k - 1, axis=1)[:, k - 1 : k]
    above = values > kth
    tie = values == kth
    need = k - above.sum(axis=1, keepdims=True)
    take = above | (tie & (np.cumsum(tie, axis=1) <= need))
    return np.nonzero(take)[1].reshape(values.shape[0], k)


class TopResponses:
    """A running top-n samples per channel over maps fed block by block, (B, C, *spatial),
    in sample order; a sample counts once, at its strongest position, so a channel's atlas
    shows n different inputs. Memory: the n kept per channel plus one block at a time."""

    def __init__(self, channels: int, n: int, spatial: tuple[int, ...]) -> None:
        if n < 1:
            raise ValueError(f"n is at least 1, got {n}")
        self.n, self.spatial = n, spatial
        self.per_sample = math.prod(spatial)
        self.seen = 0
        self._values = np.empty((channels, 0), np.float32)
        self._index = np.empty((channels, 0), np.int64)

    def add(self, block: np.ndarray) -> None:
        b, c = block.shape[:2]
        flat = np.asarray(block, dtype=np.float32).reshape(b, c, -1)
        flat = np.where(np.isnan(flat), -np.inf, flat)  # a NaN (failed sample) never ranks
        at = flat.argmax(axis=2)  # each sample's strongest position: the first on ties
        best = np.take_along_axis(flat, at[..., None], axis=2)[..., 0].T  # (C, B)
        cols = _first(best, self.n)
        # Stream index (sample * per_sample + position) grows with sample, row and column.
        index = (cols + self.seen) * self.per_sample + np.take_along_axis(at.T, cols, axis=1)
        values = np.concatenate([self._values, np.take_along_axis(best, cols, axis=1)], axis=1)
        index = np.concatenate([self._index, index], axis=1)
        order = np.lexsort((index, -values), axis=1)[:, : self.n]
        self._values = np.take_along_axis(values, order, axis=1)
        self._index = np.take_along_axis(index, order, axis=1)
        self.seen += b

    def result(self) -> Responses:
        sample, at = np.divmod(self._index, self.per_sample)
        where = np.unravel_index(at, self.spatial)
        y, x = (where[0], where[1]) if len(self.spatial) == 2 else (np.zeros_like(at), where[0])
        return Responses(self._values, sample, y, x)


def _bins(i: np.ndarray, stored: int, full: int) -> tuple[np.ndarray, np.ndarray]:
    """The layer positions [lo, hi) that stored position i averages: adaptive average
    pooling from `full` to `stored` (PyTorch's bins), or i itself when not downsampled."""
    lo = (i * full) // stored
    hi = -((-(i + 1) * full) // stored)
    return lo, hi


def field_boxes(
    y: np.ndarray,
    x: np.ndarray,
    size: tuple[int, int],
    stride: tuple[int, int],
    offset: tuple[int, int],
    stored: tuple[int, int],
    full: tuple[int, int],
) -> np.ndarray:
    """The input box (..., 4) as EDGES, in input pixels, that positions (y, x) of a stored
    map of shape `stored` see: the union of the receptive fields (`size`, `stride`,
    `offset` per dimension, from the catalogue) of the layer positions that the stored one
    averages when the layer of shape `full` was downsampled. Edges beyond the input are
    kept: they are the padding the crop shows."""
    edges = []
    for at, d in ((np.asarray(y), 0), (np.asarray(x), 1)):
        lo, hi = _bins(at.astype(np.int64), stored[d], full[d])
        edges.append((offset[d] + lo * stride[d], offset[d] + (hi - 1) * stride[d] + size[d]))
    (top, bottom), (left, right) = edges
    return np.stack([top, left, bottom, right], axis=-1).astype(np.int32)


def byte_spans(boxes: np.ndarray, input_hw: tuple[int, int], file_size: int) -> np.ndarray:
    """The bytes (..., 4) as SPAN that boxes of a binary's model input cover: the binary
    is drawn `nataraj_width` bytes a row and resized to `input_hw`, so an input pixel
    stands for a proportional patch of bytes. The padding beyond the input covers none."""
    h, w = input_hw
    width = nataraj_width(file_size)
    rows = -(-file_size // width)
    b = np.asarray(boxes, dtype=np.int64)
    top, bottom = np.clip(b[..., 0], 0, h), np.clip(b[..., 2], 0, h)
    left, right = np.clip(b[..., 1], 0, w), np.clip(b[..., 3], 0, w)
    r0, r1 = (top * rows) // h, -((-bottom * rows) // h)
    c0, c1 = (left * width) // w, -((-right * width) // w)
    start = r0 * width + c0
    stop = np.minimum(file_size, (r1 - 1) * width + c1)
    out = np.stack([start, stop, np.full_like(start, width), c1 - c0], axis=-1)
    empty = (bottom <= top) | (right <= left) | (start >= file_size)
    out[empty] = -1
    return out
