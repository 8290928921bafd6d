"""The Zarr layout of the store: every group path and array name, and `create_job`.
Never imports torch.

    jobs/{job_id}/         sample source label logits pred error_code error_message done
      layers/{layer}/      acts pooled (top_channel for top-k, kept_channel for a subset,
                           gradcam and gradcam_target where Grad-CAM was asked)
      screen/              score flag (a screening job), filters/{layer} (a report's weights)
      squeeze, benign/     a screening reference's extras (squeezed.py)
    analyses/{id}/         a health, comparison, signatures or screening-profile result
    uploads/{tenant}/      uploaded inputs (plain files); index/ the job index (index.py)

Every array is created at plan time with its final shape, chunked so that batch i owns
whole chunks of rows [i*B, (i+1)*B): no two tasks ever write the same chunk.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
import zarr.api.asynchronous
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.sync import sync
from zarr.storage import LocalStore

from workers.errors import NotFound
from workers.storage.chunks import get_all
from workers.storage.objects import filesystem, get_json, location, put_json
from workers.storage.quantised import MISSING, OFFSET, SCALE, describe

__all__ = [
    "ACTS",
    "ANALYSES",
    "CHUNK_BYTES",
    "DONE",
    "ERROR_CODE",
    "ERROR_MESSAGE",
    "FILTERS",
    "FLAG",
    "GRADCAM",
    "GRADCAM_TARGET",
    "INDEX",
    "INDEX_COMPLETE",
    "JOBS",
    "KEPT_CHANNEL",
    "LABEL",
    "LAYERS",
    "LOGITS",
    "POOLED",
    "PRED",
    "SAMPLE",
    "SCORE",
    "SCREEN",
    "SOURCE",
    "TOP_CHANNEL",
    "UPLOADS",
    "V3",
    "analysis_path",
    "job_path",
    "layer_path",
    "location",
    "attrs",
    "array",
    "read",
    "CODECS",
    "COMPRESSOR",
    "LayerLayout",
    "create_job",
    "ensure_root",
    "fresh_attrs",
    "group_names",
    "job_ids",
    "open_job",
    "sample_chunk",
    "spatial_dims",
    "uploads_folder",
    "writable",
]

# Groups under the store's root: one per job, one per analysis, each tenant's uploads.
JOBS = "jobs"
ANALYSES = "analyses"
UPLOADS = "uploads"
# The job index (index.py), and the marker that says it lists every job of the store.
INDEX = "index"
INDEX_COMPLETE = f"{INDEX}/complete.json"
# Groups under a job: one per stored layer, a screening job's scores, a report's weights.
LAYERS = "layers"
SCREEN = "screen"
FILTERS = "filters"
# A job's per-sample arrays (dimension `sample`) and its completion ledger (`batch`).
SAMPLE = "sample"
SOURCE = "source"
LABEL = "label"
LOGITS = "logits"
PRED = "pred"
ERROR_CODE = "error_code"
ERROR_MESSAGE = "error_message"
DONE = "done"
# A layer's arrays.
ACTS = "acts"
POOLED = "pooled"
TOP_CHANNEL = "top_channel"
KEPT_CHANNEL = "kept_channel"
# Grad-CAM (N, y, x) float16 at the layer's resolution, and the class it explains (N,).
GRADCAM = "gradcam"
GRADCAM_TARGET = "gradcam_target"
# A screening job's arrays, under SCREEN.
SCORE = "score"
FLAG = "flag"

# Aim for chunks of up to this size; a batch smaller than that owns one chunk per array.
CHUNK_BYTES = 8 << 20
# Chosen by tests/bench/compression.py on real activations: zstd level 1 compressed float16
# maps best for its CPU time among the codecs tried (figures: tests/bench/README.md).
COMPRESSOR = ZstdCodec(level=1)
# A job's `compression`: the codec of every array it writes. lz4 is Blosc's, with byte
# shuffle (a float's bytes grouped by significance; a no-op for one-byte values).
CODECS: dict[str, Any] = {
    "zstd": COMPRESSOR,
    "lz4": BloscCodec(cname="lz4", clevel=1, shuffle="shuffle"),
    "none": None,
}
_GROUP: dict[str, Any] = {"zarr_format": 3, "node_type": "group", "attributes": {}}
# How every group of the store is opened: fresh (never from consolidated metadata), and as
# Zarr v3, which every store is. A group of unknown format is read with its three v2
# documents too, and on S3 each missing document costs s3fs a HEAD and a listing.
V3: dict[str, Any] = {"zarr_format": 3, "use_consolidated": False}


@dataclass(frozen=True)
class LayerLayout:
    """What one layer stores: the per-sample `acts` shape and its channel dimension name."""

    name: str
    shape: tuple[int, ...]
    channels: int  # width of `pooled`, the layer's full channel count
    dtype: str
    channel_dim: str = "channel"  # "kept_channel" for a subset, "rank" for top-k
    kept: tuple[int, ...] | None = None
    gradcam: tuple[int, ...] | None = None  # the per-sample map shape, when asked


def array(group: zarr.Group, name: str) -> zarr.Array[Any]:
    """The array at `name` under `group`; a group there is a bug in the layout."""
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise TypeError(f"{name} is a group, not an array")
    return node


def writable(group: zarr.Group, name: str) -> zarr.Array[Any]:
    """The array at `name`, opened for whole-chunk batch writes. zarr keeps
    `write_empty_chunks` per opened array, not in its metadata: set again here, or every
    write would compare its chunk with the fill value first."""
    return array(group, name).with_config({"write_empty_chunks": True})


def attrs(group: zarr.Group) -> dict[str, Any]:
    """The group's attributes as plain JSON values, read when the group was opened."""
    return dict(group.attrs)


