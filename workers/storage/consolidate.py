"""Each job (and analysis) group carries its own consolidated metadata.

xarray 2025+ (read in `xarray/backends/zarr.py`, `_get_open_params`) opens a store with
`consolidated=None` by calling `zarr.open_consolidated` on the store's ROOT and then indexing
the group out of it; zarr 3.1 trusts a root's consolidated map entirely (a group missing from
it is a KeyError) and a root without one makes xarray fall back with a RuntimeWarning. So a
root map that stays current must grow with every job, which made each plan and finalize
rewrite a document linear in the jobs before it. Instead the job's own `zarr.json` holds the
map of the nodes below it, written at plan, cancel, resume and finalize, and the root is a
small group with no map. Opened at the group's own location, nothing outside it is read and
nothing warns:

    xr.open_zarr(f"{store}/jobs/{job_id}")
    xr.open_datatree(f"{store}/jobs/{job_id}", engine="zarr")

(`xr.open_zarr(store, group="jobs/J", consolidated=False)` reads only the group too, one
node at a time.) Our own code never reads consolidated metadata (`use_consolidated=False`).
A store written before this change has a root map that lists old jobs only; `upgrade_root`
drops it (plan does, and `actmap store reindex` consolidates the old jobs' groups).
"""

from __future__ import annotations

from typing import Any

from workers.storage.index import rebuild, record
from workers.storage.layout import ANALYSES, JOBS, analysis_path, ensure_root, job_path
from workers.storage.objects import filesystem, get_json, put_json

__all__ = ["publish", "publish_path", "reindex"]

_EMPTY: dict[str, Any] = {"kind": "inline", "must_understand": False, "metadata": {}}


def _node(doc: dict[str, Any]) -> dict[str, Any]:
    if doc.get("node_type") == "group":
        doc = {**doc, "consolidated_metadata": _EMPTY}
    return doc


def _nodes(fs: Any, base: str) -> dict[str, dict[str, Any]]:
    """The metadata of every node below the group at `base`, by path relative to it. Only
    groups are listed: an array's folder holds its chunks, thousands of files in a big job."""
    found: dict[str, dict[str, Any]] = {}
    pending = [""]
    while pending:
        path = pending.pop()
        folder = f"{base}/{path}".rstrip("/")
        for child in fs.ls(folder, detail=False):
            name = str(child).rstrip("/").rsplit("/", 1)[-1]
            if name == "zarr.json" or name.startswith("."):
                continue
            rel = f"{path}/{name}".lstrip("/")
            doc = get_json(fs, f"{base}/{rel}/zarr.json")
            if doc is None:
                continue  # a file, or a folder that is no node
            found[rel] = _node(doc)
            if doc.get("node_type") == "group":
                pending.append(rel)
    return found


def publish_path(store: str, prefix: str) -> dict[str, Any]:
    """Write the consolidated map of the group at `prefix` into its own zarr.json; returns
    the group's attributes as written."""
    fs, root = filesystem(store)
    base = f"{root}/{prefix}"
    nodes = _nodes(fs, base)
    doc = get_json(fs, f"{base}/zarr.json")
    if doc is None:
        raise FileNotFoundError(f"no group {prefix} in store {store}")
    doc["consolidated_metadata"] = {**_EMPTY, "metadata": dict(sorted(nodes.items()))}
    put_json(fs, f"{base}/zarr.json", doc)
    attributes: dict[str, Any] = doc.get("attributes", {})
    return attributes


def publish(store: str, job_id: str) -> None:
    """Consolidate `jobs/{job_id}` and record it in the job index."""
    record(store, job_id, publish_path(store, job_path(job_id)))


def _children(fs: Any, folder: str) -> list[str]:
    try:
        found = fs.ls(folder, detail=False)
    except FileNotFoundError:
        return []
    names = (str(p).rstrip("/").rsplit("/", 1)[-1] for p in found)
    return sorted(n for n in names if n != "zarr.json" and not n.startswith("."))


def reindex(store: str) -> int:
    """Upgrade and repair a store: a small root, every job and analysis group carrying its
    own consolidated map, and the job index written again from the job groups. Reads every
    job once; safe to run while jobs run (it writes what their attrs say). Returns the
    number of jobs indexed."""
    ensure_root(store)
    fs, root = filesystem(store)
    found = {}
    for job_id in _children(fs, f"{root}/{JOBS}"):
        if get_json(fs, f"{root}/{job_path(job_id)}/zarr.json") is not None:
            found[job_id] = publish_path(store, job_path(job_id))
    for analysis_id in _children(fs, f"{root}/{ANALYSES}"):
        if get_json(fs, f"{root}/{analysis_path(analysis_id)}/zarr.json") is not None:
            publish_path(store, analysis_path(analysis_id))
    return rebuild(store, found)
