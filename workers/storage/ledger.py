"""The completion ledger: `done[i]` is set once batch i's chunks are all written.

It is the truth about progress; counters elsewhere (Redis) are only hints.
"""

from __future__ import annotations

import numpy as np
import zarr

from workers.storage.layout import array, read

__all__ = ["done_batches", "is_done", "mark_done", "pending_batches"]


def mark_done(group: zarr.Group, batch: int) -> None:
    """Written last, after every chunk of the batch: a crash before it leaves the batch pending."""
    array(group, "done")[batch] = True


def is_done(group: zarr.Group, batch: int) -> bool:
    return bool(read(group, "done", slice(batch, batch + 1))[0])


def done_batches(group: zarr.Group) -> np.ndarray:
    return read(group, "done").astype(bool)


def pending_batches(group: zarr.Group) -> list[int]:
    return [int(i) for i in np.flatnonzero(~done_batches(group))]