_SEEN: dict[str, tuple[tuple[int, int, int], dict[str, Any]]] = {}  # path: (stat, attrs)


def fresh_attrs(group: zarr.Group) -> dict[str, Any]:
    """The group's attributes as stored now (a cancel lands there), not as when `group`
    was opened. From a local store, its zarr.json is read directly: reopening the group
    waits on zarr's event loop thread, which a worker's writes keep busy. zarr replaces
    that file atomically, so the read never sees half of it, and a replaced file has a
    new inode: an unchanged stat means unchanged attributes, and the parse is skipped."""
    store, path = group.store_path.store, group.store_path.path
    if not isinstance(store, LocalStore):
        return attrs(zarr.open_group(store, path=path, mode="r", **V3))
    file = Path(store.root) / path / "zarr.json"
    try:
        info = file.stat()
        key = (info.st_ino, info.st_mtime_ns, info.st_size)
        seen = _SEEN.get(str(file))
        if seen is not None and seen[0] == key:
            return dict(seen[1])
        meta = json.loads(file.read_bytes())
    except FileNotFoundError:
        raise NotFound(f"{path} is no longer in store {store.root}") from None
    found = dict(meta.get("attributes", {}))
    if len(_SEEN) > 64:  # a worker runs a few jobs at a time, not thousands
        _SEEN.clear()
    _SEEN[str(file)] = (key, found)
    return dict(found)


def read(group: zarr.Group, name: str, rows: slice = slice(None)) -> np.ndarray:
    if rows == slice(None):
        return get_all(array(group, name))
    return np.asarray(array(group, name)[rows])


def spatial_dims(n: int) -> list[str]:
    return ["z", "y", "x"][3 - n :] if n else []


def sample_chunk(batch_size: int, row_bytes: int) -> int:
    """The largest divisor of the batch size whose chunk stays within CHUNK_BYTES."""
    for d in range(batch_size, 0, -1):
        if batch_size % d == 0 and d * row_bytes <= CHUNK_BYTES:
            return d
    return 1


def uploads_folder(store: str, tenant: str) -> Path:
    """Where a tenant's uploaded inputs are kept: plain files under the store's folder."""
    return Path(location(store)) / UPLOADS / tenant


def job_path(job_id: str) -> str:
    return f"{JOBS}/{job_id}"


