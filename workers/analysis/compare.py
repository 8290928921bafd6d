"""Comparison of two populations of pooled activations, channel by channel, and of pairs.

Owns the statistics (mean difference, Cohen's d, Welch's t with Benjamini-Hochberg
correction, AUROC), the ranking of discriminative channels, and the paired mode: the same
sample ids in both populations (a clean sample and its adversarial copy), with per-sample
cosine and L2 distances and spatial difference maps. Populations are pooled arrays (n, C),
one value per sample and channel, in memory or read as stored rows within a memory budget
(`compare_rows`); choosing which samples form them is selection.py's job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import stats as st

from workers.analysis.auroc import column_auroc, rank_auroc
from workers.analysis.stats import (
    DEFAULT_BLOCK,
    ChannelMoments,
    ChannelStats,
    Rows,
    read_blocks,
)
from workers.errors import SpecError

__all__ = [
    "COMPARE_BUDGET",
    "Comparison",
    "PairedDistances",
    "auroc",
    "benjamini_hochberg",
    "cohen_d",
    "compare",
    "compare_rows",
    "difference_maps",
    "pair_by_id",
    "paired_distances",
    "welch_t",
]

# Bytes a comparison of stored rows holds at once (see compare_rows): large enough to rank
# a few hundred channels of a hundred thousand samples in one pass over the rows.
COMPARE_BUDGET = 256 << 20


def cohen_d(a: ChannelStats, b: ChannelStats) -> np.ndarray:
    """(mean A - mean B) / pooled standard deviation (ddof 1), per channel; 0 where both
    populations are constant and equal, +-inf where constant and different."""
    na, nb = _sizes(a, b)
    pooled = ((na - 1) * _sample_var(a) + (nb - 1) * _sample_var(b)) / (na + nb - 2)
    return _ratio(a.mean - b.mean, np.sqrt(pooled))


def welch_t(a: ChannelStats, b: ChannelStats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Welch's unequal-variance t statistic, its degrees of freedom and the two-sided
    p-value, per channel (as `scipy.stats.ttest_ind(a, b, equal_var=False)`)."""
    na, nb = _sizes(a, b)
    ea, eb = _sample_var(a) / na, _sample_var(b) / nb
    se2 = ea + eb
    t = _ratio(a.mean - b.mean, np.sqrt(se2))
    safe = np.where(se2 > 0, se2, 1.0)
    df = np.where(
        se2 > 0,
        safe**2 / np.maximum(ea**2 / (na - 1) + eb**2 / (nb - 1), np.finfo(float).tiny),
        na + nb - 2.0,
    )
    p = np.where(np.isinf(t), 0.0, 2.0 * st.t.sf(np.abs(t), df))
    return t, df, p


