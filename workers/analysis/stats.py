"""Streaming per-channel statistics of activation arrays (numpy only).

Owns the one pass over an array of shape (N, C, *spatial) or pooled (N, C), read in blocks of
rows so that memory is bounded by one block whatever N is: `ChannelMoments` (count, mean,
variance, min, max, on-rate and the share above a per-channel threshold, merged with Chan's
parallel algorithm in float64) and `ChannelQuantiles` (per-channel quantiles from a bounded
uniform sample). Anything with `.shape` and row slicing is read: numpy arrays, Zarr arrays.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from workers.errors import SpecError

__all__ = [
    "ChannelMoments",
    "ChannelQuantiles",
    "ChannelStats",
    "Rows",
    "channel_quantiles",
    "channel_stats",
    "iter_rows",
    "read_blocks",
]

DEFAULT_BLOCK = 256
# Bytes per value of a block of rows while it is read and reduced: the block as stored,
# its float64 copy and the squared deviations `ChannelMoments.update` makes of it.
_READ_BYTES = 32


class Rows(Protocol):
    """An array read a block of rows at a time: a numpy array, a Zarr array."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, key: Any, /) -> Any: ...


def iter_rows(rows: Rows, block: int = DEFAULT_BLOCK) -> Iterator[np.ndarray]:
    """Consecutive blocks of at most `block` rows, each read into memory on its own."""
    if block < 1:
        raise SpecError(f"block must be at least 1 row, got {block}")
    for start in range(0, rows.shape[0], block):
        yield np.asarray(rows[start : start + block])