def analysis_path(analysis_id: str) -> str:
    return f"{ANALYSES}/{analysis_id}"


def layer_path(layer: str, name: str | None = None) -> str:
    """A layer's group under its job, or its array `name`."""
    return f"{LAYERS}/{layer}" if name is None else f"{LAYERS}/{layer}/{name}"


def group_names(store: str, path: str) -> list[str]:
    """The names of the groups under `path` (JOBS, ANALYSES), sorted; none when it is absent."""
    try:
        found = zarr.open_group(location(store), path=path, mode="r", **V3)
    except FileNotFoundError:
        return []
    return sorted(name for name, _ in found.groups())


def job_ids(store: str) -> list[str]:
    return group_names(store, JOBS)


def open_job(store: str, job_id: str, mode: Literal["r", "r+"] = "r+") -> zarr.Group:
    """The job's group, read fresh from the store (never from consolidated metadata)."""
    try:
        return zarr.open_group(location(store), path=job_path(job_id), mode=mode, **V3)
    except FileNotFoundError:
        raise NotFound(
            f"no job {job_id!r} in store {store}; `actmap jobs list` shows them"
        ) from None


def ensure_root(store: str) -> None:
    """The root group and `jobs` below it, both small; a root consolidated map left by a
    store written before each group carried its own is dropped (it lists old jobs only, and
    zarr takes a group missing from it for one that does not exist)."""
    fs, root = filesystem(store)
    top = get_json(fs, f"{root}/zarr.json")
    if top is None or top.get("consolidated_metadata") is not None:
        top = {**(top or _GROUP)}
        top.pop("consolidated_metadata", None)
        put_json(fs, f"{root}/zarr.json", top)
    if get_json(fs, f"{root}/{JOBS}/zarr.json") is None:
        # No job yet: the index is complete from the first one on.
        put_json(fs, f"{root}/{INDEX_COMPLETE}", {"version": 1})
        put_json(fs, f"{root}/{JOBS}/zarr.json", dict(_GROUP))


