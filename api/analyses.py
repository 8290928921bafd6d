"""`/v1/analyses/*` and `/v1/jobs/screenings`: analyses queued on the `analysis` queue,
screening jobs on the `screen` queue, under the same tenant rules as every route."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter

from api.quotas import job_slot, samples
from api.routes import (
    _PROBLEMS,
    ServicesDep,
    TenantDep,
    _job,
    _roots,
    _sources,
    checked_sources,
)
from api.schemas import (
    Accepted,
    AnalysisOut,
    ComparisonRequest,
    ExtractionRequest,
    JobAnalysisRequest,
    ProfileRequest,
    ScreeningRequest,
)
from workers.analysis.requests import describe, submit
from workers.errors import JobError, SpecError
from workers.jobs import ExtractionSpec
from workers.lifecycle.submit import submit as submit_job
from workers.storage.layout import attrs

__all__ = ["router"]

router = APIRouter(prefix="/v1", responses=_PROBLEMS)


def _queue(services: Any, tenant: Any, kind: str, params: dict[str, Any]) -> AnalysisOut:
    analysis_id = submit(services.broker.send, services.store, kind, params, tenant.name)
    return _analysis(services, tenant, analysis_id)


def _analysis(services: Any, tenant: Any, analysis_id: str) -> AnalysisOut:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", analysis_id):  # never a path in the store
        raise JobError("no such analysis of yours; its id is what POST /v1/analyses/* gave")
    missing = JobError(f"no analysis {analysis_id!r} of yours")
    try:
        found = describe(services.store, analysis_id)
    except JobError:
        raise missing from None
    if found.tenant != tenant.name:
        raise missing
    return AnalysisOut(
        analysis_id=analysis_id, kind=found.kind, state=found.state, reason=found.reason,
        summary=found.summary,
    )  # fmt: skip


@router.post("/analyses/health", status_code=202, response_model=AnalysisOut)
def health(services: ServicesDep, tenant: TenantDep, body: JobAnalysisRequest) -> AnalysisOut:
    """Filter health of a job: dead, always-on, saturated and sparse filters per layer."""
    _job(services, tenant, body.job_id)
    return _queue(services, tenant, "health", body.model_dump())


@router.post("/analyses/signatures", status_code=202, response_model=AnalysisOut)
def signatures(services: ServicesDep, tenant: TenantDep, body: JobAnalysisRequest) -> AnalysisOut:
    """Per class or family, the channels consistently active."""
    _job(services, tenant, body.job_id)
    return _queue(services, tenant, "signatures", body.model_dump())


@router.post("/analyses/comparisons", status_code=202, response_model=AnalysisOut)
def comparisons(services: ServicesDep, tenant: TenantDep, body: ComparisonRequest) -> AnalysisOut:
    """Two populations, channel by channel: Cohen's d, Welch's t with BH, AUROC."""
    _job(services, tenant, body.a.job_id)
    _job(services, tenant, body.b.job_id)
    return _queue(services, tenant, "comparison", body.model_dump())


@router.post("/analyses/profiles", status_code=202, response_model=AnalysisOut)
def profiles(services: ServicesDep, tenant: TenantDep, body: ProfileRequest) -> AnalysisOut:
    """Fit a screening profile on a clean reference job (optionally tuned on attacks)."""
    _job(services, tenant, body.reference_job)
    if body.adversarial_job:
        _job(services, tenant, body.adversarial_job)
    return _queue(services, tenant, "profile", body.model_dump())


@router.get("/analyses/{analysis_id}", response_model=AnalysisOut)
def get_analysis(services: ServicesDep, tenant: TenantDep, analysis_id: str) -> AnalysisOut:
    return _analysis(services, tenant, analysis_id)


@router.post("/jobs/screenings", status_code=202, response_model=Accepted)
def screenings(services: ServicesDep, tenant: TenantDep, body: ScreeningRequest) -> Accepted:
    """Extract INPUTs with the profile's model and layers on the `screen` queue; each sample
    gets `screen/score` and `screen/flag` when the job finishes."""
    profile = _analysis(services, tenant, body.profile_id)
    if profile.kind != "screening-profile" or profile.state != "succeeded":
        raise SpecError(f"{body.profile_id} is not a fitted screening profile ({profile.state})")
    inputs = profile.summary.get("inputs")
    reference = inputs.get("reference_job") if isinstance(inputs, dict) else None
    spec = attrs(_job(services, tenant, str(reference)))["spec"]
    layers = [str(c["name"]) for c in spec_layers(profile.summary)] or list(spec["layers"])
    request = ExtractionRequest(
        model_id=spec.get("model_id") or "-", layers=layers, inputs=body.inputs,
        input_set=body.input_set, queue="screen",
    )  # fmt: skip
    screening = ExtractionSpec.model_validate(
        {**spec, "inputs": tuple(_sources(services, tenant, request)), "layers": tuple(layers),
         "labels_csv": None, "labels_from_dirs": False, "profile_id": body.profile_id,
         "queue": "screen", "channels": None, "top_k": None, "max_size": None,
         "tenant": tenant.name, "roots": _roots(services, tenant)}
    )  # fmt: skip
    from workers.storage.registry import Registry

    catalogue = Registry(services.store).get(tenant.name, str(spec.get("model_id"))).catalogue
    if catalogue is None:
        raise SpecError("the profile's model is no longer registered")
    sources = checked_sources(services, tenant, screening.inputs)
    samples(tenant, len(sources))
    job = submit_job(
        services.store, screening, catalogue, services.broker,
        cap=services.settings.batches_per_task, sources=sources,
        admit=lambda: job_slot(services, tenant),
    )  # fmt: skip
    return Accepted(job_id=job.job_id, state="queued", n_samples=job.n_samples, queue="screen")


def spec_layers(summary: dict[str, object]) -> list[dict[str, Any]]:
    """The layers a profile scores, from its stored description."""
    described = summary.get("profile")
    layers = described.get("layers") if isinstance(described, dict) else None
    return (
        [layer for layer in layers if isinstance(layer, dict)] if isinstance(layers, list) else []
    )
