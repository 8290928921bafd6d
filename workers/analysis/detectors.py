"""The per-layer out-of-distribution detectors that screening combines.

Owns two detectors fitted on clean pooled activations (N, C) of one layer, each reduced to
plain arrays so that a profile can be stored and reloaded without refitting:

* `Mahalanobis` (Lee et al. 2018): class-conditional means and one shared covariance,
  shrunk with Ledoit-Wolf so it stays invertible with few samples; the score is the
  distance to the closest class mean. The inverse is computed once, at fit.
* `Neighbours`: the k nearest neighbours of an L2-normalised sample in a bank of clean
  samples, giving the k-th neighbour distance (Sun et al. 2022) and the local intrinsic
  dimensionality (LID, Ma et al. 2018, maximum-likelihood estimate) from one query.
"""

from __future__ import annotations

import numpy as np
from sklearn.covariance import LedoitWolf

from workers.errors import SpecError

__all__ = ["Mahalanobis", "Neighbours"]

# Rows of queries scored at a time: bounds the (rows x bank) distance matrix in memory.
_QUERY_BLOCK = 512


class Mahalanobis:
    """min over classes c of sqrt((x - mu_c)' P (x - mu_c)), P the shared precision."""

    def __init__(self, means: np.ndarray, precision: np.ndarray) -> None:
        self.means = np.asarray(means, dtype=np.float64)
        self.precision = np.asarray(precision, dtype=np.float64)
        # Expanded form of the quadratic, so scoring is two small matrix products.
        self._p_means = self.precision @ self.means.T
        self._mpm = np.einsum("kc,ck->k", self.means, self._p_means)

    @classmethod
    def fit(cls, x: np.ndarray, labels: np.ndarray) -> Mahalanobis:
        classes = np.unique(labels)
        means = np.stack([x[labels == c].mean(axis=0) for c in classes])
        centred = x - means[np.searchsorted(classes, labels)]
        shrunk = LedoitWolf(assume_centered=True).fit(centred)
        return cls(means, np.asarray(shrunk.precision_, dtype=np.float64))

    def score(self, x: np.ndarray) -> np.ndarray:
        xp = x @ self.precision
        quad = np.einsum("ic,ic->i", xp, x)[:, None] - 2.0 * (x @ self._p_means) + self._mpm
        distance: np.ndarray = np.sqrt(np.maximum(quad.min(axis=1), 0.0))
        return distance

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"class_means": self.means, "precision": self.precision}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Mahalanobis:
        return cls(arrays["class_means"], arrays["precision"])


class Neighbours:
    """k-th nearest neighbour distance and LID of a sample against a bank of clean samples,
    both on L2-normalised features (the scale of a layer's activations drops out)."""

    def __init__(self, bank: np.ndarray, k: int) -> None:
        if not 1 < k <= bank.shape[0]:
            raise SpecError(
                f"k nearest neighbours needs 1 < k <= {bank.shape[0]} reference samples, "
                f"got k={k}; lower k or give more reference samples"
            )
        self.bank = np.asarray(bank, dtype=np.float32)
        self.k = k
        self._bank_sq = np.einsum("ij,ij->i", self.bank, self.bank, dtype=np.float64)

    @classmethod
    def fit(cls, x: np.ndarray, k: int, bank_size: int, rng: np.random.Generator) -> Neighbours:
        rows = np.arange(x.shape[0])
        if rows.size > bank_size:
            rows = np.sort(rng.choice(rows, size=bank_size, replace=False))
        return cls(_unit(x[rows]), k)

    def score(self, x: np.ndarray) -> np.ndarray:
        """(n, 2): the k-th neighbour distance, then the LID estimate."""
        out = np.empty((x.shape[0], 2))
        for start in range(0, x.shape[0], _QUERY_BLOCK):
            q = _unit(x[start : start + _QUERY_BLOCK]).astype(np.float64)
            d2 = np.einsum("ij,ij->i", q, q)[:, None] + self._bank_sq - 2.0 * (q @ self.bank.T)
            r = np.sqrt(np.maximum(np.partition(d2, self.k - 1, axis=1)[:, : self.k], 0.0))
            # LID = -1 / mean_i log(r_i / r_k); a floor keeps exact duplicates finite.
            r = np.maximum(r, 1e-12)
            r_k = r.max(axis=1)
            mean_log = np.log(r / r_k[:, None]).mean(axis=1)
            out[start : start + q.shape[0], 0] = r_k
            out[start : start + q.shape[0], 1] = -1.0 / np.minimum(mean_log, -1e-12)
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"bank": self.bank}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], k: int) -> Neighbours:
        return cls(arrays["bank"], k)


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    unit: np.ndarray = x / np.where(norm > 0, norm, 1.0)
    return unit
