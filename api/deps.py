"""What every route depends on: the services, the caller's tenant, and what that tenant may
see. Another tenant's job or analysis answers exactly as one that does not exist (404)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import zarr
from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry, Gauge, Histogram

from api.auth import Tenant, Tenants, Unauthorized, inside_roots
from api.broker import Broker
from api.schemas import ExtractionRequest
from workers.analysis.requests import Analysis, describe
from workers.errors import NotFound, SpecError
from workers.extraction.inputs import Source, discover
from workers.settings import Settings
from workers.storage.layout import attrs, open_job, uploads_folder

__all__ = [
    "OwnedAnalysis",
    "OwnedJob",
    "Services",
    "ServicesDep",
    "TenantDep",
    "analysis_of",
    "checked_sources",
    "inputs_of",
    "job_of",
    "known_query",
    "roots_of",
    "safe_name",
    "uploads_of",
]

_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # never a path in the store
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class Services:
    """What the routes share: settings, tenants, the broker, the metrics."""

    def __init__(self, settings: Settings, broker: Broker, tenants: Tenants) -> None:
        self.settings = settings
        self.broker = broker
        self.tenants = tenants
        self.store = settings.store
        self.metrics = CollectorRegistry()
        self.latency = Histogram(
            "actmap_request_seconds", "API request latency", ["route"], registry=self.metrics
        )
        self.jobs = Gauge(
            "actmap_jobs", "jobs in the store by state", ["state"], registry=self.metrics
        )
        self.depth = Gauge("actmap_queue_depth", "tasks waiting", ["queue"], registry=self.metrics)
        self.rate = Gauge(
            "actmap_samples_per_second", "throughput of running jobs", registry=self.metrics
        )
        self.task_seconds = Gauge(
            "actmap_task_seconds",
            "mean seconds per batch task of finished jobs",
            registry=self.metrics,
        )


def services_of(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


ServicesDep = Annotated[Services, Depends(services_of)]
_bearer = HTTPBearer(auto_error=False)


def tenant_of(
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    tenant = services.tenants.lookup(credentials.credentials if credentials else None)
    if tenant is None:
        raise Unauthorized()
    return tenant


TenantDep = Annotated[Tenant, Depends(tenant_of)]


def _query_names(dependant: Dependant) -> set[str]:
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def known_query(request: Request) -> None:
    """Raises SpecError for a query parameter the route does not take: a mistyped option,
    or a token put in the URL, is refused rather than ignored."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    known = _query_names(route.dependant)
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        takes = ", ".join(sorted(known)) or "none"
        raise SpecError(f"unknown query parameter {unknown[0][:40]!r}; this route takes: {takes}")


def job_of(services: Services, tenant: Tenant, job_id: str) -> zarr.Group:
    """The tenant's job; someone else's answers exactly like one that does not exist."""
    missing = NotFound(f"no job {job_id!r}; `GET /v1/jobs` lists yours")
    if not _ID.fullmatch(job_id):
        raise missing
    try:
        group = open_job(services.store, job_id, mode="r")
    except NotFound:
        raise missing from None
    if attrs(group).get("tenant") != tenant.name:
        raise missing
    return group


def owned_job(services: ServicesDep, tenant: TenantDep, job_id: str) -> zarr.Group:
    return job_of(services, tenant, job_id)


OwnedJob = Annotated[zarr.Group, Depends(owned_job)]


def analysis_of(services: Services, tenant: Tenant, analysis_id: str) -> Analysis:
    """The tenant's analysis; someone else's answers exactly like one that does not exist."""
    if not _ID.fullmatch(analysis_id):
        raise NotFound("no such analysis of yours; its id is what POST /v1/analyses/* gave")
    missing = NotFound(f"no analysis {analysis_id!r} of yours")
    try:
        found = describe(services.store, analysis_id)
    except NotFound:
        raise missing from None
    if found.tenant != tenant.name:
        raise missing
    return found


def owned_analysis(services: ServicesDep, tenant: TenantDep, analysis_id: str) -> Analysis:
    return analysis_of(services, tenant, analysis_id)


OwnedAnalysis = Annotated[Analysis, Depends(owned_analysis)]


def uploads_of(services: Services, tenant: Tenant) -> Path:
    """The folder of the tenant's uploaded input sets."""
    return uploads_folder(services.store, tenant.name)


def safe_name(name: str) -> str:
    """A file name from a client, reduced to characters safe in a path, never hidden."""
    return _UNSAFE.sub("_", Path(name).name).lstrip(".")


def roots_of(services: Services, tenant: Tenant) -> tuple[str, ...] | None:
    """Where the tenant's inputs are opened beneath (its jobs carry them to the worker);
    None for the open server's single local user, whose paths are trusted as the CLI's."""
    if services.tenants.open:
        return None
    # Absolute: a worker started in another folder opens beneath the same ones.
    return tuple(os.path.abspath(r) for r in (*tenant.roots, str(uploads_of(services, tenant))))


def inputs_of(services: Services, tenant: Tenant, body: ExtractionRequest) -> list[str]:
    """The request's inputs, its input set as a folder among them, each inside the roots."""
    roots = roots_of(services, tenant)
    inputs = list(body.inputs)
    if body.input_set is not None:
        folder = uploads_of(services, tenant) / body.input_set
        if not re.fullmatch(r"in-[0-9a-f]{12}", body.input_set) or not folder.is_dir():
            raise NotFound(f"no input set {body.input_set!r}; upload with POST /v1/inputs")
        inputs.append(str(folder))
    for item in inputs:
        if item.startswith("@") or not inside_roots(item, roots):
            raise SpecError(f"input {item} is not inside your allowed roots")
    return inputs


def checked_sources(services: Services, tenant: Tenant, inputs: Iterable[str]) -> list[Source]:
    """The samples under `inputs`, every one opening beneath the tenant's roots as the
    worker will open it (which checks again: this is for a clear answer now)."""
    roots = roots_of(services, tenant)
    sources = discover(tuple(inputs), roots)
    for source in sources:
        if not inside_roots(source.path, roots):
            raise SpecError(
                f"input {source.id} resolves outside your allowed roots or through a "
                "symbolic link (links are not followed)"
            )
    return sources
