"""A job's stored results: sample ids, activations, pooled values, logits, predictions as
`.npy` bytes, its summary, a screening job's scores and flags, and where to open the job
directly."""

from __future__ import annotations

import io
from typing import Annotated, Any

import numpy as np
import zarr
from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response

from api.deps import OwnedJob, ServicesDep, owned_job
from api.problems import PROBLEMS
from api.schemas import SamplesPage, ScreenPage, StoreLocation
from workers.errors import NotFound, SpecError
from workers.storage.layout import LOGITS, POOLED, PRED, SAMPLE, SCREEN, array
from workers.storage.stored_job import layer_group, open_acts, sample_rows, screening
from workers.storage.summary import JobSummary, job_summary

__all__ = ["router"]

router = APIRouter(prefix="/v1", responses=PROBLEMS)
_MAX_ROWS = 1000
_NPY: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}, "description": "a .npy array"}
}
Rows = Annotated[str | None, Query(max_length=100_000, description="comma-separated sample ids")]
Offset = Annotated[int, Query(ge=0)]
RowLimit = Annotated[int, Query(ge=1, le=_MAX_ROWS)]


@router.get("/jobs/{job_id}/samples", response_model=SamplesPage)
def samples(
    job: OwnedJob,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=_MAX_ROWS)] = 100,
) -> SamplesPage:
    ids = array(job, SAMPLE)
    page = np.asarray(ids[offset : offset + limit]) if offset < ids.shape[0] else np.array([])
    return SamplesPage(samples=[str(s) for s in page], offset=offset, total=int(ids.shape[0]))


def _rows(group: zarr.Group, wanted: str | None, offset: int, limit: int) -> np.ndarray:
    """Row indices for `samples=id,id,...`, else the page [offset, offset+limit)."""
    ids = [w for w in wanted.split(",") if w] if wanted else None
    if ids is not None and len(ids) > _MAX_ROWS:
        raise SpecError(f"at most {_MAX_ROWS} samples per request")
    return sample_rows(group, ids, offset, limit)


def _npy(values: np.ndarray) -> Response:
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return Response(buffer.getvalue(), media_type="application/octet-stream")


@router.get("/jobs/{job_id}/layers/{layer}/activations", responses=_NPY, response_class=Response)
def activations(
    job: OwnedJob,
    layer: str,
    samples: Rows = None,
    channels: Annotated[str | None, Query(max_length=20_000, pattern=r"^[0-9,]*$")] = None,
    offset: Offset = 0,
    limit: RowLimit = 16,
) -> Response:
    """`acts` of the chosen samples (and channels), as `.npy` bytes."""
    acts = open_acts(layer_group(job, layer))
    rows = _rows(job, samples, offset, limit)
    chosen = [int(c) for c in channels.split(",") if c] if channels else None
    if chosen and max(chosen) >= acts.shape[1]:
        raise SpecError(f"channel {max(chosen)} asked of a layer with {acts.shape[1]} stored")
    if rows.size == 0:
        return _npy(np.zeros((0, *acts.shape[1:]), dtype=acts.dtype))
    selection: tuple[Any, ...] = (rows, chosen if chosen else slice(None))
    return _npy(np.asarray(acts.get_orthogonal_selection(selection)))


@router.get("/jobs/{job_id}/layers/{layer}/pooled", responses=_NPY, response_class=Response)
def pooled(
    job: OwnedJob, layer: str, samples: Rows = None, offset: Offset = 0, limit: RowLimit = _MAX_ROWS
) -> Response:
    values = array(layer_group(job, layer), POOLED)
    return _npy(np.asarray(values.get_orthogonal_selection((_rows(job, samples, offset, limit),))))


def _table(group: zarr.Group, name: str, rows: np.ndarray) -> Response:
    return _npy(np.asarray(array(group, name).get_orthogonal_selection((rows,))))


@router.get("/jobs/{job_id}/logits", responses=_NPY, response_class=Response)
def logits(
    job: OwnedJob, samples: Rows = None, offset: Offset = 0, limit: RowLimit = _MAX_ROWS
) -> Response:
    return _table(job, LOGITS, _rows(job, samples, offset, limit))


@router.get("/jobs/{job_id}/predictions", responses=_NPY, response_class=Response)
def predictions(
    job: OwnedJob, samples: Rows = None, offset: Offset = 0, limit: RowLimit = _MAX_ROWS
) -> Response:
    return _table(job, PRED, _rows(job, samples, offset, limit))


@router.get("/jobs/{job_id}/screen", response_model=ScreenPage)
def screen(
    job: OwnedJob, job_id: str, samples: Rows = None, offset: Offset = 0, limit: RowLimit = 100
) -> ScreenPage:
    """A screening job's answer: the chosen samples' scores and flags, and the threshold."""
    found = screening(job)
    if found is None:
        raise NotFound(f"job {job_id} has no screening scores: not a screening job, or not done")
    scores, flags, threshold = found
    rows = _rows(job, samples, offset, limit)
    meta = job[SCREEN].attrs
    profile_id, fpr = meta.get("profile_id"), meta.get("fpr")
    flagged = np.zeros(scores.size, dtype=bool) if flags is None else flags
    return ScreenPage(
        profile_id=profile_id if isinstance(profile_id, str) else None, threshold=threshold,
        fpr=float(fpr) if isinstance(fpr, int | float) else None,
        n_flagged=int(flagged.sum()),
        samples=[str(s) for s in np.asarray(array(job, SAMPLE).get_orthogonal_selection((rows,)))],
        scores=[float(v) if np.isfinite(v) else None for v in scores[rows]],
        flags=[bool(v) for v in flagged[rows]], offset=offset, total=int(scores.size),
    )  # fmt: skip


@router.get("/jobs/{job_id}/summary", response_model=JobSummary)
def summary(job: OwnedJob) -> JobSummary:
    """What the job holds in brief, as a scan prints it at its end: accuracy on the
    labelled samples, each layer's stored shapes, files skipped and the first failures."""
    return job_summary(job)


@router.get("/jobs/{job_id}/store", response_model=StoreLocation, dependencies=[Depends(owned_job)])
def store_location(services: ServicesDep, job_id: str) -> StoreLocation:
    """Where to open the job directly: `xarray.open_datatree(f"{store}/{group}", engine="zarr")`."""
    return StoreLocation(store=services.store, group=f"jobs/{job_id}")
