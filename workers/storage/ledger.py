"""The completion ledger: `done[i]` is set once batch i's chunks are all written.

It is the truth about progress; counters elsewhere (Redis) are only hints.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from workers.storage.chunks import get_row, put_rows
from workers.storage.layout import DONE, read, writable

__all__ = ["done_batches", "is_done", "mark_done", "pending_batches"]


def _ledger(group: zarr.Group, opened: dict[str, Any] | None) -> zarr.Array[Any]:
    """The `done` array; `opened` keeps it open between batches (opening reads metadata)."""
    if opened is None:
        return writable(group, DONE)
    if DONE not in opened:
        opened[DONE] = writable(group, DONE)
    done: zarr.Array[Any] = opened[DONE]
    return done


def mark_done(group: zarr.Group, batch: int, opened: dict[str, Any] | None = None) -> None:
    """Written last, after every chunk of the batch: a crash before it leaves the batch pending."""
    put_rows(_ledger(group, opened), batch, np.ones(1, dtype=bool))


def is_done(group: zarr.Group, batch: int, opened: dict[str, Any] | None = None) -> bool:
    """Read fresh from the store, whether or not the array was open already."""
    return bool(get_row(_ledger(group, opened), batch))


def done_batches(group: zarr.Group) -> np.ndarray:
    return read(group, DONE).astype(bool)


def pending_batches(group: zarr.Group) -> list[int]:
    return [int(i) for i in np.flatnonzero(~done_batches(group))]
