"""`/v1/analyses/*`: analyses of the caller's jobs, queued on the `analysis` queue and run by
a worker; `GET /v1/analyses/{id}` answers their state and summary."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.auth import Tenant
from api.deps import OwnedAnalysis, Services, ServicesDep, TenantDep, analysis_of, job_of
from api.problems import PROBLEMS
from api.schemas import (
    AnalysisOut,
    AtlasRequest,
    ComparisonRequest,
    ExplainRequest,
    JobAnalysisRequest,
    ProfileRequest,
)
from workers.analysis.profiles import check_reference_job
from workers.analysis.requests import Analysis, submit
from workers.jobs import AnalysisKind

__all__ = ["router"]

router = APIRouter(prefix="/v1", responses=PROBLEMS)


def _out(found: Analysis) -> AnalysisOut:
    return AnalysisOut(
        analysis_id=found.analysis_id, kind=found.kind, state=found.state, reason=found.reason,
        summary=found.summary,
    )  # fmt: skip


def _queue(
    services: Services, tenant: Tenant, kind: AnalysisKind, params: dict[str, Any]
) -> AnalysisOut:
    analysis_id = submit(services.broker.send, services.store, kind, params, tenant.name)
    return _out(analysis_of(services, tenant, analysis_id))


@router.post("/analyses/health", status_code=202, response_model=AnalysisOut)
def health(services: ServicesDep, tenant: TenantDep, body: JobAnalysisRequest) -> AnalysisOut:
    """Filter health of a job: dead, always-on, saturated and sparse filters per layer."""
    job_of(services, tenant, body.job_id)
    return _queue(services, tenant, AnalysisKind.HEALTH, body.model_dump())


@router.post("/analyses/signatures", status_code=202, response_model=AnalysisOut)
def signatures(services: ServicesDep, tenant: TenantDep, body: JobAnalysisRequest) -> AnalysisOut:
    """Per class or family, the channels consistently active."""
    job_of(services, tenant, body.job_id)
    return _queue(services, tenant, AnalysisKind.SIGNATURES, body.model_dump())


@router.post("/analyses/explanations", status_code=202, response_model=AnalysisOut)
def explanations(services: ServicesDep, tenant: TenantDep, body: ExplainRequest) -> AnalysisOut:
    """Per sample, the channels overlapping its Grad-CAM map most (a job scanned with
    `gradcam`); per class, the channels most often among them."""
    job_of(services, tenant, body.job_id)
    return _queue(services, tenant, AnalysisKind.EXPLAIN, body.model_dump())


@router.post("/analyses/atlas", status_code=202, response_model=AnalysisOut)
def atlas(services: ServicesDep, tenant: TenantDep, body: AtlasRequest) -> AnalysisOut:
    """Each channel's strongest responses at one layer: samples, positions, values, the
    input crop each sees (and the byte offsets, for binaries)."""
    job_of(services, tenant, body.job_id)
    return _queue(services, tenant, AnalysisKind.ATLAS, body.model_dump())


@router.post("/analyses/comparisons", status_code=202, response_model=AnalysisOut)
def comparisons(services: ServicesDep, tenant: TenantDep, body: ComparisonRequest) -> AnalysisOut:
    """Two populations, channel by channel: Cohen's d, Welch's t with BH, AUROC."""
    job_of(services, tenant, body.a.job_id)
    job_of(services, tenant, body.b.job_id)
    return _queue(services, tenant, AnalysisKind.COMPARE, body.model_dump())


@router.post("/analyses/profiles", status_code=202, response_model=AnalysisOut)
def profiles(services: ServicesDep, tenant: TenantDep, body: ProfileRequest) -> AnalysisOut:
    """Fit a screening profile on a clean reference job (optionally tuned on attacks); a
    reference too small for the rate is refused before anything is queued."""
    job_of(services, tenant, body.reference_job)
    if body.adversarial_job:
        job_of(services, tenant, body.adversarial_job)
    check_reference_job(services.store, body.reference_job, body.fpr, body.held_out)
    return _queue(services, tenant, AnalysisKind.SCREENING_PROFILE, body.model_dump())


@router.get("/analyses/{analysis_id}", response_model=AnalysisOut)
def get_analysis(analysis: OwnedAnalysis) -> AnalysisOut:
    return _out(analysis)
