"""How a screening profile's columns become one score: Fisher's method over empirical
p-values, in two families.

Owns `FisherCombination`. Each column (a detector's score on one layer, an output score, the
squeezing distance; higher is more suspicious) becomes an empirical p-value against a
reference of negatives: held-out clean samples and, when the profile has them, their benign
corruptions (noise, blur, JPEG-like), so that a value as far from clean as noise or blur
reaches gives a large p-value and weighs nothing. The p-values combine by Fisher's method
(R. A. Fisher 1925, "Statistical Methods for Research Workers": the sum of -log p) within
each family, the feature-space columns of every layer and the output-space columns (logits,
squeezing), and each family's sum is turned into a p-value against the same negatives and
the families combine by Fisher's method again. A conformal threshold on fresh clean samples
stays the profile's job (screening.py).

Why families: an attack of large L-infinity size moves many feature-space columns at once
(their sum adds up), while a minimal-perturbation attack (Carlini-Wagner, DeepFool) moves
almost only the logit margin and the squeezing distance (Xu et al. 2018); one sum over all
columns would drown those two under twenty uninformative ones, and a maximum over all
columns gives clean samples a heavy upper tail. Empirical p-values follow the conformal
construction (Vovk et al. 2005; Bates et al. 2023, "Testing for outliers with conformal
p-values"): (1 + #{reference >= x}) / (1 + m), that count linear between reference values,
with an exponential tail past the reference's top values (see _neg_log_p).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workers.analysis.auroc import rank_auroc

__all__ = [
    "COMBINE",
    "FAMILIES",
    "Combination",
    "FisherCombination",
    "families_of",
    "picked",
]

COMBINE = ("fisher", "weighted", "max", "mean")

FAMILIES = ("features", "outputs")
# Columns whose "layer" is one of these are output-space; every other column is a layer's.
OUTPUT_LAYERS = ("logits", "input")
# The share of the reference's largest values its p-values' exponential tail is fitted to.
TAIL = 0.1
# How much of the benign copies the weighted combination keeps within a z-score of 1.
BENIGN_QUANTILE = 0.99
# A column known attacks must separate from clean and benign samples this well to be kept.
SELECTED_AUROC = 0.75


def families_of(layers: list[str]) -> np.ndarray:
    """(len(layers),) index into FAMILIES of each column, from the column's layer."""
    return np.asarray([int(layer in OUTPUT_LAYERS) for layer in layers], dtype=np.int64)


def _neg_log_p(reference: np.ndarray, x: np.ndarray) -> np.ndarray:
    """-log of the p-value of each x (n,) against a sorted reference (m,): empirical up to
    the reference's top TAIL share, an exponential tail fitted to those top values beyond
    (peaks over a threshold, Pickands 1975, with the generalised Pareto's shape at 0): an
    empirical p-value stops at 1 / (m + 1), which would make a sample far beyond every
    reference value no more suspicious than the reference's own extremes. The count of
    reference values at or above x is exact at each of them and linear in between, so that
    a score moves continuously with x: the same sample in another batch differs by float
    noise, which must not move it by a whole rank."""
    m = reference.size
    first = np.r_[True, reference[1:] != reference[:-1]]
    knots, below = reference[first], np.flatnonzero(first)  # below: #{reference < knot}

    def neg_log_p(v: np.ndarray) -> np.ndarray:
        above = m - np.interp(v, knots, below)
        out: np.ndarray = -np.log((above + 1.0) / (m + 1.0))
        return out

    out = neg_log_p(x)
    top = max(2, int(np.ceil(TAIL * m)))
    if m <= top:
        return out
    start = reference[m - top - 1]
    scale = float(np.mean(reference[m - top :] - start))
    if not scale > 0:
        scale = float(np.std(reference)) or 1.0
    beyond = x > start
    out[beyond] = neg_log_p(np.array([start]))[0] + (x[beyond] - start) / scale
    return out


