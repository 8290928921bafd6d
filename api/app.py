"""`create_app(settings)`: the thin HTTP API. It reads results straight from the store and
sends tasks to Celery by name; it never imports torch."""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.auth import Tenant, Tenants
from api.broker import Broker
from api.gate import Gate
from api.logs import redact_access_log
from workers.errors import JobError, SpecError, UserError
from workers.settings import Settings
from workers.storage.index import figures
from workers.storage.objects import location

__all__ = ["Limit", "Services", "create_app"]

log = logging.getLogger("actmap.api")


class Limit(UserError):
    """Raised when a request breaks a tenant's quota; names the limit."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


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


_bearer = HTTPBearer(auto_error=False)


def tenant_of(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Tenant:
    services: Services = request.app.state.services
    tenant = services.tenants.lookup(credentials.credentials if credentials else None)
    if tenant is None:
        raise _Unauthorized()
    return tenant


class _Unauthorized(Exception):
    pass


def _query_names(dependant: Dependant) -> set[str]:
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def _known_query(request: Request) -> None:
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


def _one_line(exc: RequestValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "request"
    return f"invalid {where}: {first.get('msg', 'bad value')}"


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(_Unauthorized)
    async def unauthorized(_r: Request, _e: _Unauthorized) -> JSONResponse:
        return JSONResponse(
            {"detail": "missing or unknown bearer token; send Authorization: Bearer TOKEN"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    @app.exception_handler(JobError)
    async def not_found(_r: Request, exc: JobError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(Limit)
    async def limit(_r: Request, exc: Limit) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(UserError)
    async def user_error(_r: Request, exc: UserError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code != 405:
            return await http_exception_handler(request, exc)
        # Starlette names the methods of the first route matching the path only.
        allowed = sorted(
            {
                m
                for r in app.routes
                if isinstance(r, APIRoute) and r.path_regex.match(request.url.path)
                for m in r.methods or ()
            }
        )
        return JSONResponse(
            {"detail": f"method not allowed here; use {', '.join(allowed)}"},
            status_code=405,
            headers={"Allow": ", ".join(allowed)},
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(_r: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return JSONResponse({"detail": _one_line(exc), "errors": errors}, status_code=422)


def _metrics_allowed(settings: Settings, authorization: str | None) -> None:
    """Raises unless `/metrics` is open, or behind a token and `authorization` carries it:
    the job counts are of every tenant, so no tenant's token is enough."""
    access = settings.metrics_access
    if access == "off":
        raise JobError("metrics are off on this server (ACTMAP_METRICS)")
    if access == "token":
        assert settings.metrics_token is not None
        want = f"Bearer {settings.metrics_token.get_secret_value()}".encode()
        if not secrets.compare_digest((authorization or "").encode(), want):
            raise _Unauthorized()


def _refresh_metrics(services: Services) -> None:
    found = figures(services.store)  # the job index: names, and a page of records
    for state in ("queued", "running", "succeeded", "partial", "failed", "cancelled"):
        services.jobs.labels(state).set(found.counts.get(state, 0))
    for queue, depth in services.broker.depth().items():
        services.depth.labels(queue).set(depth)
    services.rate.set(found.rate)
    services.task_seconds.set(found.task_seconds)


def create_app(settings: Settings, broker: Broker | None = None) -> FastAPI:
    """The app for `settings`. Without `broker`, one is made from ACTMAP_BROKER_URL."""
    if broker is None:
        from api.broker import RedisBroker
        from workers.execution.celery_app import make_celery

        if settings.broker_url is None:
            raise UserError("the API needs ACTMAP_BROKER_URL: it sends tasks to the workers")
        broker = RedisBroker(settings.broker_url.get_secret_value(), make_celery(settings))
    services = Services(settings, broker, Tenants.from_file(settings.auth_file))
    app = FastAPI(title="actmap", version="0.1.0", description=__doc__)
    app.state.services = services
    _handlers(app)
    max_body = settings.max_body_bytes or services.tenants.largest_upload() + (1 << 20)
    app.add_middleware(Gate, tenants=services.tenants, max_body=max_body)
    redact_access_log()

    @app.middleware("http")
    async def timed(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        name = getattr(route, "path", "unmatched")
        services.latency.labels(name).observe(time.perf_counter() - start)
        return response

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        checks = {"redis": services.broker.ping(), "store": _writable(services.store)}
        ok = all(checks.values())
        return JSONResponse({"ready": ok, **checks}, status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=settings.metrics_access != "off")
    def metrics(request: Request) -> Response:
        _metrics_allowed(settings, request.headers.get("authorization"))
        _refresh_metrics(services)
        return Response(generate_latest(services.metrics), media_type=CONTENT_TYPE_LATEST)

    from api.routes import router

    strict = [Depends(_known_query)]
    app.include_router(router, dependencies=strict)
    from api import pictures  # after routes: these share their tenant checks

    app.include_router(pictures.router, dependencies=strict)
    from api import analyses

    app.include_router(analyses.router, dependencies=strict)
    _document_problems(app)
    return app


def _document_problems(app: FastAPI) -> None:
    """FastAPI documents its own 422 shape; ours is `Problem`, so say that in the schema."""
    from fastapi.openapi.utils import get_openapi

    from api.schemas import Problem

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {})
            schema["components"]["schemas"]["HTTPValidationError"] = problem
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


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
