"""A screening job's scores in its group: `screen/score` (N,) float32 and `screen/flag`
(N,) bool, chunked as the job's per-sample columns, with the profile that scored them in
the `screen` group's attrs."""

from __future__ import annotations

import numpy as np

from workers.jobs import now
from workers.storage.consolidate import publish
from workers.storage.layout import COMPRESSOR, FLAG, LABEL, SCORE, SCREEN, array, open_job

__all__ = ["write_screen"]


def write_screen(
    store: str,
    job_id: str,
    profile_id: str,
    threshold: float,
    fpr: float,
    scores: np.ndarray,
    flags: np.ndarray,
) -> None:
    """Store (replacing earlier ones) the job's scores and flags, then publish the job."""
    job = open_job(store, job_id)
    screen = job.require_group(SCREEN)
    screen.update_attributes(
        {
            "profile_id": profile_id,
            "threshold": threshold,
            "fpr": fpr,
            "n_flagged": int(flags.sum()),
            "scored": now(),
        }
    )
    chunk = array(job, LABEL).chunks
    for name, values in ((SCORE, scores), (FLAG, flags)):
        screen.create_array(
            name,
            shape=values.shape,
            chunks=chunk,
            dtype=values.dtype,
            dimension_names=["sample"],
            fill_value=False if values.dtype == bool else np.nan,
            compressors=COMPRESSOR,
            overwrite=True,
        )[:] = values
    publish(store, job_id)
