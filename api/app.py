"""`create_app(settings)`: the thin HTTP API. It reads results straight from the store and
sends tasks to Celery by name; it never imports torch."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import Depends, FastAPI, Request, Response
from fastapi_offline import FastAPIOffline

from api import problems
from api.auth import Tenants
from api.broker import Broker
from api.deps import Services, known_query
from api.gate import Gate
from api.logs import redact_access_log
from api.quotas import InFlight
from api.routes import analyses, health, inputs, jobs, models, pictures, results, screen
from workers.jobs import VERSION
from workers.settings import Settings

__all__ = ["create_app"]


def create_app(settings: Settings, broker: Broker) -> FastAPI:
    """The app for `settings`, sending its tasks through `broker` (`actmap serve` makes a
    RedisBroker from ACTMAP_BROKER_URL; the API's unit tests an in-memory one)."""
    services = Services(settings, broker, Tenants.from_file(settings.auth_file))
    # /docs and /redoc load Swagger UI and ReDoc from files the package ships, served here:
    # they work on a host with no way out. Swagger UI would also send the schema to an
    # online validator for its badge; it is off.
    app = FastAPIOffline(
        title="actmap",
        version=VERSION,
        description=__doc__,
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.state.services = services
    app.state.screenings = InFlight()  # per process, like the threads that wait on them
    problems.install(app)
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

    app.include_router(health.router)
    app.include_router(health.metrics, include_in_schema=settings.metrics_access != "off")
    strict = [Depends(known_query)]
    for resource in (models, inputs, jobs, results, pictures, analyses, screen):
        app.include_router(resource.router, dependencies=strict)
    return app
