"""`POST /v1/analyses/{id}/screen`: one sample screened now with a fitted profile. The
sample's bytes are the request body; a `screen` worker that keeps the profile and its model
loaded answers, and the answer is the response. No job is planned and nothing is stored: a
screening job (`POST /v1/jobs/screenings`) is the way to screen many samples and keep the
answers."""

from __future__ import annotations

import base64
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from api.deps import ServicesDep, TenantDep, analysis_of
from api.problems import PROBLEMS
from api.quotas import InFlight, TooLarge
from api.schemas import ScreenAnswer
from workers.errors import REFUSALS, SpecError, UserError
from workers.jobs import AnalysisKind, AnalysisState, TaskName

__all__ = ["router"]

router = APIRouter(prefix="/v1", responses=PROBLEMS)
# A file name: its suffix picks the decoder, as a scanned file's does; never a path.
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_OCTETS, _BYTES = "application/octet-stream", {"type": "string", "format": "binary"}


async def _body(request: Request, limit: int) -> bytes:
    """The body, read as it streams and refused past `limit` bytes."""
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"a sample over {limit} bytes is over your limit (quotas.upload_bytes)")
        parts.append(chunk)
    return b"".join(parts)


@router.post(
    "/analyses/{analysis_id}/screen",
    response_model=ScreenAnswer,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
)
async def screen_sample(
    request: Request,
    response: Response,
    services: ServicesDep,
    tenant: TenantDep,
    analysis_id: str,
    name: Annotated[str, Query(pattern=_NAME, description="the sample's file name")] = "sample",
) -> ScreenAnswer:
    """Screen the body (an image, a `.npy` array or a binary, by the suffix of `name`) with
    the profile. `Server-Timing` says how long the worker took and how long the rest of the
    wait was. 422 with the reason when the sample cannot be read, 429 past the tenant's
    `screenings_at_once`, 503 when no `screen` worker answers within
    ACTMAP_SCREEN_TIMEOUT_S."""
    profile = await run_in_threadpool(analysis_of, services, tenant, analysis_id)
    fitted = profile.kind == AnalysisKind.SCREENING_PROFILE
    if not fitted or profile.state != AnalysisState.SUCCEEDED:
        raise SpecError(f"{analysis_id} is not a fitted screening profile ({profile.state})")
    data = await _body(request, tenant.quotas.upload_bytes)
    if not data:
        raise SpecError("the request body is empty: send the sample's bytes")
    screenings: InFlight = request.app.state.screenings
    args = [services.store, tenant.name, analysis_id, name, base64.b64encode(data).decode()]
    with screenings.slot(tenant):
        sent = time.perf_counter()
        found: dict[str, Any] = await run_in_threadpool(
            services.broker.call, TaskName.SCREEN_SAMPLE, args, "screen",
            services.settings.screen_timeout_s,
        )  # fmt: skip
        waited = time.perf_counter() - sent
    if "refused" in found:
        raise REFUSALS.get(found["refused"], UserError)(found["error"])
    worker = float(found.pop("worker_s", 0.0))
    # Where the time went, for whoever watches latency: the worker's own work, and the
    # rest of the wait (the queue, the broker's round trips, the handover to the worker).
    response.headers["Server-Timing"] = (
        f"worker;dur={worker * 1e3:.1f}, broker;dur={max(waited - worker, 0.0) * 1e3:.1f}"
    )
    return ScreenAnswer.model_validate(found)
