"""One batch's rows, on the host, and their write into the job's arrays."""

from __future__ import annotations

from concurrent.futures import Executor, Future
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import zarr

from workers.storage.chunks import put_rows
from workers.storage.layout import (
    ACTS,
    ERROR_CODE,
    ERROR_MESSAGE,
    GRADCAM,
    GRADCAM_TARGET,
    LOGITS,
    POOLED,
    PRED,
    TOP_CHANNEL,
    layer_path,
    writable,
)
from workers.storage.quantised import OFFSET, SCALE, encode
from workers.storage.squeezed import SQUEEZE, benign_path

__all__ = ["BatchRows", "CopyRows", "LayerRows", "concat_rows", "quantise_rows", "write_rows"]


@dataclass(frozen=True)
class LayerRows:
    acts: np.ndarray
    pooled: np.ndarray
    top_channel: np.ndarray | None = None
    gradcam: np.ndarray | None = None  # (n, y, x) float16, NaN where not computed
    gradcam_target: np.ndarray | None = None  # (n,) int32, -1 where not computed
    # uint8 acts: the batch's per-channel scale and offset, (C,) float32 each.
    scale: np.ndarray | None = None
    offset: np.ndarray | None = None


@dataclass(frozen=True)
class CopyRows:
    """A benign copy's rows (a job's `benign` option): logits (n, K), pooled activations
    {layer: (n, C)}, squeezing distances (n, 2) with `squeeze`; float32, NaN where failed."""

    logits: np.ndarray
    pooled: dict[str, np.ndarray]
    squeeze: np.ndarray | None = None


@dataclass(frozen=True)
class BatchRows:
    """Everything batch i stores, for rows [start, start + len(error_code))."""

    start: int
    error_code: np.ndarray
    error_message: list[str]
    logits: np.ndarray
    pred: np.ndarray
    layers: dict[str, LayerRows] = field(default_factory=dict)
    squeeze: np.ndarray | None = None  # (n, 2) float32 with the job's `squeeze` option
    benign: dict[str, CopyRows] = field(default_factory=dict)  # with its `benign` option


def write_rows(
    group: zarr.Group,
    rows: BatchRows,
    opened: dict[str, zarr.Array[Any]] | None = None,
    pool: Executor | None = None,
) -> None:
    """Write the batch's chunks. Whole chunks only, so a rewrite gives identical bytes.
    `opened` caches the arrays between batches of one job (opening reads metadata); `pool`
    encodes chunks in parallel. Returns once every chunk is written."""
    cache = opened if opened is not None else {}
    pending: list[Future[None]] = []

    def _set(name: str, start: int, values: np.ndarray) -> None:
        if name not in cache:
            cache[name] = writable(group, name)
        pending.extend(put_rows(cache[name], start, values, pool))

    start = rows.start
    _set(ERROR_CODE, start, rows.error_code)
    _set(ERROR_MESSAGE, start, np.asarray(rows.error_message, dtype=object))
    _set(LOGITS, start, rows.logits)
    _set(PRED, start, rows.pred)
    for name, layer in rows.layers.items():
        _set(layer_path(name, ACTS), start, layer.acts)
        _set(layer_path(name, POOLED), start, layer.pooled)
        if layer.top_channel is not None:
            _set(layer_path(name, TOP_CHANNEL), start, layer.top_channel)
        if layer.gradcam is not None and layer.gradcam_target is not None:
            _set(layer_path(name, GRADCAM), start, layer.gradcam)
            _set(layer_path(name, GRADCAM_TARGET), start, layer.gradcam_target)
        if layer.scale is not None and layer.offset is not None:
            # The batch's row of the per-batch tables: the plan's batch size is in attrs.
            size = group.attrs["batch_size"]
            assert isinstance(size, int)  # the plan writes it
            batch = start // size
            _set(layer_path(name, SCALE), batch, layer.scale[None])
            _set(layer_path(name, OFFSET), batch, layer.offset[None])
    if rows.squeeze is not None:
        _set(SQUEEZE, start, rows.squeeze)
    for copy, found in rows.benign.items():
        _set(benign_path(copy, LOGITS), start, found.logits)
        for name, values in found.pooled.items():
            _set(benign_path(copy, POOLED, name), start, values)
        if found.squeeze is not None:
            _set(benign_path(copy, SQUEEZE), start, found.squeeze)
    for future in pending:  # every one, so that no write outlives the call; then errors
        future.exception()
    for future in pending:
        future.result()


def _cat(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    return None if a is None or b is None else np.concatenate([a, b])


def quantise_rows(rows: BatchRows) -> BatchRows:
    """A batch's float maps as 8-bit levels with the batch's per-channel scale and offset
    (workers/storage/quantised.py), on the host: for a batch computed in parts."""
    layers = {}
    for name, layer in rows.layers.items():
        q, scale, offset = encode(layer.acts)
        layers[name] = replace(layer, acts=q, scale=scale, offset=offset)
    return replace(rows, layers=layers)


def concat_rows(first: BatchRows, second: BatchRows) -> BatchRows:
    """Two consecutive runs of rows as one (a batch computed in halves)."""
    layers = {
        name: LayerRows(
            np.concatenate([rows.acts, second.layers[name].acts]),
            np.concatenate([rows.pooled, second.layers[name].pooled]),
            _cat(rows.top_channel, second.layers[name].top_channel),
            _cat(rows.gradcam, second.layers[name].gradcam),
            _cat(rows.gradcam_target, second.layers[name].gradcam_target),
        )
        for name, rows in first.layers.items()
    }
    benign = {
        name: CopyRows(
            np.concatenate([rows.logits, second.benign[name].logits]),
            {n: np.concatenate([v, second.benign[name].pooled[n]]) for n, v in rows.pooled.items()},
            _cat(rows.squeeze, second.benign[name].squeeze),
        )
        for name, rows in first.benign.items()
    }
    return BatchRows(
        first.start,
        np.concatenate([first.error_code, second.error_code]),
        first.error_message + second.error_message,
        np.concatenate([first.logits, second.logits]),
        np.concatenate([first.pred, second.pred]),
        layers,
        _cat(first.squeeze, second.squeeze),
        benign,
    )
