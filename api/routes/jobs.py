"""`/v1/jobs`: submit an extraction or a screening, list, get, cancel and resume jobs. The
one place here where a job's batches are sent as tasks."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from typing import Annotated, Any

import numpy as np
import zarr
from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import Response

from api.deps import (
    OwnedJob,
    ServicesDep,
    TenantDep,
    analysis_of,
    checked_sources,
    inputs_of,
    job_of,
    owned_job,
    roots_of,
)
from api.problems import PROBLEMS
from api.quotas import job_slot
from api.quotas import samples as samples_quota
from api.schemas import Accepted, ExtractionRequest, JobOut, SampleErrors, ScreeningRequest
from workers.analysis.profiles import screening_spec
from workers.errors import Conflict, SampleCode, SpecError
from workers.extraction.inputs import list_inputs
from workers.jobs import (
    AnalysisKind,
    AnalysisState,
    ExtractionSpec,
    JobState,
    close_matches,
)
from workers.lifecycle.state import Status, job_page, status
from workers.lifecycle.state import cancel as cancel_job
from workers.lifecycle.submit import resume as resume_job
from workers.lifecycle.submit import submit
from workers.storage.layout import ERROR_CODE, ERROR_MESSAGE, SAMPLE, attrs, open_job, read
from workers.storage.registry import Registry

__all__ = ["router"]

router = APIRouter(prefix="/v1", responses=PROBLEMS)
log = logging.getLogger("actmap.api")


@router.post("/jobs/extractions", status_code=202, response_model=Accepted)
def submit_extraction(
    services: ServicesDep,
    tenant: TenantDep,
    body: ExtractionRequest,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Accepted:
    """Plan an extraction here (no worker needed) and queue its batches."""
    registry = Registry(services.store)
    record = registry.get(tenant.name, body.model_id)
    if record.state != "ready" or record.catalogue is None:
        raise Conflict(f"model {record.id} is {record.state}: {record.error or 'wait for it'}")
    if not services.tenants.open and not registry.keeps_files_of(record):
        raise Conflict(
            f"model {record.id} was registered by path before models were copied into the "
            "registry, so its file could still be swapped; register it again"
        )
    known = record.catalogue.layer_names()
    for layer in body.layers:
        if layer not in known:
            raise SpecError(f"unknown layer {layer!r}; {close_matches(layer, known)}")
    inputs = inputs_of(services, tenant, body)
    spec = ExtractionSpec(
        model=record.ref, weights=record.weights, model_id=record.id, layers=tuple(body.layers),
        inputs=tuple(inputs), batch_size=body.batch_size, dtype=body.dtype,
        compression=body.compression,
        channels=tuple(body.channels) if body.channels else None, top_k=body.top_k,
        max_size=body.max_size, labels_from_dirs=body.labels_from_dirs, tenant=tenant.name,
        queue=body.queue, roots=roots_of(services, tenant), gradcam=tuple(body.gradcam),
        gradcam_target=body.gradcam_target, squeeze=body.squeeze, benign=body.benign,
    )  # fmt: skip
    listed = list_inputs(spec, record.catalogue, checked_sources(services, tenant, spec.inputs))
    samples_quota(tenant, len(listed.sources))
    key = f"actmap:idem:{tenant.name}:{idempotency_key}" if idempotency_key else None

    def admit() -> AbstractContextManager[None]:
        """A new job's quota, checked and held while it is planned; a retry of a job
        already acknowledged (or half-done) is not a new job and skips it."""
        return job_slot(services, tenant)

    # Unavailable and Busy (the broker, an idempotency key held) answer 503: api/problems.py.
    job = submit(
        services.store, spec, record.catalogue, listed, services.broker,
        cap=services.settings.batches_per_task, keys=services.broker, key=key,
        admit=admit,
    )  # fmt: skip
    current = status(services.store, job.job_id)
    log.info(
        "extraction queued: %d samples in %d batches on %s", job.n_samples, job.n_batches,
        body.queue, extra={"job_id": job.job_id, "tenant": tenant.name},
    )  # fmt: skip
    return Accepted(
        job_id=job.job_id, state=current.state, n_samples=job.n_samples, queue=body.queue
    )


@router.post("/jobs/screenings", status_code=202, response_model=Accepted)
def screenings(services: ServicesDep, tenant: TenantDep, body: ScreeningRequest) -> Accepted:
    """Extract INPUTs with the profile's model and layers on the `screen` queue; each sample
    gets `screen/score` and `screen/flag` when the job finishes."""
    profile = analysis_of(services, tenant, body.profile_id)
    fitted = profile.kind == AnalysisKind.SCREENING_PROFILE
    if not fitted or profile.state != AnalysisState.SUCCEEDED:
        raise SpecError(f"{body.profile_id} is not a fitted screening profile ({profile.state})")
    inputs = profile.summary.get("inputs")
    reference = inputs.get("reference_job") if isinstance(inputs, dict) else None
    spec = attrs(job_of(services, tenant, str(reference)))["spec"]
    layers = [str(c["name"]) for c in _spec_layers(profile.summary)] or list(spec["layers"])
    request = ExtractionRequest(
        model_id=spec.get("model_id") or "-", layers=layers, inputs=body.inputs,
        input_set=body.input_set, queue="screen",
    )  # fmt: skip
    screening = screening_spec(
        services.store, body.profile_id, inputs=tuple(inputs_of(services, tenant, request)),
        tenant=tenant.name, roots=roots_of(services, tenant),
    )  # fmt: skip
    catalogue = Registry(services.store).get(tenant.name, str(spec.get("model_id"))).catalogue
    if catalogue is None:
        raise SpecError("the profile's model is no longer registered")
    listed = list_inputs(screening, catalogue, checked_sources(services, tenant, screening.inputs))
    samples_quota(tenant, len(listed.sources))
    job = submit(
        services.store, screening, catalogue, listed, services.broker,
        cap=services.settings.batches_per_task,
        admit=lambda: job_slot(services, tenant),
    )  # fmt: skip
    return Accepted(
        job_id=job.job_id, state=JobState.QUEUED, n_samples=job.n_samples, queue="screen"
    )


def _spec_layers(summary: dict[str, object]) -> list[dict[str, Any]]:
    """The layers a profile scores, from its stored description."""
    described = summary.get("profile")
    layers = described.get("layers") if isinstance(described, dict) else None
    return (
        [layer for layer in layers if isinstance(layer, dict)] if isinstance(layers, list) else []
    )


def _job_out(group: zarr.Group, s: Status) -> JobOut:
    a = attrs(group)
    codes, messages, samples = (
        read(group, ERROR_CODE),
        read(group, ERROR_MESSAGE),
        read(group, SAMPLE),
    )
    failed = np.flatnonzero(codes)
    names = {str(int(c)): c.name.lower() for c in SampleCode}
    by_code: dict[str, int] = {}
    for code in codes[failed]:
        by_code[names.get(str(int(code)), str(code))] = (
            by_code.get(names.get(str(int(code)), str(code)), 0) + 1
        )
    examples = [{"sample": str(samples[i]), "message": str(messages[i])} for i in failed[:10]]
    return JobOut(
        job_id=s.job_id, kind=a.get("kind", "extraction"), state=s.state,
        model_id=a["spec"].get("model_id"), layers=list(a["spec"]["layers"]),
        n_samples=s.n_samples, n_batches=s.n_batches, batches_done=s.batches_done,
        samples_done=s.samples_done, samples_per_s=s.samples_per_s, eta_s=s.eta_s,
        created=s.created, finished=s.finished, elapsed_s=a.get("elapsed_s"), reason=s.reason,
        errors=SampleErrors(n_failed=int(len(failed)), by_code=by_code, examples=examples),
    )  # fmt: skip


@router.get("/jobs", response_model=list[JobOut])
def jobs(
    services: ServicesDep,
    tenant: TenantDep,
    response: Response,
    state: Annotated[JobState | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(pattern=r"^[0-9]{17}_[A-Za-z0-9_-]{1,64}\.json$")] = None,
) -> list[JobOut]:
    """Newest first; the next page's cursor, when there is one, is in `X-Next-Cursor`."""
    found, after = job_page(
        services.store, limit, cursor, state.value if state else None, tenant.name
    )
    if after is not None:
        response.headers["X-Next-Cursor"] = after
    return [_job_out(open_job(services.store, s.job_id, mode="r"), s) for s in found]


@router.get("/jobs/{job_id}", response_model=JobOut)
def get_job(services: ServicesDep, job: OwnedJob, job_id: str) -> JobOut:
    return _job_out(job, status(services.store, job_id, services.broker.counters()))


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, dependencies=[Depends(owned_job)])
def cancel(services: ServicesDep, tenant: TenantDep, job_id: str) -> JobOut:
    current = cancel_job(services.store, job_id)
    log.info("job cancelled", extra={"job_id": job_id, "tenant": tenant.name})
    return _job_out(open_job(services.store, job_id, mode="r"), current)


@router.post("/jobs/{job_id}/resume", response_model=JobOut, dependencies=[Depends(owned_job)])
def resume(services: ServicesDep, tenant: TenantDep, job_id: str) -> JobOut:
    cap, counters = services.settings.batches_per_task, services.broker.counters()
    missing = resume_job(services.broker, services.store, job_id, cap, counters)
    log.info("resumed %d batches", len(missing), extra={"job_id": job_id, "tenant": tenant.name})
    group = open_job(services.store, job_id, mode="r")
    return _job_out(group, status(services.store, job_id))
