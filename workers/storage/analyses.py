"""Analyses in the store: each result under `analyses/{analysis_id}`.

Owns the writes of an analysis group: the placeholder of a queued, running or failed
request (`placeholder`), and the result (`save`): arrays with named dimensions, and a JSON
summary in the group's attrs (kind, inputs, created, actmap version and the headline
numbers), with the group's own consolidated metadata so that `xarray.open_datatree(
f"{store}/analyses/ID", engine="zarr")` opens it without warnings. Results are computed
in full before anything is written, so a user error never leaves half an analysis behind.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr

from workers.errors import NotFound
from workers.jobs import VERSION, AnalysisKind, AnalysisState, new_id, now
from workers.storage.consolidate import publish_path
from workers.storage.layout import ANALYSES, COMPRESSOR, V3, analysis_path, group_names
from workers.storage.objects import location
from workers.storage.stored_job import StoredJob

__all__ = ["Arrays", "analysis_ids", "open_analysis", "placeholder", "save"]

# Arrays: {path under the analysis group: (values, dimension names)}.
Arrays = dict[str, tuple[np.ndarray, list[str]]]


def analysis_ids(store: str) -> list[str]:
    return group_names(store, ANALYSES)


def open_analysis(store: str, analysis_id: str) -> zarr.Group:
    """The analysis group, read fresh from the store."""
    try:
        return zarr.open_group(location(store), path=analysis_path(analysis_id), mode="r", **V3)
    except FileNotFoundError:
        raise NotFound(f"no analysis {analysis_id!r} in store {store}") from None


def save(
    store: str,
    kind: AnalysisKind,
    job: StoredJob,
    inputs: Mapping[str, Any],
    headline: Mapping[str, Any],
    results: Arrays,
    analysis_id: str | None = None,
) -> str:
    """Create `analyses/{id}` with its attrs and arrays (replacing the placeholder of a
    queued request), then publish it; returns the id. The state reads `running` until
    every array is written, so that whoever polls it never opens half a result."""
    analysis_id = analysis_id or new_id()
    meta = {
        "kind": kind.value,
        "state": AnalysisState.SUCCEEDED.value,
        "tenant": job.attrs.get("tenant", "local"),
        "model": job.attrs.get("model"),
        "inputs": dict(inputs),
        "created": now(),
        "actmap_version": VERSION,
        **headline,
    }
    group = _group_with(store, analysis_id, {**meta, "state": AnalysisState.RUNNING.value})
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
            overwrite=True,  # what an interrupted earlier attempt left
        )
        if values.size:
            out[...] = values.astype(object) if text else values
    group.update_attributes({"state": meta["state"]})
    publish_path(store, analysis_path(analysis_id))
    return analysis_id


def placeholder(
    store: str,
    analysis_id: str,
    kind: str,
    tenant: str,
    state: AnalysisState,
    reason: str = "",
    error: str = "",
) -> None:
    """The analysis group before (or instead of) its results: kind, tenant and state."""
    meta = {
        "kind": kind,
        "state": state.value,
        "tenant": tenant,
        **({"reason": reason} if reason else {}),
        **({"error": error} if error else {}),
    }
    _group_with(store, analysis_id, meta)
    publish_path(store, analysis_path(analysis_id))


def _group_with(store: str, analysis_id: str, attributes: dict[str, Any]) -> zarr.Group:
    """The analysis group with exactly these attributes, rewritten in place when it exists
    (one atomic write of its zarr.json): replacing the group, delete then create, leaves a
    moment in which whoever polls the analysis finds none and answers 404."""
    try:
        found = zarr.open_group(location(store), path=analysis_path(analysis_id), mode="r+", **V3)
    except FileNotFoundError:
        root = zarr.open_group(location(store), mode="a", **V3)
        return root.require_group(ANALYSES).create_group(analysis_id, attributes=attributes)
    found.attrs.put(attributes)
    return found
