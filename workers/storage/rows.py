"""One batch's rows, on the host, and their write into the job's arrays."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import zarr

from workers.storage.layout import array

__all__ = ["BatchRows", "LayerRows", "write_rows"]


@dataclass(frozen=True)
class LayerRows:
    acts: np.ndarray
    pooled: np.ndarray
    top_channel: np.ndarray | None = None


@dataclass(frozen=True)
class BatchRows:
    """Everything batch i stores, for rows [start, start + len(error_code))."""

    start: int
    error_code: np.ndarray
    error_message: list[str]
    logits: np.ndarray
    pred: np.ndarray
    layers: dict[str, LayerRows] = field(default_factory=dict)


def _set(group: zarr.Group, name: str, start: int, values: np.ndarray) -> None:
    array(group, name)[start : start + len(values)] = values


def write_rows(group: zarr.Group, rows: BatchRows) -> None:
    """Write the batch's chunks. Whole chunks only, so a rewrite gives identical bytes."""
    start = rows.start
    _set(group, "error_code", start, rows.error_code)
    _set(group, "error_message", start, np.asarray(rows.error_message, dtype=object))
    _set(group, "logits", start, rows.logits)
    _set(group, "pred", start, rows.pred)
    for name, layer in rows.layers.items():
        _set(group, f"layers/{name}/acts", start, layer.acts)
        _set(group, f"layers/{name}/pooled", start, layer.pooled)
        if layer.top_channel is not None:
            _set(group, f"layers/{name}/top_channel", start, layer.top_channel)
