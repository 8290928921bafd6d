"""The completion ledger: `done[i]` is set once batch i's chunks are all written.

It is the truth about progress; counters elsewhere (Redis) are only hints.
"""

from __future__ import annotations

import numpy as np
import zarr

__all__ = ["done_batches", "is_done", "mark_done", "pending_batches"]


def mark_done(group: zarr.Group, batch: int) -> None:
    """Written last, after every chunk of the batch: a crash before it leaves the batch pending."""
    done = group["done"]
    assert isinstance(done, zarr.Array)
    done[batch] = True


def is_done(group: zarr.Group, batch: int) -> bool:
    done = group["done"]
    assert isinstance(done, zarr.Array)
    return bool(done[batch])


def done_batches(group: zarr.Group) -> np.ndarray:
    done = group["done"]
    assert isinstance(done, zarr.Array)
    return np.asarray(done[:], dtype=bool)


def pending_batches(group: zarr.Group) -> list[int]:
    return [int(i) for i in np.flatnonzero(~done_batches(group))]
