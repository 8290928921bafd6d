"""Keep the store root's consolidated metadata current, one job at a time.

xarray opens `open_zarr(store, group="jobs/J")` through the root's consolidated metadata and
warns when there is none. Re-consolidating the whole store on every job would read every
job's metadata; instead each plan and finalize splices just its own job's nodes into the
root document, under a lock where the store is a local directory. Our own code never reads
consolidated metadata (it opens with `use_consolidated=False`), so a stale entry can only
make an analyst's view lag, never a job go wrong.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = ["publish", "publish_path"]

_EMPTY: dict[str, Any] = {"kind": "inline", "must_understand": False, "metadata": {}}
_GROUP = {"zarr_format": 3, "node_type": "group", "attributes": {}}


@contextmanager
def _locked(fs: Any, root: str) -> Iterator[None]:
    if not isinstance(fs, LocalFileSystem):
        yield  # object stores have no lock; the last writer wins (see module docstring)
        return
    fd = os.open(os.path.join(root, ".consolidate.lock"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _node(doc: dict[str, Any]) -> dict[str, Any]:
    if doc.get("node_type") == "group":
        doc = {**doc, "consolidated_metadata": _EMPTY}
    return doc


def publish(store: str, job_id: str) -> None:
    """Splice the current metadata of `jobs/{job_id}` into the root's consolidated map."""
    publish_path(store, f"jobs/{job_id}")


def publish_path(store: str, prefix: str) -> None:
    """The same for any group path (`analyses/{id}` too), adding missing ancestors."""
    fs, root = fsspec.core.url_to_fs(store)
    base = root.rstrip("/")
    fresh: dict[str, Any] = {}
    for path in fs.find(f"{base}/{prefix}"):
        if path.endswith("/zarr.json"):
            fresh[path[len(base) + 1 : -len("/zarr.json")]] = _node(json.loads(fs.cat_file(path)))
    with _locked(fs, root):
        top = f"{base}/zarr.json"
        doc: dict[str, Any] = json.loads(fs.cat_file(top)) if fs.exists(top) else dict(_GROUP)
        current: dict[str, Any] = doc.get("consolidated_metadata") or _EMPTY
        merged = {
            k: v
            for k, v in current["metadata"].items()
            if k != prefix and not k.startswith(prefix + "/")
        }
        parts = prefix.split("/")
        for i in range(1, len(parts)):
            merged.setdefault("/".join(parts[:i]), _node(dict(_GROUP)))
        merged.update(fresh)
        doc["consolidated_metadata"] = {**_EMPTY, "metadata": dict(sorted(merged.items()))}
        tmp = f"{top}.{os.getpid()}.tmp"
        fs.pipe_file(tmp, json.dumps(doc, separators=(",", ":")).encode())  # read on every open
        fs.mv(tmp, top)
