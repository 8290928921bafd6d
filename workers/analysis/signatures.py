"""Family signatures: the channels a class (family) consistently activates.

Owns the rule: a channel belongs to a family's signature when at least `min_share` (0.9) of
the family's samples are above the reference population's `q` (90th) percentile of that
channel. Pooled activations (N, C) are read in blocks of rows; the sample count behind each
family travels with its signature, since 9 of 10 is weaker evidence than 900 of 1000.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from workers.analysis.stats import DEFAULT_BLOCK, Rows, channel_quantiles
from workers.errors import SpecError

__all__ = ["Signatures", "family_signatures"]


@dataclass(frozen=True)
class Signatures:
    """`families` (F,) with their `n_samples` (F,); `share` (F, C): the share of each
    family's samples above `threshold` (C,), the reference percentile per channel."""

    families: np.ndarray
    n_samples: np.ndarray
    share: np.ndarray
    threshold: np.ndarray
    min_share: float

    @property
    def consistent(self) -> np.ndarray:
        """(F, C) bool: channel c is in family f's signature."""
        member: np.ndarray = self.share >= self.min_share
        return member

    def channels(self, family: int) -> np.ndarray:
        """The signature channels of one family, the most consistent first."""
        where = np.flatnonzero(self.families == family)
        if where.size == 0:
            known = ", ".join(str(f) for f in self.families.tolist())
            raise SpecError(f"no family {family} among the samples; known: {known}")
        share = self.share[where[0]]
        chosen = np.flatnonzero(share >= self.min_share)
        return chosen[np.argsort(-share[chosen], kind="stable")]


def family_signatures(
    pooled: Rows,
    families: npt.ArrayLike,
    reference: Rows | None = None,
    *,
    q: float = 0.9,
    min_share: float = 0.9,
    block: int = DEFAULT_BLOCK,
) -> Signatures:
    """Signatures of every family in `families` (N,) from `pooled` (N, C).

    `reference` (M, C) is the population the percentile comes from: a clean reference job,
    or the samples of the other families. The default, `pooled` itself, suits many small
    families only: with it a family of more than (1 - q) / min_share of the samples (11% at
    the defaults) cannot fill the top decile. The percentile is exact for up to 20,000
    reference samples and estimated from a uniform sample of them beyond. Samples of family
    -1 (unknown) count in no family, only in the default reference.
    """
    fam = np.asarray(families)
    if len(pooled.shape) != 2:
        raise SpecError(f"signatures read pooled activations (N, C), got shape {pooled.shape}")
    if fam.shape != (pooled.shape[0],):
        raise SpecError(f"give one family per sample: {pooled.shape[0]}, got {fam.shape}")
    if not 0.0 < min_share <= 1.0:
        raise SpecError(f"min_share is a share in (0, 1], got {min_share}")
    ref = pooled if reference is None else reference
    if len(ref.shape) != 2 or ref.shape[1] != pooled.shape[1]:
        raise SpecError(
            f"the reference must be pooled (M, {pooled.shape[1]}), got shape {ref.shape}"
        )
    threshold = channel_quantiles(ref, q, capacity=20_000, block=block)
    known = np.unique(fam[fam >= 0])
    if known.size == 0:
        raise SpecError("no sample has a known family (label >= 0); give labels to the job")
    counts = np.zeros(known.size, dtype=np.int64)
    above = np.zeros((known.size, pooled.shape[1]), dtype=np.int64)
    for start in range(0, pooled.shape[0], block):
        values = np.asarray(pooled[start : start + block], dtype=np.float64)
        part = fam[start : start + block]
        index = np.searchsorted(known, part)
        mask = part >= 0
        # A one-hot (samples x families) product counts each family's hits per channel.
        onehot = np.zeros((part.size, known.size), dtype=np.int64)
        onehot[np.flatnonzero(mask), index[mask]] = 1
        counts += onehot.sum(axis=0)
        above += onehot.T @ (values > threshold).astype(np.int64)
    return Signatures(
        families=known.astype(np.int64),
        n_samples=counts,
        share=above / counts[:, None],
        threshold=threshold,
        min_share=min_share,
    )
