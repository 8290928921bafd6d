"""Per-channel AUROC of two populations of pooled activations, within a memory budget.

Owns the Mann-Whitney AUROC (average ranks, ties counted one half, as
`sklearn.metrics.roc_auc_score` with A as the positive class) of populations read as rows
(n, C), numpy or Zarr. U counts, for each value of one population, the values of the other
below it (plus one half per equal one), so only the smaller population needs to be held,
sorted, while the other streams past it. Channels go a block at a time: one pass over the
rows gathers and sorts a block of columns of the smaller population, a second streams the
larger one's rows. Memory is that block plus one block of rows, sized from the budget. Only
when one channel of the smaller population cannot be held within the budget do
per-channel histograms stand in for the sorted values, and the result states the bound on
its error.
"""

from __future__ import annotations

import numpy as np
from scipy import stats as st

from workers.analysis.stats import Rows, read_blocks
from workers.errors import SpecError

__all__ = ["column_auroc", "rank_auroc"]

# Bytes per histogram bin of one channel: counts of A and B (int64), bincount's result for
# a block of rows, and the cumulative sums and products of the final step.
_BIN_BYTES = 48
# Histogram resolution of the fallback: the bound on the error shrinks with the bin width.
_MIN_BINS, _MAX_BINS = 1 << 8, 1 << 16


def rank_auroc(values: np.ndarray, na: int) -> np.ndarray:
    """AUROC per column of `values` (n, w) held in memory: its first `na` rows are A."""
    nb = values.shape[0] - na
    if na == 0 or nb == 0:
        raise SpecError("both populations need at least one sample; widen the selection")
    ranks = st.rankdata(values, axis=0)
    u = ranks[:na].sum(axis=0) - na * (na + 1) / 2.0
    auc: np.ndarray = u / (na * nb)
    return auc


def column_auroc(
    a: Rows,
    b: Rows,
    budget: int | None,
    span: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(AUROC per channel, the largest possible error of each: None when exact).

    `budget` is in bytes; None reads everything at once. `span` is each channel's lowest
    and highest value over both populations, if known (the histogram fallback needs it).
    Memory beyond the budget: Zarr decoding the chunks of one read (at least one chunk),
    and the (n,) bookkeeping of the selected rows.
    """
    na, nb, channels = int(a.shape[0]), int(b.shape[0]), int(a.shape[1])
    if na == 0 or nb == 0:
        raise SpecError("both populations need at least one sample; widen the selection")
    if budget is None:
        return rank_auroc(np.concatenate([np.asarray(a[:]), np.asarray(b[:])]), na), None
    read = budget // 4  # for the block of rows being read; the rest holds sorted columns
    work = budget - read
    dtype = _dtype(a, b)
    held, passing = (a, b) if na <= nb else (b, a)
    if int(held.shape[0]) * dtype.itemsize > work:
        low, high = span if span is not None else _span(a, b, read)
        return _histogram_auroc(a, b, low, high, work, read)
    width = max(1, min(channels, work // (int(held.shape[0]) * dtype.itemsize)))
    # Twice U of the passing population against the held one: whole numbers, exact in int64.
    twice_u = np.zeros(channels, dtype=np.int64)
    # One channel per row, contiguous for sorting and searching; allocated once, so that
    # two blocks are never alive together.
    space = np.empty((width, int(held.shape[0])), dtype=dtype)
    for start in range(0, channels, width):
        cols = slice(start, min(start + width, channels))
        ordered = space[: cols.stop - cols.start]
        at = 0
        for chunk in read_blocks(held, read, cols):
            ordered[:, at : at + chunk.shape[0]] = chunk.T
            at += chunk.shape[0]
        ordered.sort(axis=1)
        for chunk in read_blocks(passing, read, cols):
            # Sorted needles: searchsorted then starts each search where the last one ended.
            values = np.ascontiguousarray(chunk.T, dtype=dtype)
            values.sort(axis=1)
            for j in range(values.shape[0]):
                below = np.searchsorted(ordered[j], values[j], side="left")
                not_above = np.searchsorted(ordered[j], values[j], side="right")
                twice_u[start + j] += int(below.sum()) + int(not_above.sum())
    if held is a:  # U(A, B) = na * nb - U(B, A)
        twice_u = 2 * na * nb - twice_u
    auc: np.ndarray = twice_u / (2.0 * na * nb)
    if span is not None:  # NaN orders nowhere: no AUROC, as with ranks
        auc[np.isnan(span[0]) | np.isnan(span[1])] = np.nan
    return auc, None


def _dtype(a: Rows, b: Rows) -> np.dtype[np.floating]:
    """The values' own float type, so that comparisons see exactly the stored values."""
    found = np.result_type(np.asarray(a[0:1]).dtype, np.asarray(b[0:1]).dtype)
    return found if found.kind == "f" else np.dtype(np.float64)


def _span(a: Rows, b: Rows, read: int) -> tuple[np.ndarray, np.ndarray]:
    low = np.full(int(a.shape[1]), np.inf)
    high = np.full(int(a.shape[1]), -np.inf)
    for source in (a, b):
        for chunk in read_blocks(source, read):
            low = np.minimum(low, chunk.min(axis=0))
            high = np.maximum(high, chunk.max(axis=0))
    return low, high


def _histogram_auroc(
    a: Rows, b: Rows, low: np.ndarray, high: np.ndarray, work: int, read: int
) -> tuple[np.ndarray, np.ndarray]:
    """AUROC from per-channel histograms over [low, high]: a pair of values in different
    bins is ordered exactly; a pair in the same bin counts one half, as a tie would, so
    the error is at most half the share of A-B pairs that share a bin (returned per
    channel). Channels whose span is not finite get NaN."""
    channels = int(a.shape[1])
    na, nb = int(a.shape[0]), int(b.shape[0])
    bins = int(min(_MAX_BINS, max(_MIN_BINS, work // (_BIN_BYTES * channels))))
    width = max(1, min(channels, work // (_BIN_BYTES * bins)))
    finite = np.isfinite(low) & np.isfinite(high)
    lo = np.where(finite, low, 0.0)
    scale = np.where(finite & (high > lo), bins / np.where(high > lo, high - lo, 1.0), 0.0)
    auc, error = np.empty(channels), np.empty(channels)
    counts = np.empty((2, width * bins), dtype=np.int64)  # once: see column_auroc's space
    for start in range(0, channels, width):
        cols = slice(start, min(start + width, channels))
        w = cols.stop - cols.start
        offsets = np.arange(w, dtype=np.int64) * bins
        counts.fill(0)
        for side, source in enumerate((a, b)):
            for chunk in read_blocks(source, read, cols):
                x = np.where(finite[cols], chunk, lo[cols]).astype(np.float64)
                at = np.clip(((x - lo[cols]) * scale[cols]).astype(np.int64), 0, bins - 1)
                counts[side, : w * bins] += np.bincount((at + offsets).ravel(), minlength=w * bins)
        auc[cols], error[cols] = _from_counts(counts[:, : w * bins].reshape(2, w, bins), na * nb)
    auc[~finite] = np.nan
    error[~finite | (high <= lo)] = 0.0  # one value throughout: a true tie, counted exactly
    return auc, error


def _from_counts(counts: np.ndarray, pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and its error bound per channel from counts (2, w, bins) of A and B."""
    ca, cb = counts[0].astype(np.float64), counts[1].astype(np.float64)
    below = np.cumsum(cb, axis=1) - cb  # B values in lower bins
    auc = (ca * (below + 0.5 * cb)).sum(axis=1) / pairs
    return auc, 0.5 * (ca * cb).sum(axis=1) / pairs