def _array(
    name: str,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    dtype: Any,
    dims: list[str],
    fill: Any,
    codec: Any = COMPRESSOR,
    attributes: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """One array to create: its path under the job and zarr's arguments."""
    return name, {
        "shape": shape,
        "chunks": chunks,
        "dtype": dtype,
        "dimension_names": dims,
        "fill_value": fill,
        "compressors": codec,
        "attributes": attributes or {},
        # Batches write whole chunks; comparing each with the fill value first is wasted.
        "config": {"write_empty_chunks": True},
    }


def _gradcam_arrays(
    new: Any, path: partial[str], n: int, b: int, shape: tuple[int, ...]
) -> list[tuple[str, dict[str, Any]]]:
    """A layer's Grad-CAM maps and targets, chunked like its activations."""
    row = int(np.prod(shape)) * 2
    chunk = (sample_chunk(b, row), *shape)
    dims = ["sample", *spatial_dims(len(shape))]
    return [
        new(path(GRADCAM), (n, *shape), chunk, "float16", dims, np.nan),
        new(path(GRADCAM_TARGET), (n,), (b,), "int32", ["sample"], -1),
    ]


async def _create_nodes(
    at: str, groups: list[str], arrays: list[tuple[str, dict[str, Any]]]
) -> None:
    """The job's groups, parents first, then all of its arrays at once: created one after
    another, each waited on a round trip to zarr's event loop (16 arrays, 0.065 s of a
    0.1 s plan)."""
    job = await zarr.api.asynchronous.open_group(at, mode="r+", **V3)
    for depth in sorted({path.count("/") for path in groups}):
        level = sorted({path for path in groups if path.count("/") == depth})
        await asyncio.gather(*(job.require_group(path) for path in level))
    await asyncio.gather(*(job.create_array(name, **kwargs) for name, kwargs in arrays))


def _layer_arrays(
    new: Any, layer: LayerLayout, n: int, b: int, batch_size: int, n_batches: int
) -> list[tuple[str, dict[str, Any]]]:
    """A layer's arrays: acts (uint8 with its per-batch scale and offset), pooled, and the
    channel ids of a subset or of top-k."""
    path = partial(layer_path, layer.name)
    dims = ["sample", layer.channel_dim, *spatial_dims(len(layer.shape) - 1)]
    row = int(np.prod(layer.shape)) * np.dtype(layer.dtype).itemsize
    chunk = (sample_chunk(b, row), *layer.shape)
    found = []
    if layer.dtype == "uint8":
        meta = describe(batch_size)
        acts = new(path(ACTS), (n, *layer.shape), chunk, "uint8", dims, MISSING, attributes=meta)
        found.append(acts)
        table = (n_batches, layer.shape[0])  # one row per batch: each batch owns its chunk
        for name in (SCALE, OFFSET):
            found.append(
                new(path(name), table, (1, table[1]), "float32", ["batch", dims[1]], np.nan)
            )
    else:
        found.append(new(path(ACTS), (n, *layer.shape), chunk, layer.dtype, dims, np.nan))
    pooled = (n, layer.channels)
    found.append(
        new(path(POOLED), pooled, (b, pooled[1]), "float32", ["sample", "channel"], np.nan)
    )
    if layer.channel_dim == "rank":
        top = (n, layer.shape[0])
        found.append(new(path(TOP_CHANNEL), top, (b, top[1]), "int32", ["sample", "rank"], -1))
    if layer.gradcam is not None:
        found.extend(_gradcam_arrays(new, path, n, b, layer.gradcam))
    if layer.kept is not None:
        width = (len(layer.kept),)
        found.append(new(path(KEPT_CHANNEL), width, width, "int32", ["kept_channel"], -1))
    return found


def create_job(
    store: str,
    job_id: str,
    attrs: dict[str, Any],
    n: int,
    batch_size: int,
    n_classes: int,
    layers: list[LayerLayout],
    compression: str = "zstd",
    more: Callable[[Any, int, int], tuple[list[str], list[tuple[str, dict[str, Any]]]]]
    | None = None,
) -> zarr.Group:
    """Create the job's group and every array with its final shape, each compressed with
    `compression` (a key of CODECS); `more(new, n, b)` adds groups and arrays, `new` making
    one array as `_array` does (its codec set), `b` the rows of a chunk."""
    ensure_root(store)
    # Opened at its own folder: zarr checks every parent for an existing node when it adds
    # an array, and the job's arrays need nothing from above it.
    at = f"{location(store).rstrip('/')}/{job_path(job_id)}"
    group = zarr.open_group(at, mode="w-", attributes=attrs, **V3)
    b = min(batch_size, max(n, 1))
    n_batches = -(-n // batch_size)
    new = partial(_array, codec=CODECS[compression])
    arrays = [
        new(SAMPLE, (n,), (b,), str, ["sample"], ""),
        new(SOURCE, (n,), (b,), str, ["sample"], ""),
        new(LABEL, (n,), (b,), "int32", ["sample"], -1),
        new(LOGITS, (n, n_classes), (b, n_classes), "float32", ["sample", "class"], np.nan),
        new(PRED, (n,), (b,), "int32", ["sample"], -1),
        new(ERROR_CODE, (n,), (b,), "int16", ["sample"], 0),
        new(ERROR_MESSAGE, (n,), (b,), str, ["sample"], ""),
        new(DONE, (n_batches,), (1,), "bool", ["batch"], False),
    ]
    for layer in layers:
        arrays += _layer_arrays(new, layer, n, b, batch_size, n_batches)
    groups = [LAYERS, *(layer_path(layer.name) for layer in layers)] if layers else []
    if more is not None:
        extra_groups, extra = more(new, n, b)
        groups, arrays = groups + extra_groups, arrays + extra
    sync(_create_nodes(at, groups, arrays))
    for layer in layers:
        if layer.kept is not None:
            kept = array(group, layer_path(layer.name, KEPT_CHANNEL))
            kept[:] = np.asarray(layer.kept, dtype=np.int32)
    return group