def benjamini_hochberg(p: npt.ArrayLike) -> np.ndarray:
    """Benjamini-Hochberg (1995) adjusted p-values (q-values), same shape as `p`; a test is
    rejected at false discovery rate alpha when q <= alpha. NaN p-values stay NaN and do
    not count towards the number of tests."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = valid.size
    if m == 0:
        return q
    order = valid[np.argsort(p[valid], kind="stable")]
    scaled = p[order] * m / np.arange(1, m + 1)
    q[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return q


def auroc(a: npt.ArrayLike, b: npt.ArrayLike) -> np.ndarray:
    """Per-channel area under the ROC curve of the value as a score for A against B: 1 when
    every A value is above every B value, 0.5 when they are indistinguishable. Equal to
    `sklearn.metrics.roc_auc_score` with A as the positive class, column by column."""
    a, b = _pooled(a, "A"), _pooled(b, "B")
    _same_channels(a.shape[1], b.shape[1])
    # Mann-Whitney U from average ranks (ties count one half), channel by channel.
    return rank_auroc(np.concatenate([a, b]), a.shape[0])


@dataclass(frozen=True)
class Comparison:
    """Population A against B, per channel; arrays have shape (C,). `q` holds the
    Benjamini-Hochberg adjusted p-values of Welch's test within this layer; `auroc_error`
    the largest possible error of each `auroc`, None where they are exact (see auroc.py)."""

    n_a: int
    n_b: int
    mean_a: np.ndarray
    mean_b: np.ndarray
    cohen_d: np.ndarray
    t: np.ndarray
    df: np.ndarray
    p: np.ndarray
    q: np.ndarray
    auroc: np.ndarray
    auroc_error: np.ndarray | None = None

    @property
    def mean_difference(self) -> np.ndarray:
        diff: np.ndarray = self.mean_a - self.mean_b
        return diff

    def ranked(self, alpha: float = 0.05, top: int | None = None) -> np.ndarray:
        """Discriminative channels: q <= alpha, strongest first by |AUROC - 0.5| then |d|;
        class-agnostic channels are the ones left out."""
        keep = np.flatnonzero(self.q <= alpha)
        order = np.lexsort((-np.abs(self.cohen_d[keep]), -np.abs(self.auroc[keep] - 0.5)))
        return keep[order][:top]


def compare(a: npt.ArrayLike, b: npt.ArrayLike) -> Comparison:
    """Every per-channel statistic of pooled populations A (n_a, C) and B (n_b, C)."""
    return compare_rows(_pooled(a, "A"), _pooled(b, "B"), budget=None)


def compare_rows(a: Rows, b: Rows, *, budget: int | None = COMPARE_BUDGET) -> Comparison:
    """`compare` of populations read as rows (pooled (n, C): Zarr or numpy), holding about
    `budget` bytes at most (None: no bound). Moments stream in one pass of row blocks
    (Welch's t and Cohen's d need only them); AUROC takes a block of channels per pass
    (see auroc.py), so the numbers are those of `compare` on the same values."""
    _same_channels(_width(a, "A"), _width(b, "B"))
    read = None if budget is None else budget // 4
    sa, sb = _moments(a, read), _moments(b, read)
    t, df, p = welch_t(sa, sb)
    d = cohen_d(sa, sb)
    span = (np.minimum(sa.min, sb.min), np.maximum(sa.max, sb.max))
    auc, error = column_auroc(a, b, budget, span)
    return Comparison(
        n_a=sa.samples,
        n_b=sb.samples,
        mean_a=sa.mean,
        mean_b=sb.mean,
        cohen_d=d,
        t=t,
        df=df,
        p=p,
        q=benjamini_hochberg(p),
        auroc=auc,
        auroc_error=error,
    )


def pair_by_id(ids_a: Sequence[str], ids_b: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Row indices into A and B of the sample ids present in both, in A's order."""
    where_b = {sample: row for row, sample in enumerate(ids_b)}
    pairs = [(row, where_b[sample]) for row, sample in enumerate(ids_a) if sample in where_b]
    if not pairs:
        raise SpecError("no sample id is in both populations; paired mode needs matching ids")
    rows = np.asarray(pairs, dtype=np.int64)
    return rows[:, 0], rows[:, 1]


@dataclass(frozen=True)
class PairedDistances:
    """Per pair of samples, over the whole flattened layer: cosine distance (1 - cosine
    similarity; 0 for two all-zero activations, 1 for one) and L2 distance, shape (n,)."""

    cosine: np.ndarray
    l2: np.ndarray


def paired_distances(
    a: Rows,
    b: Rows,
    rows_a: npt.ArrayLike | None = None,
    rows_b: npt.ArrayLike | None = None,
    block: int = DEFAULT_BLOCK,
) -> PairedDistances:
    """Distances between row rows_a[i] of A and rows_b[i] of B (default: row i of each), for
    activations (N, C, *spatial) or (N, C), read `block` pairs at a time."""
    ia, ib = _pair_rows(a, b, rows_a, rows_b)
    cosine, l2 = np.empty(ia.size), np.empty(ia.size)
    for start in range(0, ia.size, block):
        part = slice(start, start + block)
        x = np.asarray(a[ia[part]], dtype=np.float64).reshape(ia[part].size, -1)
        y = np.asarray(b[ib[part]], dtype=np.float64).reshape(ib[part].size, -1)
        nx, ny = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
        both = (nx > 0) & (ny > 0)
        dot = np.einsum("ij,ij->i", x, y)
        cos = np.where(both, dot / np.where(both, nx * ny, 1.0), (nx == 0) & (ny == 0))
        cosine[part] = 1.0 - np.clip(cos, -1.0, 1.0)
        l2[part] = np.linalg.norm(x - y, axis=1)
    return PairedDistances(cosine=cosine, l2=l2)


