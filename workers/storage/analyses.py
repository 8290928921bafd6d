"""Analyses in the store: what every analysis job reads and writes.

Owns the store side of this package's analyses: a finished job opened for reading with its
per-sample table and stored layers (`StoredJob`), a selection of its samples (`Selection`),
rows of a stored array read a block at a time (`Picked`), and each result written under
`analyses/{analysis_id}` (`save`): arrays with named dimensions, and a JSON summary in the
group's attrs (kind, inputs, created, actmap version and the headline numbers), with the
group's own consolidated metadata so that `xarray.open_datatree(f"{store}/analyses/ID",
engine="zarr")` opens it without warnings. Results are computed in
full before anything is written, so a user error never leaves half an analysis behind.
The analyses themselves are in analyses.py and profiles.py. Numpy and Zarr only.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import zarr

from workers.analysis.selection import select
from workers.errors import JobError, LayerError, SpecError
from workers.jobs import close_matches
from workers.storage.consolidate import publish_path
from workers.storage.layout import COMPRESSOR, array, attrs, open_job, read

__all__ = [
    "Arrays",
    "Picked",
    "Selection",
    "StoredJob",
    "analysis_ids",
    "new_analysis_id",
    "now",
    "open_analysis",
    "save",
    "subgroup",
]

_FINISHED = ("succeeded", "partial")
# Arrays: {path under the analysis group: (values, dimension names)}.
Arrays = dict[str, tuple[np.ndarray, list[str]]]


@dataclass(frozen=True)
class Selection:
    """The samples of one job that meet every condition given (see selection.select);
    failed samples never take part."""

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


class StoredJob:
    """A finished job, opened read-only, with its per-sample table and stored layers."""

    def __init__(self, store: str, job_id: str) -> None:
        self.id = job_id
        self.group = open_job(store, job_id, mode="r")
        self.attrs = attrs(self.group)
        state = self.attrs.get("state")
        if state not in _FINISHED:
            raise SpecError(
                f"job {job_id} is {state}; analyse it once it has finished "
                f"(`actmap jobs wait {job_id}`)"
            )

    @cached_property
    def samples(self) -> np.ndarray:
        """The sample ids, read when first asked for: (N,) strings cost more than the
        layers' numbers of many an analysis that never needs them."""
        # Plain Python strings: numpy's StringDType (as Zarr returns them) casts to little.
        return np.asarray(read(self.group, "sample").tolist(), dtype=object)

    @property
    def sha256(self) -> str:
        return str(self.attrs.get("model", {}).get("sha256", ""))

    def rows(self, selection: Selection | None = None, name: str = "") -> np.ndarray:
        s = selection or Selection(self.id)
        table = {n: read(self.group, n) for n in ("label", "pred", "error_code")}
        if s.ids is not None:
            table["sample"] = self.samples
        try:
            return select(table, label=s.label, pred=s.pred, correct=s.correct, ids=s.ids)
        except SpecError as exc:
            raise SpecError(f"{name or 'selection'} of job {self.id}: {exc}") from None

    def stored_layers(self) -> list[str]:
        if "layers" not in self.group:
            return []
        held = {name for name, _ in subgroup(self.group, "layers").groups()}
        order = [n for n in self.attrs.get("spec", {}).get("layers", []) if n in held]
        return order + sorted(held - set(order))

    def layers(self, wanted: Sequence[str] | None) -> list[str]:
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
        return array(self.group, f"layers/{layer}/{name}")


class Picked:
    """Rows `rows` of an array (the selected samples) in the `stats.Rows` shape: sliced or
    indexed by position, optionally with a second key for the columns (`picked[i:j, c:d]`),
    each read only when asked for."""

    def __init__(self, source: zarr.Array[Any], rows: np.ndarray) -> None:
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


def analysis_ids(store: str) -> list[str]:
    try:
        found = zarr.open_group(_location(store), path="analyses", mode="r", use_consolidated=False)
    except FileNotFoundError:
        return []
    return sorted(name for name, _ in found.groups())


def open_analysis(store: str, analysis_id: str) -> zarr.Group:
    """The analysis group, read fresh from the store."""
    try:
        return zarr.open_group(
            _location(store), path=f"analyses/{analysis_id}", mode="r", use_consolidated=False
        )
    except FileNotFoundError:
        raise JobError(f"no analysis {analysis_id!r} in store {store}") from None


def _location(store: str) -> str:
    return store.removeprefix("file://")  # as layout.py: zarr's fsspec store makes no folders


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _version() -> str:
    try:
        return version("actmap")
    except PackageNotFoundError:
        return "unknown"


def new_analysis_id() -> str:
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def save(
    store: str,
    kind: str,
    job: StoredJob,
    inputs: Mapping[str, Any],
    headline: Mapping[str, Any],
    results: Arrays,
    analysis_id: str | None = None,
) -> str:
    """Create `analyses/{id}` with its attrs and arrays (replacing the placeholder of a
    queued request), then publish it; returns the id. The state reads `running` until
    every array is written, so that whoever polls it never opens half a result."""
    analysis_id = analysis_id or new_analysis_id()
    meta = {
        "kind": kind,
        "state": "succeeded",
        "tenant": job.attrs.get("tenant", "local"),
        "model": job.attrs.get("model"),
        "inputs": dict(inputs),
        "created": now(),
        "actmap_version": _version(),
        **headline,
    }
    root = zarr.open_group(_location(store), mode="a", use_consolidated=False)
    group = root.require_group("analyses").create_group(
        analysis_id, attributes={**meta, "state": "running"}, overwrite=True
    )
    for path, (values, dims) in results.items():
        text = values.dtype.kind in "OUT"
        parent, _, name = path.rpartition("/")
        out = (group.require_group(parent) if parent else group).create_array(
            name,
            shape=values.shape,
            chunks=tuple(max(1, s) for s in values.shape),
            dtype=str if text else values.dtype,
            dimension_names=dims,
            fill_value="" if text else (False if values.dtype == bool else 0),
            compressors="auto" if text else COMPRESSOR,
        )
        if values.size:
            out[...] = values.astype(object) if text else values
    group.update_attributes({"state": meta["state"]})
    publish_path(store, f"analyses/{analysis_id}")
    return analysis_id
