"""Where a screening profile's threshold sits: held-out clean rows and a conformal quantile.

Owns splitting a labelled clean reference into rows the detectors fit on and held-out rows,
refusing a reference too small for a rate, the conformal threshold, and cross-fitted
calibration scores.

A combination learned from the held-out rows (their p-values, weights or picked columns)
scores its own learning rows lower than fresh ones, so those rows cannot place the
threshold as they are. Setting half of them aside for the threshold instead leaves it
resting on few rows, and the realised false-positive rate then moves with the split
(tests/bench/README.md). Cross-fitting keeps every held-out row for both: the rows fall into
FOLDS folds, each fold is scored by the combination learned without it (and without the
benign copies of its rows), and the threshold is the conformal quantile of all those
scores; the profile scores with the combination learned from every held-out row. This is
the cross-conformal construction (Vovk 2015, "Cross-conformal predictors"; Barber et al.
2021, "Predictive inference with the jackknife+"), exact up to how much a combination
learned from (FOLDS - 1) / FOLDS of the rows differs from one learned from all of them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from workers.errors import SpecError

__all__ = [
    "FOLDS",
    "check_reference",
    "conformal_threshold",
    "cross_fitted",
    "held_out_needed",
    "held_out_share",
    "split",
]

# Twenty folds: each learns from 95% of the held-out rows, close to the profile's own
# combination, at twenty small refits.
FOLDS = 20


def cross_fitted(
    n: int, scored_without: Callable[[np.ndarray, np.ndarray], np.ndarray], seed: int
) -> np.ndarray:
    """(n,) scores of held-out rows 0..n-1, fold by fold: scored_without(learn, scored)
    scores rows `scored` with a combination learned from rows `learn` only."""
    folds = min(FOLDS, n)
    fold = np.random.default_rng(seed).permutation(n) % folds
    scores = np.empty(n)
    for k in range(folds):
        scored = np.flatnonzero(fold == k)
        scores[scored] = scored_without(np.flatnonzero(fold != k), scored)
    return scores


def conformal_threshold(scores: np.ndarray, fpr: float) -> float:
    """The k-th largest held-out score, k = floor(fpr (n + 1)): a fresh clean score lies above
    it with probability k / (n + 1) <= fpr (exchangeability)."""
    k = int(fpr * (scores.size + 1))
    return float(np.sort(scores)[::-1][k - 1])


def held_out_needed(fpr: float) -> int:
    """Held-out clean samples a conformal threshold at `fpr` needs."""
    return int(np.ceil(1 / fpr)) - 1


def held_out_share(held_out: float, fpr: float, n: int) -> float:
    """The share to hold out: `held_out`, or more when a small reference needs more for
    `fpr` (each class keeps one sample to fit on), so that the default rate works on a demo."""
    return max(held_out, min(held_out_needed(fpr) / max(n, 1), 1.0))


def check_reference(labels: np.ndarray, fpr: float, held_out: float = 0.25) -> None:
    """Refuse, before any work, a reference too small for `fpr`: one that cannot hold out
    enough clean samples while keeping one of each class to fit on."""
    need = held_out_needed(fpr)
    share = held_out_share(held_out, fpr, labels.size)
    sizes = np.unique(labels, return_counts=True)[1]
    got = int(np.minimum(np.round(share * sizes), sizes - 1).sum())
    if got < need:
        raise SpecError(
            f"a false-positive rate of {fpr} needs at least {need} held-out clean samples, "
            f"and this reference of {labels.size} (keeping one of each class to fit on) "
            f"gives {got}; scan more reference samples or raise --fpr"
        )


def split(
    labels: np.ndarray, held_out: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Rows to fit on and held-out rows, per class, keeping at least one of each class to fit."""
    cal = []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        cal.append(rows[: min(round(held_out * rows.size), rows.size - 1)])
    held = np.sort(np.concatenate(cal))
    return np.setdiff1d(np.arange(labels.size), held), held