class FisherCombination:
    """The sorted negatives of each column (m, J) and of each family's sum (m, F); `use`
    (J,) bool drops columns (known attacks may pick them)."""

    def __init__(
        self, reference: np.ndarray, family_reference: np.ndarray, families: np.ndarray,
        use: np.ndarray,
    ) -> None:  # fmt: skip
        self.reference = np.asarray(reference, dtype=np.float64)
        self.family_reference = np.asarray(family_reference, dtype=np.float64)
        self.families = np.asarray(families, dtype=np.int64)
        self.use = np.asarray(use, dtype=bool)

    @classmethod
    def fit(cls, negatives: np.ndarray, families: np.ndarray, use: np.ndarray) -> FisherCombination:
        """From the columns' values (m, J) on clean samples and their benign copies."""
        reference = np.sort(negatives, axis=0)
        partial = cls(reference, np.zeros((negatives.shape[0], len(FAMILIES))), families, use)
        sums = partial.family_sums(negatives)
        return cls(reference, np.sort(sums, axis=0), families, use)

    def family_sums(self, z: np.ndarray) -> np.ndarray:
        """(n, F): each family's sum of -log p over its columns in use."""
        sums = np.zeros((z.shape[0], len(FAMILIES)))
        for j in np.flatnonzero(self.use):
            sums[:, self.families[j]] += _neg_log_p(self.reference[:, j], z[:, j])
        return sums

    def score(self, z: np.ndarray) -> np.ndarray:
        """(n,): the Fisher sum over the families that have a column in use."""
        sums = self.family_sums(z)
        out = np.zeros(z.shape[0])
        for f in np.unique(self.families[self.use]):
            out += _neg_log_p(self.family_reference[:, f], sums[:, f])
        return out

    def weights(self) -> np.ndarray:
        """(J,): each column's share of the score's scale: the families weigh the same,
        split evenly over their columns in use (zero for unused ones)."""
        shares = np.zeros(self.use.size)
        present = np.unique(self.families[self.use])
        for f in present:
            mine = self.use & (self.families == f)
            shares[mine] = 1.0 / (mine.sum() * present.size)
        return shares


@dataclass(frozen=True)
class Combination:
    """How z-scores (n, J) become one score: `combine` (one of COMBINE), each column's
    weight `coef` (J,) (zero: left out) and, for "fisher", its p-value references."""

    combine: str
    coef: np.ndarray
    fisher: FisherCombination | None = None

    @classmethod
    def learn(
        cls,
        combine: str,
        families: np.ndarray,
        clean: np.ndarray,
        benign: np.ndarray | None = None,
        adversarial: np.ndarray | None = None,
    ) -> Combination:
        """Learned from the z-scores of held-out clean samples (m, J), their benign copies
        and known attacks (None: not given). "weighted" scales each column by 1 / max(1, q),
        q the BENIGN_QUANTILE of the benign copies' z-scores, so that being as far from
        clean as noise or blur is not enough to be flagged. Known attacks keep the columns
        `picked` by how well they tell the attacks from clean and benign samples ("max" and
        "mean" then become "weighted")."""
        coef = np.ones(clean.shape[1])
        negatives = clean if benign is None else np.concatenate([clean, benign])
        if benign is not None and combine == "weighted":
            coef = 1.0 / np.maximum(1.0, np.quantile(benign, BENIGN_QUANTILE, axis=0))
        if adversarial is not None:
            tells = rank_auroc(np.concatenate([adversarial, negatives]), adversarial.shape[0])
            combine = combine if combine == "fisher" else "weighted"
            coef = np.where(picked(tells), coef, 0.0)
        if combine != "fisher":
            return cls(combine, coef)
        fisher = FisherCombination.fit(negatives, families, coef > 0)
        return cls(combine, fisher.weights(), fisher)

    def score(self, z: np.ndarray) -> np.ndarray:
        """(n,): the combined score of z-scores (n, J); higher is more suspicious."""
        out: np.ndarray
        if self.fisher is not None:
            out = self.fisher.score(z)
        elif self.combine == "weighted":
            out = (z * self.coef)[:, self.coef > 0].max(axis=1)
        elif self.combine == "mean":
            out = z.mean(axis=1)
        else:
            out = z.max(axis=1)
        return out


def picked(tells: np.ndarray) -> np.ndarray:
    """(J,) bool: the columns that tell known attacks from clean and benign samples, given
    each column's AUROC `tells` (J,): at least SELECTED_AUROC, else the best one. A sum over
    every column would add up the small, benign-sized rises of many columns and flag noise."""
    keep: np.ndarray = tells >= SELECTED_AUROC
    return keep if keep.any() else tells == tells.max()
