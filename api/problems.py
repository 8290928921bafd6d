"""Errors -> HTTP problem responses: every error a route raises on purpose answers one status
with `{"detail": one line}` (the `Problem` schema), never a traceback; `PROBLEMS` is the
table the routers document them with."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.auth import Unauthorized
from api.quotas import TooLarge, TooMany
from api.schemas import Problem
from workers.errors import Conflict, NotFound, TransientError, UserError
from workers.lifecycle.submit import Busy, Unavailable

__all__ = ["PROBLEMS", "STATUS", "install"]

# The most specific class of an error decides: NotFound is a UserError, and answers 404.
STATUS: dict[type[Exception], int] = {
    Unauthorized: 401,
    NotFound: 404,
    Conflict: 409,
    TooLarge: 413,
    TooMany: 429,
    Unavailable: 503,  # the broker is down: nothing was acknowledged, retry later
    Busy: 503,  # the same idempotency key is being submitted by another request
    TransientError: 503,  # a worker lost its store or Redis for a moment: retry
    UserError: 422,
}

PROBLEMS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "description": text}
    for code, text in (
        (400, "a body that cannot be parsed"),
        (401, "no or unknown bearer token"),
        (404, "no such id for this tenant"),
        (409, "the model or job is not in a state for this"),
        (413, "over a size quota"),
        (422, "an invalid request, said in one line"),
        (429, "over the queued-jobs quota, or too many screenings at once"),
        (503, "no worker answered, or the broker is away: nothing was done, retry"),
    )
}


def _status(exc: Exception) -> int:
    return next(STATUS[c] for c in type(exc).__mro__ if c in STATUS)


async def _problem(_r: Request, exc: Exception) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
    return JSONResponse({"detail": str(exc)}, status_code=_status(exc), headers=headers)


def _one_line(exc: RequestValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "request"
    return f"invalid {where}: {first.get('msg', 'bad value')}"


async def _invalid(_r: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
    return JSONResponse({"detail": _one_line(exc), "errors": errors}, status_code=422)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code != 405:
        return await http_exception_handler(request, exc)
    # Starlette names the methods of the first route matching the path only.
    allowed = sorted(
        {
            m
            for r in request.app.routes
            if isinstance(r, APIRoute) and r.path_regex.match(request.url.path)
            for m in r.methods or ()
        }
    )
    return JSONResponse(
        {"detail": f"method not allowed here; use {', '.join(allowed)}"},
        status_code=405,
        headers={"Allow": ", ".join(allowed)},
    )


def install(app: FastAPI) -> None:
    """Answer each error class with its status, and say so in the OpenAPI schema."""
    for error in STATUS:
        app.add_exception_handler(error, _problem)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    _document(app)


def _document(app: FastAPI) -> None:
    """FastAPI documents its own 422 shape; ours is `Problem`, so say that in the schema."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {})
            schema["components"]["schemas"]["HTTPValidationError"] = problem
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
