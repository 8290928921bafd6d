"""Choosing a subset of a job's samples: by label, prediction, correctness or ids.

Owns the rules over the per-sample table of a job (`sample`, `label`, `pred`, `error_code`,
as stored in Zarr): failed samples never take part, a label of -1 means unknown, so such
samples are neither correct nor misclassified.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import numpy.typing as npt

from workers.errors import SpecError

__all__ = ["select"]


def select(
    table: Mapping[str, npt.ArrayLike],
    *,
    label: int | Iterable[int] | None = None,
    pred: int | Iterable[int] | None = None,
    correct: bool | None = None,
    ids: Iterable[str] | None = None,
) -> np.ndarray:
    """Row indices (ascending int64) of the samples meeting every condition given.

    `table` maps "label" and "pred" (N,) to arrays, with optional "error_code" (rows with a
    non-zero code are left out) and "sample" (the ids; needed for `ids`). `correct=True`
    keeps samples predicted as their known label, `False` the misclassified ones.
    """
    labels = _column(table, "label")
    n = labels.shape[0]
    keep = np.ones(n, dtype=bool)
    if "error_code" in table:
        keep &= _column(table, "error_code") == 0
    if label is not None:
        keep &= np.isin(labels, _ints(label))
    if pred is not None:
        keep &= np.isin(_column(table, "pred"), _ints(pred))
    if correct is not None:
        hit = _column(table, "pred") == labels
        keep &= (labels >= 0) & (hit if correct else ~hit)
    if ids is not None:
        wanted = list(ids)
        # Zarr gives ids as numpy's StringDType; plain str objects compare everywhere.
        samples = np.asarray([str(v) for v in _column(table, "sample")], dtype=object)
        missing = sorted(set(wanted) - set(samples.tolist()))
        if missing:
            shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise SpecError(f"{len(missing)} sample ids are not in the job ({shown}); check them")
        keep &= np.isin(samples, wanted)
    rows = np.flatnonzero(keep).astype(np.int64)
    if rows.size == 0:
        raise SpecError("no sample meets the selection; widen it (label, pred, correct or ids)")
    return rows


def _column(table: Mapping[str, npt.ArrayLike], name: str) -> np.ndarray:
    if name not in table:
        raise SpecError(f"the sample table has no {name!r} column; select on what the job stores")
    return np.asarray(table[name])


def _ints(values: int | Iterable[int]) -> np.ndarray:
    return np.atleast_1d(np.asarray(values if isinstance(values, int) else list(values)))
