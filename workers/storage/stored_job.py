"""The one reader of a stored job: analyses, pictures and the API read a job through here.

Owns what a reader asks of a job group: its attrs, its per-sample columns (read once, when
first asked for), the samples a selection keeps (`select`: failed samples never take part,
a label of -1 is unknown, so such samples are neither correct nor misclassified), its
stored layers (`StoredLayer`), rows of a stored array read a block at a time (`Picked`),
a screening job's scores and the filter weights a report kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt
import zarr

from workers.errors import LayerError, NotFound, SpecError
from workers.jobs import JobState, close_matches
from workers.storage.layout import (
    ACTS,
    ERROR_CODE,
    FILTERS,
    FLAG,
    KEPT_CHANNEL,
    LABEL,
    LAYERS,
    LOGITS,
    POOLED,
    PRED,
    SAMPLE,
    SCORE,
    SCREEN,
    SOURCE,
    TOP_CHANNEL,
    array,
    attrs,
    layer_path,
    open_job,
    read,
)
from workers.storage.quantised import OFFSET, SCALE, Decoded

__all__ = [
    "Acts",
    "Picked",
    "Screening",
    "Selection",
    "StoredJob",
    "StoredLayer",
    "layer_group",
    "open_acts",
    "read_filters",
    "sample_rows",
    "screening",
    "select",
    "subgroup",
]

_FINISHED = (JobState.SUCCEEDED, JobState.PARTIAL)
# A screening job's scores, flags (None when absent) and threshold (None when unknown).
Screening = tuple[np.ndarray, np.ndarray | None, float | None]


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
    labels = _column(table, LABEL)
    n = labels.shape[0]
    keep = np.ones(n, dtype=bool)
    if ERROR_CODE in table:
        keep &= _column(table, ERROR_CODE) == 0
    if label is not None:
        keep &= np.isin(labels, _ints(label))
    if pred is not None:
        keep &= np.isin(_column(table, PRED), _ints(pred))
    if correct is not None:
        hit = _column(table, PRED) == labels
        keep &= (labels >= 0) & (hit if correct else ~hit)
    if ids is not None:
        wanted = list(ids)
        # Zarr gives ids as numpy's StringDType; plain str objects compare everywhere.
        samples = np.asarray([str(v) for v in _column(table, SAMPLE)], dtype=object)
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


@dataclass(frozen=True)
class Selection:
    """The samples of one job that meet every condition given (see `select`); failed
    samples never take part."""

    job_id: str
    label: int | tuple[int, ...] | None = None
    pred: int | tuple[int, ...] | None = None
    correct: bool | None = None
    ids: tuple[str, ...] | None = None

    def as_json(self) -> dict[str, Any]:
        given = {
            "job_id": self.job_id,
            "label": self.label,
            "pred": self.pred,
            "correct": self.correct,
            "ids": self.ids,
        }
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in given.items() if v is not None
        }


class Picked:
    """Rows `rows` of an array (the selected samples) in the `stats.Rows` shape: sliced or
    indexed by position, optionally with a second key for the columns (`picked[i:j, c:d]`),
    each read only when asked for."""

    def __init__(self, source: Acts, rows: np.ndarray) -> None:
        self._source = source
        self._rows = np.asarray(rows, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        return (int(self._rows.size), *self._source.shape[1:])

    @property
    def chunk_rows(self) -> int:
        """Rows per stored chunk, so that readers can take whole chunks at a time."""
        return int(self._source.chunks[0])

    def __getitem__(self, key: Any, /) -> np.ndarray:
        key, *rest = key if isinstance(key, tuple) else (key,)
        rows = np.atleast_1d(self._rows[key])
        if rows.size and rows[-1] - rows[0] == rows.size - 1 and (np.diff(rows) == 1).all():
            span = slice(int(rows[0]), int(rows[-1]) + 1)  # whole chunks
            return np.asarray(self._source[(span, *rest)])
        return np.asarray(self._source.oindex[(rows, *rest)])


def subgroup(parent: zarr.Group, name: str) -> zarr.Group:
    node = parent[name]
    if not isinstance(node, zarr.Group):
        raise TypeError(f"{name} is an array, not a group")
    return node


def _layer_groups(job: zarr.Group) -> dict[str, zarr.Group]:
    found = job.get(LAYERS)
    return dict(found.groups()) if isinstance(found, zarr.Group) else {}


def layer_group(job: zarr.Group, layer: str) -> zarr.Group:
    """The group of one stored layer; NotFound, with the close matches, when there is none."""
    held = _layer_groups(job)
    if layer not in held:
        raise NotFound(f"this job has no layer {layer!r}; {close_matches(layer, list(held))}")
    return held[layer]


def sample_rows(job: zarr.Group, ids: Sequence[str] | None, offset: int, limit: int) -> np.ndarray:
    """Row indices of the sample `ids`, in their order, else the page [offset, offset+limit)."""
    n = array(job, SAMPLE).shape[0]
    if ids is None:
        return np.arange(min(offset, n), min(offset + limit, n))
    index = {str(s): i for i, s in enumerate(read(job, SAMPLE))}
    unknown = [w for w in ids if w not in index]
    if unknown:
        raise NotFound(f"no sample {unknown[0]!r} in this job; see /samples")
    return np.asarray([index[w] for w in ids], dtype=np.int64)


def screening(job: zarr.Group) -> Screening | None:
    """Scores, flags and threshold of a screening job; None for other jobs. The threshold
    is read from the `screen` group's attrs, else from the job's attrs `screen.threshold`."""
    found = job.get(SCREEN)
    if not isinstance(found, zarr.Group) or SCORE not in found:
        return None
    scores = read(found, SCORE).astype(np.float64)
    flags = read(found, FLAG).astype(bool) if FLAG in found else None
    kept = attrs(job).get(SCREEN) or {}
    threshold = found.attrs.get("threshold", kept.get("threshold"))
    return scores, flags, float(threshold) if isinstance(threshold, int | float) else None


def read_filters(job: zarr.Group, layer: str) -> np.ndarray | None:
    """The conv weights a report kept for `layer` (storage/filters.py), or None."""
    found = job.get(FILTERS)
    node = found.get(layer) if isinstance(found, zarr.Group) else None
    return np.asarray(node[...], dtype=np.float32) if isinstance(node, zarr.Array) else None


Acts = zarr.Array[Any] | Decoded  # a layer's maps as float values, however stored


def open_acts(layer: zarr.Group) -> Acts:
    """A layer's `acts`: uint8 ones decoded with their batch's scale and offset (see
    workers/storage/quantised.py), float ones as stored."""
    acts = array(layer, ACTS)
    if SCALE in layer and OFFSET in layer and acts.dtype == np.uint8:
        return Decoded(acts, array(layer, SCALE), array(layer, OFFSET))
    return acts


@dataclass(frozen=True)
class StoredLayer:
    """One stored layer: its acts, how its channels were kept, and its catalogue type."""

    name: str
    type: str
    group: zarr.Group

    @property
    def acts(self) -> Acts:
        return open_acts(self.group)

    @property
    def stored_dtype(self) -> str:
        """How the maps are stored (uint8 for 8-bit maps, which `acts` reads as float32)."""
        return str(array(self.group, ACTS).dtype)

    @property
    def pooled(self) -> zarr.Array[Any]:
        return array(self.group, POOLED)

    @property
    def top_k(self) -> bool:
        return TOP_CHANNEL in self.group

    def stored_ids(self) -> np.ndarray:
        """The channel index of each stored column (of `pooled` for top-k storage)."""
        if KEPT_CHANNEL in self.group:
            return read(self.group, KEPT_CHANNEL).astype(np.int64)
        width = self.pooled.shape[1] if self.top_k else self.acts.shape[1]
        return np.arange(width)

    def ids(self, row: int) -> np.ndarray:
        """The channel index of each stored map of sample `row`."""
        if self.top_k:
            return np.asarray(array(self.group, TOP_CHANNEL)[row], dtype=np.int64)
        return self.stored_ids()

    def maps(self, row: int) -> np.ndarray | None:
        """Sample `row`'s maps as (C, H, W) (a Conv1d's (C, L) as (C, 1, L)), else None."""
        acts = np.asarray(self.acts[row])
        if acts.ndim == 2:
            return acts[:, None, :]
        return acts if acts.ndim == 3 else None


class StoredJob:
    """A job opened read-only: its attrs, per-sample columns and stored layers.
    `StoredJob.finished` opens one that has finished, as every analysis needs."""

    def __init__(self, store: str, job_id: str) -> None:
        self.store, self.id = store, job_id
        self.group = open_job(store, job_id, mode="r")
        self.attrs = attrs(self.group)
        self._columns: dict[str, np.ndarray] = {}

    @classmethod
    def finished(cls, store: str, job_id: str) -> StoredJob:
        job = cls(store, job_id)
        state = job.attrs.get("state")
        if state not in _FINISHED:
            raise SpecError(
                f"job {job_id} is {state}; analyse it once it has finished "
                f"(`actmap jobs wait {job_id}`)"
            )
        return job

    @cached_property
    def samples(self) -> np.ndarray:
        """The sample ids, read when first asked for: (N,) strings cost more than the
        layers' numbers of many an analysis that never needs them."""
        # Plain Python strings: numpy's StringDType (as Zarr returns them) casts to little.
        return np.asarray(read(self.group, SAMPLE).tolist(), dtype=object)

    def column(self, name: str) -> np.ndarray:
        """A per-sample column (LABEL, PRED, ERROR_CODE, ...), read whole once."""
        if name not in self._columns:
            self._columns[name] = read(self.group, name)
        return self._columns[name]

    @property
    def sources(self) -> np.ndarray | None:
        return self.column(SOURCE) if SOURCE in self.group else None

    @property
    def logits(self) -> zarr.Array[Any]:
        return array(self.group, LOGITS)

    @property
    def n(self) -> int:
        return int(self.logits.shape[0])

    @property
    def sha256(self) -> str:
        return str(self.attrs.get("model", {}).get("sha256", ""))

    @property
    def catalogue(self) -> list[dict[str, Any]]:
        return list(self.attrs.get("catalogue", {}).get("layers", []))

    def rows(self, selection: Selection | None = None, name: str = "") -> np.ndarray:
        s = selection or Selection(self.id)
        table = {n: self.column(n) for n in (LABEL, PRED, ERROR_CODE)}
        if s.ids is not None:
            table[SAMPLE] = self.samples
        try:
            return select(table, label=s.label, pred=s.pred, correct=s.correct, ids=s.ids)
        except SpecError as exc:
            raise SpecError(f"{name or 'selection'} of job {self.id}: {exc}") from None

    def stored_layers(self) -> list[str]:
        """The stored layers' names, in the spec's order (then any others, sorted)."""
        held = set(_layer_groups(self.group))
        order = [n for n in self.attrs.get("spec", {}).get("layers", []) if n in held]
        return order + sorted(held - set(order))

    def layers(self, wanted: Sequence[str] | None) -> list[str]:
        """`wanted` (every stored layer when None), each checked to be stored."""
        held = self.stored_layers()
        for name in wanted or ():
            if name not in held:
                raise LayerError(
                    f"job {self.id} stores no layer {name!r}; {close_matches(name, held)}"
                )
        names = list(dict.fromkeys(wanted)) if wanted else held
        if not names:
            raise LayerError(f"job {self.id} stores no layers; extract some first")
        return names

    def layer(self, layer: str, name: str) -> zarr.Array[Any]:
        return array(self.group, layer_path(layer, name))

    def acts(self, layer: str) -> Acts:
        """The layer's maps as float values (uint8 storage decoded)."""
        return open_acts(layer_group(self.group, layer))

    def stored(self) -> list[StoredLayer]:
        """Every stored layer with its catalogue type, in `stored_layers` order."""
        types = {r["name"]: r["type"] for r in self.catalogue}
        groups = _layer_groups(self.group)
        return [StoredLayer(n, types.get(n, ""), groups[n]) for n in self.stored_layers()]

    def screening(self) -> Screening | None:
        return screening(self.group)

    def filters(self, layer: str | None) -> np.ndarray | None:
        return None if layer is None else read_filters(self.group, layer)
