"""8-bit `acts`: per-channel affine quantisation, computed per batch. Never imports torch
(the encoding on the device is `workers.extraction.reduce`; this module owns the format).

    layers/{L}/acts         (N, C, ...) uint8   q: 0..254 a level, 255 missing (NaN)
    layers/{L}/acts_scale   (n_batches, C) float32
    layers/{L}/acts_offset  (n_batches, C) float32

A value of sample row r, channel c decodes as `q * scale[b, c] + offset[b, c]` with
b = r // rows_per_batch (the `acts` attrs say so, for xarray users). offset is the channel's
minimum over the batch's finite values and scale its range / 254, so the error of a value is
at most half a step (scale / 2); a constant channel has scale 0 and decodes exactly. 255
marks what is not a finite value: failed samples' rows, chunks never written (the fill
value) and NaN or infinite outputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

__all__ = [
    "LEVELS",
    "MISSING",
    "OFFSET",
    "SCALE",
    "Decoded",
    "decode",
    "describe",
    "encode",
]

MISSING = 255
LEVELS = 254  # the highest level: a channel's range is cut into this many steps
SCALE = "acts_scale"
OFFSET = "acts_offset"


def describe(rows_per_batch: int) -> dict[str, Any]:
    """The `acts` attrs of a uint8 layer: how to decode it without actmap."""
    return {
        "quantisation": {
            "scale": SCALE,
            "offset": OFFSET,
            "rows_per_batch": rows_per_batch,
            "missing": MISSING,
            "decode": (
                f"value = acts * {SCALE}[sample // rows_per_batch, channel] + "
                f"{OFFSET}[sample // rows_per_batch, channel]; {MISSING} is missing (NaN)"
            ),
        }
    }


def _expand(per_channel: np.ndarray, ndim: int) -> np.ndarray:
    """(n, C) or (C,) values broadcast over the spatial dimensions of (n, C, ...) acts."""
    return per_channel.reshape(per_channel.shape + (1,) * (ndim - 2))


def encode(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, C, ...) floats as (uint8 levels, scale (C,), offset (C,)). The host's twin of
    the device encoding in `workers.extraction.reduce`, for rows already on the host."""
    x = np.asarray(acts, dtype=np.float32)
    finite = np.isfinite(x)
    axes = tuple(i for i in range(x.ndim) if i != 1)
    with np.errstate(invalid="ignore"):
        lo = np.where(finite, x, np.inf).min(axis=axes) if x.size else np.zeros(x.shape[1])
        hi = np.where(finite, x, -np.inf).max(axis=axes) if x.size else np.zeros(x.shape[1])
    empty = ~np.isfinite(lo)  # no finite value in the channel
    lo = np.where(empty, np.nan, lo).astype(np.float32)
    scale = np.where(empty, np.nan, (hi - lo) / LEVELS).astype(np.float32)
    inv = np.where(scale > 0, 1 / np.where(scale > 0, scale, 1), 0).astype(np.float32)
    with np.errstate(invalid="ignore"):  # round half up, as the device does
        levels = np.floor(x * _expand(inv, x.ndim) + _expand(0.5 - lo * inv, x.ndim))
    q = np.clip(np.nan_to_num(levels, nan=0.0), 0, LEVELS).astype(np.uint8)
    q[~finite] = MISSING
    return q, scale, lo


def decode(q: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """uint8 levels (n, C, ...) as float32, with `scale` and `offset` per row: (n, C)."""
    levels = np.asarray(q)
    out: np.ndarray = levels.astype(np.float32) * _expand(scale, levels.ndim)
    out += _expand(offset, levels.ndim)
    out[levels == MISSING] = np.nan
    return out


class Decoded:
    """A uint8 `acts` array read as float32: the zarr array's shape, chunks, metadata and
    attrs, indexed as zarr indexes it (`[...]`, `.oindex[...]`,
    `get_orthogonal_selection`), each value decoded with its batch's scale and offset."""

    def __init__(self, acts: zarr.Array[Any], scale: zarr.Array[Any], offset: zarr.Array[Any]):
        self.source = acts
        self._scale, self._offset = scale, offset
        self._tables: tuple[np.ndarray, np.ndarray] | None = None
        meta = acts.attrs["quantisation"]
        assert isinstance(meta, dict)  # describe() wrote it
        self.rows_per_batch = int(meta["rows_per_batch"])

    dtype = np.dtype(np.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    @property
    def ndim(self) -> int:
        return self.source.ndim

    @property
    def chunks(self) -> tuple[int, ...]:
        return self.source.chunks

    @property
    def metadata(self) -> Any:
        return self.source.metadata

    @property
    def attrs(self) -> Any:
        return self.source.attrs

    @property
    def oindex(self) -> _Orthogonal:
        return _Orthogonal(self)

    def _per_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """Every batch's scale and offset: (n_batches, C) each, small, read once."""
        if self._tables is None:
            self._tables = (np.asarray(self._scale[...]), np.asarray(self._offset[...]))
        return self._tables

    def _read(self, key: Any, orthogonal: bool) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if key and key[-1] is Ellipsis:
            key = key[:-1]
        q = np.asarray(self.source.oindex[key] if orthogonal else self.source[key])
        rows = np.arange(self.shape[0])[key[0] if key else slice(None)]
        channels = np.arange(self.shape[1])[key[1] if len(key) > 1 else slice(None)]
        scale, offset = self._per_batch()
        batch = np.atleast_1d(rows) // self.rows_per_batch
        s = scale[np.ix_(batch, np.atleast_1d(channels))]
        o = offset[np.ix_(batch, np.atleast_1d(channels))]
        # Axes a plain integer dropped from the result are dropped from the tables too.
        drop = tuple(i for i, k in enumerate((rows, channels)) if np.ndim(k) == 0)
        s, o = np.squeeze(s, axis=drop), np.squeeze(o, axis=drop)
        if not drop:
            return decode(q, s, o)
        lead = 2 - len(drop)  # the per-row/per-channel axes left in q
        shape = s.shape + (1,) * (q.ndim - lead)
        out: np.ndarray = q.astype(np.float32) * s.reshape(shape)
        out += o.reshape(shape)
        out[q == MISSING] = np.nan
        return out

    def __getitem__(self, key: Any, /) -> np.ndarray:
        return self._read(key, orthogonal=False)

    def get_orthogonal_selection(self, selection: Any) -> np.ndarray:
        return self._read(selection, orthogonal=True)


class _Orthogonal:
    def __init__(self, owner: Decoded) -> None:
        self._owner = owner

    def __getitem__(self, key: Any, /) -> np.ndarray:
        return self._owner._read(key, orthogonal=True)
