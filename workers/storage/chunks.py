"""Whole-chunk writes into a local store: the bytes zarr writes, without its event loop.

zarr-python sends every write through its asyncio thread and one more thread per codec
step and per file; for a batch that owns whole chunks those hops cost about as much CPU as
the compression itself (tests/bench/extraction.py). Here the array's own codecs encode
each chunk in the calling thread, and the file is replaced atomically as zarr's LocalStore
does, so readers never see a torn chunk. Whatever this does not cover (another store, a
codec without a synchronous path, another codec pipeline, rows that are not whole chunks)
goes through zarr. `get_row` reads one row the same way (the ledger's flag, before every
batch).
"""

from __future__ import annotations

import os
import uuid
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.metadata import ArrayV3Metadata
from zarr.storage import LocalStore

try:  # zarr's synchronous codec protocol (3.1.6); a zarr without it gets zarr's own path
    from zarr.abc.codec import SupportsSyncCodec
except ImportError:  # pragma: no cover - depends on the installed zarr
    SupportsSyncCodec = None  # type: ignore[assignment,misc]

__all__ = ["get_all", "get_row", "put_rows"]

_PIPELINE = "zarr.core.codec_pipeline.BatchedCodecPipeline"


def _folder(arr: zarr.Array[Any], writing: bool = True) -> Path | None:
    """The array's folder when it lives in a local store that this module can read (and,
    `writing`, write)."""
    store, meta = arr.store_path.store, arr.metadata
    if not isinstance(store, LocalStore) or (writing and store.read_only):
        return None
    if SupportsSyncCodec is None or not isinstance(meta, ArrayV3Metadata):
        return None
    if zarr.config.get("codec_pipeline.path") != _PIPELINE:
        return None
    if not all(isinstance(c, SupportsSyncCodec) for c in meta.codecs):
        return None
    return Path(store.root) / arr.store_path.path


def _encode(arr: zarr.Array[Any], coords: tuple[int, ...], chunk: np.ndarray) -> Any:
    """The chunk through the array's codecs in order, as zarr's codec pipeline runs them."""
    meta = arr.metadata
    assert isinstance(meta, ArrayV3Metadata)  # _folder checked it
    prototype = default_buffer_prototype()
    spec = meta.get_chunk_spec(coords, arr.config, prototype)
    data: Any = prototype.nd_buffer.from_numpy_array(chunk)
    for codec in meta.codecs:
        assert isinstance(codec, SupportsSyncCodec)
        data = codec._encode_sync(data, spec)
        spec = codec.resolve_metadata(spec)
    return data


def _decode(arr: zarr.Array[Any], coords: tuple[int, ...], raw: bytes) -> np.ndarray:
    """The stored chunk back through the array's codecs, last to first."""
    meta = arr.metadata
    assert isinstance(meta, ArrayV3Metadata)  # _folder checked it
    prototype = default_buffer_prototype()
    specs = [meta.get_chunk_spec(coords, arr.config, prototype)]
    for codec in meta.codecs[:-1]:
        specs.append(codec.resolve_metadata(specs[-1]))
    data: Any = prototype.buffer.from_bytes(raw)
    for codec, spec in zip(reversed(meta.codecs), reversed(specs), strict=True):
        assert isinstance(codec, SupportsSyncCodec)
        data = codec._decode_sync(data, spec)
    return np.asarray(data.as_numpy_array()).reshape(arr.chunks)


def get_row(arr: zarr.Array[Any], index: int) -> Any:
    """Row `index` of `arr`, read fresh from the store: its fill value where the chunk was
    never written, as zarr reads it."""
    folder = _folder(arr, writing=False)
    if folder is None or arr.ndim != 1:
        return arr[index]
    coords = (index // arr.chunks[0],)
    try:
        raw = (folder / arr.metadata.encode_chunk_key(coords)).read_bytes()
    except FileNotFoundError:
        return arr.fill_value
    return _decode(arr, coords, raw)[index % arr.chunks[0]]


def get_all(arr: zarr.Array[Any]) -> np.ndarray:
    """The whole of a 1-D numeric array (the ledger, the error codes), read fresh chunk by
    chunk: one small file per batch, which zarr reads through its event loop at about ten
    times the cost (status and finalize read two of these)."""
    folder = _folder(arr, writing=False)
    if folder is None or arr.ndim != 1 or arr.dtype.kind not in "biuf":
        return np.asarray(arr[:])
    n, rows = arr.shape[0], arr.chunks[0]
    out = np.full(n, arr.fill_value, dtype=arr.dtype)
    for i in range(-(-n // rows)):
        try:
            raw = (folder / arr.metadata.encode_chunk_key((i,))).read_bytes()
        except FileNotFoundError:
            continue  # never written: the fill value, as zarr reads it
        out[i * rows : (i + 1) * rows] = _decode(arr, (i,), raw)[: n - i * rows]
    return out


def _write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{uuid.uuid4().hex}.partial")
    try:
        with open(partial, "wb") as file:
            file.write(data.as_buffer_like())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _chunks(arr: zarr.Array[Any], start: int, values: np.ndarray) -> list[tuple[int, ...]] | None:
    """The chunk coordinates rows [start, start + len(values)) fill whole, or None when
    they do not: a chunk that runs past the rows must end at the array's end."""
    chunks, shape = arr.chunks, arr.shape
    if values.shape[1:] != shape[1:] or chunks[1:] != shape[1:] or start % chunks[0]:
        return None
    stop = start + len(values)
    if stop > shape[0] or (stop % chunks[0] and stop != shape[0]):
        return None
    rest = (0,) * (len(shape) - 1)
    return [(i, *rest) for i in range(start // chunks[0], -(-stop // chunks[0]))]


def put_rows(
    arr: zarr.Array[Any], start: int, values: np.ndarray, pool: Executor | None = None
) -> list[Future[None]]:
    """Write rows [start, start + len(values)) of `arr`. Whole chunks of a numeric array in
    a local store are encoded here, on `pool` when given (the futures are returned, the
    caller waits for them); anything else is written through zarr before this returns."""
    folder = _folder(arr)
    coords = _chunks(arr, start, values) if folder is not None else None
    if folder is None or coords is None:
        arr[start : start + len(values)] = values
        return []
    if values.dtype.name != arr.dtype.name:  # cast as zarr casts (strings: object to its own)
        values = values.astype(arr.dtype, order="A")
    rows = arr.chunks[0]

    def one(at: tuple[int, ...]) -> None:
        begin = at[0] * rows - start
        chunk = values[begin : begin + rows]
        if len(chunk) < rows:  # the array's last chunk: the rest is fill, as zarr writes it
            full = np.full((rows, *values.shape[1:]), arr.fill_value, dtype=values.dtype)
            full[: len(chunk)] = chunk
            chunk = full
        assert folder is not None
        _write(folder / arr.metadata.encode_chunk_key(at), _encode(arr, at, chunk))

    if pool is None:
        for at in coords:
            one(at)
        return []
    return [pool.submit(one, at) for at in coords]