def read_blocks(
    source: Rows, nbytes: int | None, cols: slice | None = None
) -> Iterator[np.ndarray]:
    """Columns `cols` (default: all) of every row, in consecutive blocks of rows that take
    about `nbytes` each as read and reduced in float64; None: one block of everything.

    A source that tells how many rows its stored chunks hold (`chunk_rows`, as a Zarr
    array picked by `stored_job.Picked` does) is read whole chunks at a time, as many as fit
    `nbytes` at its full width and at least one, and the blocks are cut from those:
    decoding a chunk costs the same for one row as for all, so each is decoded once."""
    cols = slice(None) if cols is None else cols
    if nbytes is None:
        yield np.asarray(source[:, cols])
        return
    if nbytes < 1:
        raise SpecError(f"a memory budget is a positive number of bytes, got {nbytes}")
    n, width = int(source.shape[0]), int(source.shape[1])
    rows = max(1, nbytes // (len(range(width)[cols]) * _READ_BYTES))
    chunk = int(getattr(source, "chunk_rows", 0) or 0)
    step = chunk * max(1, nbytes // (width * _READ_BYTES) // chunk) if chunk else rows
    for start in range(0, n, step):
        part = np.asarray(source[start : start + step, cols])
        for at in range(0, part.shape[0], rows):
            yield part[at : at + rows]


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel results over every sample and position; each array has shape (C,).

    `positions` is the number of values behind each channel (samples times spatial size);
    `var` is the population variance (ddof 0) of those values; `on_rate` the share above 0;
    `high_rate` the share above the accumulator's `high` threshold, None without one.
    """

    samples: int
    positions: int
    mean: np.ndarray
    var: np.ndarray
    min: np.ndarray
    max: np.ndarray
    on_rate: np.ndarray
    high_rate: np.ndarray | None

    @property
    def std(self) -> np.ndarray:
        std: np.ndarray = np.sqrt(self.var)
        return std

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])


class ChannelMoments:
    """Accumulates `ChannelStats` block by block; blocks (and accumulators) merge exactly.

    `high` is an optional per-channel threshold (a scalar or shape (C,)), for instance a
    reference population's 99th percentile, whose exceedances are counted.
    """

    def __init__(self, channels: int, high: npt.ArrayLike | None = None) -> None:
        if channels < 1:
            raise SpecError(f"an activation has at least one channel, got {channels}")
        self.channels = channels
        self.high = None if high is None else _per_channel(high, channels, "high")
        self._samples = 0
        self._n = 0
        self._mean = np.zeros(channels)
        self._m2 = np.zeros(channels)
        self._min = np.full(channels, np.inf)
        self._max = np.full(channels, -np.inf)
        self._on = np.zeros(channels, dtype=np.int64)
        self._above = np.zeros(channels, dtype=np.int64)

    def update(self, chunk: npt.ArrayLike) -> None:
        """Add a block of shape (n, C, *spatial) or (n, C)."""
        x = np.asarray(chunk)
        if x.ndim < 2 or x.shape[1] != self.channels:
            raise SpecError(
                f"expected a block of shape (n, {self.channels}, ...), got {x.shape}; "
                "pass activations of the layer the statistics were started for"
            )
        if x.shape[0] == 0:
            return
        v = x.astype(np.float64, copy=False)
        axes = (0, *range(2, v.ndim))
        shape = (1, -1, *([1] * (v.ndim - 2)))
        mean = v.mean(axis=axes)
        above = np.zeros(self.channels, dtype=np.int64)
        if self.high is not None:
            above = np.count_nonzero(v > self.high.reshape(shape), axis=axes)
        self._fold(
            x.shape[0],
            v.size // self.channels,
            mean,
            np.square(v - mean.reshape(shape)).sum(axis=axes),
            v.min(axis=axes),
            v.max(axis=axes),
            np.count_nonzero(v > 0, axis=axes),
            above,
        )

    def merge(self, other: ChannelMoments) -> None:
        """Fold in another accumulator of the same channels, as if its blocks were read here."""
        if other.channels != self.channels:
            raise SpecError(
                f"cannot merge statistics of {other.channels} channels into {self.channels}"
            )
        self._fold(
            other._samples,
            other._n,
            other._mean,
            other._m2,
            other._min,
            other._max,
            other._on,
            other._above,
        )

    def _fold(
        self,
        samples: int,
        n: int,
        mean: np.ndarray,
        m2: np.ndarray,
        low: np.ndarray,
        high: np.ndarray,
        on: np.ndarray,
        above: np.ndarray,
    ) -> None:
        # Chan, Golub and LeVeque's pairwise update: stable where sum-of-squares is not.
        if n == 0:
            return
        total = self._n + n
        delta = mean - self._mean
        self._mean = self._mean + delta * (n / total)
        self._m2 = self._m2 + m2 + np.square(delta) * (self._n * n / total)
        self._n = total
        self._samples += samples
        self._min = np.minimum(self._min, low)
        self._max = np.maximum(self._max, high)
        self._on = self._on + on
        self._above = self._above + above

    def result(self) -> ChannelStats:
        if self._n == 0:
            raise SpecError("no samples were read; select at least one sample")
        return ChannelStats(
            samples=self._samples,
            positions=self._n // max(self._samples, 1),
            mean=self._mean.copy(),
            var=self._m2 / self._n,
            min=self._min.copy(),
            max=self._max.copy(),
            on_rate=self._on / self._n,
            high_rate=None if self.high is None else self._above / self._n,
        )


class ChannelQuantiles:
    """Per-channel quantiles from a bounded uniform sample of each channel's values.

    Exact (equal to `np.quantile` over every value) while at most `capacity` values per
    channel have been seen; beyond that, a uniform sample of `capacity` values (reservoir
    sampling, algorithm R, with the same slots for every channel), so memory stays at
    `capacity * C` values, held as float32 like stored activations.
    """

    def __init__(self, channels: int, capacity: int = 10_000, seed: int = 0) -> None:
        if capacity < 1:
            raise SpecError(f"capacity must be at least 1, got {capacity}")
        self.channels = channels
        self.capacity = capacity
        self._seen = 0
        self._sample = np.empty((channels, capacity), dtype=np.float32)
        self._rng = np.random.default_rng(seed)

    def update(self, chunk: npt.ArrayLike) -> None:
        """Add a block of shape (n, C, *spatial) or (n, C)."""
        x = np.asarray(chunk)
        if x.ndim < 2 or x.shape[1] != self.channels:
            raise SpecError(f"expected a block of shape (n, {self.channels}, ...), got {x.shape}")
        values = np.moveaxis(x, 1, 0).reshape(self.channels, -1)
        free = min(max(self.capacity - self._seen, 0), values.shape[1])
        if free > 0:
            self._sample[:, self._seen : self._seen + free] = values[:, :free]
        rest = values[:, free:]
        if rest.shape[1]:
            # Item number t (0-based, over everything seen) replaces a random slot with
            # probability capacity / (t + 1); when two items draw the same slot the later wins.
            t = self._seen + free + np.arange(rest.shape[1])
            slot = (self._rng.random(t.shape[0]) * (t + 1)).astype(np.int64)
            keep = np.flatnonzero(slot < self.capacity)[::-1]
            slots, first = np.unique(slot[keep], return_index=True)
            self._sample[:, slots] = rest[:, keep[first]]
        self._seen += values.shape[1]

    def quantile(self, q: float) -> np.ndarray:
        """The q-quantile (0 <= q <= 1) of each channel, shape (C,), in float64."""
        if self._seen == 0:
            raise SpecError("no samples were read; select at least one sample")
        if not 0.0 <= q <= 1.0:
            raise SpecError(f"a quantile lies in [0, 1], got {q}")
        held = self._sample[:, : min(self._seen, self.capacity)].astype(np.float64)
        return np.quantile(held, q, axis=1)


def channel_stats(
    rows: Rows, high: npt.ArrayLike | None = None, block: int = DEFAULT_BLOCK
) -> ChannelStats:
    """`ChannelStats` of an array (N, C, *spatial) or (N, C) in one pass of `block` rows."""
    moments = ChannelMoments(_channels(rows), high)
    for chunk in iter_rows(rows, block):
        moments.update(chunk)
    return moments.result()


def channel_quantiles(
    rows: Rows, q: float, capacity: int = 10_000, block: int = DEFAULT_BLOCK
) -> np.ndarray:
    """Per-channel q-quantile of an array (N, C, *spatial) or (N, C), shape (C,)."""
    quantiles = ChannelQuantiles(_channels(rows), capacity)
    for chunk in iter_rows(rows, block):
        quantiles.update(chunk)
    return quantiles.quantile(q)


def _channels(rows: Rows) -> int:
    if len(rows.shape) < 2:
        raise SpecError(f"expected an array (N, C, ...) of activations, got shape {rows.shape}")
    return int(rows.shape[1])


def _per_channel(value: npt.ArrayLike, channels: int, name: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.shape not in ((), (channels,)) or np.isnan(array).any():
        raise SpecError(f"{name} must be one number or one per channel ({channels}), no NaN")
    return np.broadcast_to(array, (channels,)).copy()