def difference_maps(
    a: Rows,
    b: Rows,
    channels: Sequence[int],
    rows_a: npt.ArrayLike | None = None,
    rows_b: npt.ArrayLike | None = None,
    block: int = DEFAULT_BLOCK,
) -> np.ndarray:
    """A minus B for the chosen channels of each pair: (n, len(channels), *spatial) float32.
    Positive where A responds more strongly (for A adversarial: where the attack excites).
    Read `block` pairs at a time, so memory is the result plus one block."""
    ia, ib = _pair_rows(a, b, rows_a, rows_b)
    picked = np.asarray(channels, dtype=np.int64)
    width = a.shape[1]
    if picked.size == 0 or picked.min() < 0 or picked.max() >= width:
        raise SpecError(f"choose channels among the layer's {width} (0 to {width - 1})")
    out = np.empty((ia.size, picked.size, *a.shape[2:]), dtype=np.float32)
    for start in range(0, ia.size, block):
        part = slice(start, start + block)
        x = np.asarray(a[ia[part]])[:, picked].astype(np.float32)
        out[part] = x - np.asarray(b[ib[part]])[:, picked].astype(np.float32)
    return out


def _pair_rows(
    a: Rows, b: Rows, rows_a: npt.ArrayLike | None, rows_b: npt.ArrayLike | None
) -> tuple[np.ndarray, np.ndarray]:
    if tuple(a.shape[1:]) != tuple(b.shape[1:]):
        raise SpecError(
            f"paired activations must have the same shape per sample, got {a.shape[1:]} "
            f"and {b.shape[1:]}; compare the same layer of the same model"
        )
    ia = np.arange(a.shape[0]) if rows_a is None else np.asarray(rows_a, dtype=np.int64)
    ib = np.arange(b.shape[0]) if rows_b is None else np.asarray(rows_b, dtype=np.int64)
    if ia.shape != ib.shape or ia.ndim != 1:
        raise SpecError("pair rows one to one: give as many rows of A as of B (see pair_by_id)")
    if ia.size == 0:
        raise SpecError("no pairs to compare; select at least one sample in both")
    return ia, ib


def _pooled(x: npt.ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(x)
    _width(array, name)
    return array


def _width(x: Rows, name: str) -> int:
    if len(x.shape) != 2:
        raise SpecError(
            f"population {name} must be pooled activations (n, C), got shape {tuple(x.shape)}"
        )
    return int(x.shape[1])


def _same_channels(ca: int, cb: int) -> None:
    if ca != cb:
        raise SpecError(
            f"the populations have {ca} and {cb} channels; compare the same layer of one model"
        )


def _moments(x: Rows, read: int | None) -> ChannelStats:
    moments = ChannelMoments(int(x.shape[1]))
    for block in read_blocks(x, read):
        moments.update(block)
    return moments.result()


def _sizes(a: ChannelStats, b: ChannelStats) -> tuple[int, int]:
    _same_channels(a.channels, b.channels)
    if a.positions != 1 or b.positions != 1:
        raise SpecError("compare pooled activations (n, C): one value per sample and channel")
    if a.samples < 2 or b.samples < 2:
        raise SpecError(
            f"each population needs at least 2 samples, got {a.samples} and {b.samples}; "
            "widen the selection"
        )
    return a.samples, b.samples


def _sample_var(s: ChannelStats) -> np.ndarray:
    var: np.ndarray = s.var * (s.samples / (s.samples - 1))
    return var


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, with 0 for 0 / 0 and +-inf for x / 0."""
    safe = np.where(den > 0, den, 1.0)
    out: np.ndarray = np.where(
        den > 0, num / safe, np.where(num == 0, 0.0, np.copysign(np.inf, num))
    )
    return out
