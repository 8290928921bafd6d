"""A conv layer's weights (out, in, *kernel), float32, kept in its job group under
`filters/{layer}` by `actmap report` (which can load the model), so that the API, which
never imports torch, can draw them too; stored_job.read_filters reads them."""

from __future__ import annotations

import numpy as np

from workers.storage.layout import FILTERS, open_job

__all__ = ["store_filters"]


def store_filters(store: str, job_id: str, layer: str, weights: np.ndarray) -> None:
    """Keep a conv layer's weights in the job group (replacing earlier ones)."""
    group = open_job(store, job_id, mode="r+")
    values = np.asarray(weights, dtype=np.float32)
    group.require_group(FILTERS).create_array(
        layer, shape=values.shape, dtype="float32", overwrite=True
    )[...] = values
