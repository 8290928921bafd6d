"""Liveness, readiness and the Prometheus metrics: outside `/v1`, no tenant needed."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.auth import Unauthorized
from api.deps import Services, ServicesDep
from workers.errors import NotFound
from workers.jobs import JobState
from workers.settings import Settings
from workers.storage.index import figures
from workers.storage.objects import location

__all__ = ["metrics", "router"]

router = APIRouter()
# Its own router, so that the app can leave it out of the schema where metrics are off.
metrics = APIRouter()


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(services: ServicesDep) -> JSONResponse:
    checks = {"redis": services.broker.ping(), "store": _writable(services.store)}
    ok = all(checks.values())
    return JSONResponse({"ready": ok, **checks}, status_code=200 if ok else 503)


@metrics.get("/metrics")
def prometheus(services: ServicesDep, request: Request) -> Response:
    _metrics_allowed(services.settings, request.headers.get("authorization"))
    _refresh(services)
    return Response(generate_latest(services.metrics), media_type=CONTENT_TYPE_LATEST)


def _metrics_allowed(settings: Settings, authorization: str | None) -> None:
    """Raises unless `/metrics` is open, or behind a token and `authorization` carries it:
    the job counts are of every tenant, so no tenant's token is enough."""
    access = settings.metrics_access
    if access == "off":
        raise NotFound("metrics are off on this server (ACTMAP_METRICS)")
    if access == "token":
        assert settings.metrics_token is not None
        want = f"Bearer {settings.metrics_token.get_secret_value()}".encode()
        if not secrets.compare_digest((authorization or "").encode(), want):
            raise Unauthorized()


def _refresh(services: Services) -> None:
    found = figures(services.store)  # the job index: names, and a page of records
    for state in JobState:
        if state is not JobState.STALLED:  # derived by status, never stored nor indexed
            services.jobs.labels(state.value).set(found.counts.get(state.value, 0))
    for queue, depth in services.broker.depth().items():
        services.depth.labels(queue).set(depth)
    services.rate.set(found.rate)
    services.task_seconds.set(found.task_seconds)


def _writable(store: str) -> bool:
    root = Path(location(store))
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".ready-{os.getpid()}-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:
        return False
    return True
