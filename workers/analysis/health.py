"""Filter health of one layer: dead, always-on, saturated and near-duplicate filters.

Owns the verdicts, not the pass over the data: `filter_health` reads a `ChannelStats`
(stats.py) and `layer_health` runs that one streaming pass itself. `duplicate_filters` looks at
the weights instead: filters that all look identical are a failed training's sign.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from workers.analysis.stats import DEFAULT_BLOCK, ChannelStats, Rows, channel_stats
from workers.errors import SpecError

__all__ = ["Duplicates", "FilterHealth", "duplicate_filters", "filter_health", "layer_health"]

# A dead threshold for activations that can be negative (no ReLU in front): "near zero".
EPSILON = 1e-6


@dataclass(frozen=True)
class FilterHealth:
    """Per-channel health of a layer; every array has shape (C,).

    `apoz` is the average percentage of zeros (1 - on-rate), the sparsity measure;
    `extreme_rate` the share of positions above the reference 99th percentile or at the clip
    value (None when neither was given); `tau` the dead threshold that was applied.
    """

    samples: int
    mean: np.ndarray
    std: np.ndarray
    max: np.ndarray
    on_rate: np.ndarray
    extreme_rate: np.ndarray | None
    dead: np.ndarray
    always_on: np.ndarray
    saturated: np.ndarray
    tau: float

    @property
    def apoz(self) -> np.ndarray:
        apoz: np.ndarray = 1.0 - self.on_rate
        return apoz

    def summary(self) -> dict[str, list[int]]:
        """The channel indices of each finding, as plain JSON-ready lists."""
        return {
            name: np.flatnonzero(getattr(self, name)).tolist()
            for name in ("dead", "always_on", "saturated")
        }


def filter_health(
    stats: ChannelStats,
    *,
    tau: float | None = None,
    always_on: float = 0.99,
    saturated: float = 0.5,
) -> FilterHealth:
    """Verdicts from one pass's statistics.

    Dead: the maximum over every sample and position is <= `tau`; by default 0 for a layer
    that is never negative (right after a ReLU) and `EPSILON` otherwise. Always-on: an
    on-rate >= `always_on`. Saturated: a share >= `saturated` of positions above the
    extreme threshold the statistics were gathered with (see `layer_health`).
    """
    for name, share in (("always_on", always_on), ("saturated", saturated)):
        if not 0.0 < share <= 1.0:
            raise SpecError(f"{name} is a share in (0, 1], got {share}")
    if tau is None:
        tau = 0.0 if bool((stats.min >= 0).all()) else EPSILON
    extreme = stats.high_rate
    return FilterHealth(
        samples=stats.samples,
        mean=stats.mean,
        std=stats.std,
        max=stats.max,
        on_rate=stats.on_rate,
        extreme_rate=extreme,
        dead=stats.max <= tau,
        always_on=stats.on_rate >= always_on,
        saturated=np.zeros(stats.channels, bool) if extreme is None else extreme >= saturated,
        tau=float(tau),
    )


def layer_health(
    acts: Rows,
    *,
    reference_p99: npt.ArrayLike | None = None,
    clip: float | None = None,
    tau: float | None = None,
    always_on: float = 0.99,
    saturated: float = 0.5,
    block: int = DEFAULT_BLOCK,
) -> FilterHealth:
    """Health of a layer's activations (N, C, *spatial) or (N, C) in one streaming pass.

    Extremes are counted above `reference_p99` (per channel, from a reference population,
    e.g. `stats.channel_quantiles(reference, 0.99)`) or at `clip`, the activation's upper
    bound where it has one (6 for ReLU6, 1 for a sigmoid), with a relative tolerance of 1e-3
    because stored activations may be float16.
    """
    if reference_p99 is not None and clip is not None:
        raise SpecError("give either reference_p99 or clip for extremes, not both")
    high: npt.ArrayLike | None = reference_p99
    if clip is not None:
        high = clip - 1e-3 * max(1.0, abs(clip))
    stats = channel_stats(acts, high=high, block=block)
    return filter_health(stats, tau=tau, always_on=always_on, saturated=saturated)


@dataclass(frozen=True)
class Duplicates:
    """Near-duplicate filters: `pairs` (k, 2) of filter indices i < j with their
    `similarity` (k,), strongest first, and `groups`, the connected sets of two or more."""

    pairs: np.ndarray
    similarity: np.ndarray
    groups: list[list[int]]


def duplicate_filters(
    weights: npt.ArrayLike, *, threshold: float = 0.95, centre: bool = False
) -> Duplicates:
    """Pairs of filters whose flattened weights (out, in, *kernel) have a cosine similarity
    above `threshold`.

    With `centre`, each filter's mean is removed first (a Pearson correlation), so filters
    that differ by an offset and a positive scale, which the min-max display normalisation
    shows identically, count as duplicates too. Two all-zero filters are identical; an
    all-zero filter is like no other.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim < 3:
        raise SpecError(f"conv weights have at least 3 dimensions (out, in, kernel), got {w.shape}")
    if not -1.0 <= threshold <= 1.0:
        raise SpecError(f"a cosine similarity threshold lies in [-1, 1], got {threshold}")
    flat = w.reshape(w.shape[0], -1)
    if centre:
        flat = flat - flat.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(flat, axis=1)
    zero = norm == 0
    unit = flat / np.where(zero, 1.0, norm)[:, None]
    sim = unit @ unit.T
    sim[np.ix_(zero, zero)] = 1.0
    i, j = np.nonzero(np.triu(sim > threshold, k=1))
    order = np.argsort(-sim[i, j], kind="stable")
    i, j = i[order], j[order]
    n = w.shape[0]
    graph = coo_matrix((np.ones(i.shape[0]), (i, j)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    sizes = np.bincount(component)
    groups = [np.flatnonzero(component == c).tolist() for c in np.flatnonzero(sizes > 1)]
    return Duplicates(
        pairs=np.stack([i, j], axis=1).astype(np.int64),
        similarity=sim[i, j],
        groups=groups,
    )
