"""The `/v1` routes: models, inputs, jobs and results, each scoped to the caller's tenant
(another tenant's id answers 404, the same as an id that does not exist)."""

from __future__ import annotations

import io
import logging
import re
import secrets
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import zarr
from fastapi import APIRouter, Depends, File, Form, Header, Query, Request, UploadFile
from fastapi.responses import Response

from api.app import Limit, Services, tenant_of
from api.auth import Tenant, inside_roots
from api.schemas import (
    Accepted,
    ExtractionRequest,
    InputSet,
    JobOut,
    ModelOut,
    Problem,
    SampleErrors,
    SamplesPage,
    StoreLocation,
)
from workers.control import (
    Status,
    list_jobs,
    queue_of,
    resume_batches,
    status,
    task_groups,
)
from workers.control import cancel as cancel_job
from workers.errors import JobError, SampleCode, SpecError
from workers.extraction.inputs import Source, discover
from workers.jobs import ExtractionSpec, JobState, TaskName, close_matches
from workers.storage.layout import array, attrs, job_ids, open_job, read
from workers.storage.registry import ModelRecord, Registry
from workers.submit import Busy, Unavailable, submit

__all__ = ["router"]

_PROBLEMS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "description": text}
    for code, text in (
        (401, "no or unknown bearer token"),
        (404, "no such id for this tenant"),
        (409, "the model or job is not in a state for this"),
        (413, "over a size quota"),
        (422, "an invalid request, said in one line"),
        (429, "over the queued-jobs quota"),
    )
}
router = APIRouter(prefix="/v1", responses=_PROBLEMS)
log = logging.getLogger("actmap.api")
TenantDep = Annotated[Tenant, Depends(tenant_of)]
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_ROWS = 1000


def _services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


ServicesDep = Annotated[Services, Depends(_services)]


def _model_out(record: ModelRecord) -> ModelOut:
    return ModelOut(
        id=record.id, name=record.name, state=record.state, error=record.error,
        created=record.created, catalogue=record.catalogue,
    )  # fmt: skip


async def _save(upload: UploadFile, target: Path, budget: int, limit: int) -> int:
    """Stream an upload to disk, refusing it (413) past the tenant's byte limit. It is
    written under a hidden temporary name and renamed once whole, so a failure part-way
    leaves no file under `target`'s name (a temporary one only after a crash)."""
    written = 0
    partial = target.with_name(f".{target.name}.part")
    try:
        with partial.open("wb") as f:
            while chunk := await upload.read(1 << 20):
                written += len(chunk)
                if written > budget:
                    raise Limit(
                        f"upload over your limit of {limit} bytes (quotas.upload_bytes)", 413
                    )
                f.write(chunk)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return written


def _uploads(services: Services, tenant: Tenant) -> Path:
    return Path(services.store.removeprefix("file://")) / "uploads" / tenant.name


def _roots(services: Services, tenant: Tenant) -> tuple[str, ...]:
    return (*tenant.roots, str(_uploads(services, tenant)))


@router.post("/models", status_code=202, response_model=ModelOut)
async def register_model(
    services: ServicesDep,
    tenant: TenantDep,
    name: Annotated[str, Form(min_length=1, max_length=200)],
    archive: Annotated[UploadFile | None, File(description="a torch.export .pt2")] = None,
    weights: Annotated[UploadFile | None, File(description="safetensors weights")] = None,
    factory: Annotated[str | None, Form(description="package.module:factory")] = None,
    path: Annotated[str | None, Form(description="a .pt2 or weights under your roots")] = None,
) -> ModelOut:
    """Register a model; its layer catalogue is computed on a worker (state `pending`)."""
    given = [x is not None for x in (archive, weights, path)]
    if sum(given) != 1:
        raise SpecError("give exactly one of: archive (.pt2), weights (with factory), path")
    allowed = services.settings.factories or ()
    if factory is not None and factory not in allowed:
        raise SpecError(f"factory {factory} is not on this server's allow-list")
    registry = Registry(services.store)
    model_id = registry.new_id()
    folder = registry.folder(tenant.name, model_id)
    limit = tenant.quotas.upload_bytes
    if archive is not None:
        ref, weight_file = str(folder / "model.pt2"), None
        await _save(archive, Path(ref), limit, limit)
    elif weights is not None:
        if factory is None:
            raise SpecError("weights need a factory (package.module:factory) from the allow-list")
        ref, weight_file = factory, str(folder / "weights.safetensors")
        await _save(weights, Path(weight_file), limit, limit)
    else:
        real = inside_roots(str(path), tenant.roots)
        if real is None:
            raise SpecError(f"{path} is not a file inside your allowed roots")
        ref, weight_file = (str(real), None) if factory is None else (factory, str(real))
    record = ModelRecord(
        id=model_id, tenant=tenant.name, name=name, ref=ref, weights=weight_file,
        created=registry.stamp(),
    )  # fmt: skip
    registry.create(record)
    services.broker.send(
        TaskName.REGISTER_MODEL, [services.store, tenant.name, model_id], "extract"
    )
    return _model_out(registry.get(tenant.name, model_id))


@router.get("/models", response_model=list[ModelOut])
def list_models(services: ServicesDep, tenant: TenantDep) -> list[ModelOut]:
    return [_model_out(r) for r in Registry(services.store).list(tenant.name)]


@router.get("/models/{model_id}", response_model=ModelOut)
def get_model(services: ServicesDep, tenant: TenantDep, model_id: str) -> ModelOut:
    return _model_out(Registry(services.store).get(tenant.name, model_id))


@router.post("/inputs", status_code=201, response_model=InputSet)
async def upload_inputs(
    services: ServicesDep, tenant: TenantDep, files: Annotated[list[UploadFile], File()]
) -> InputSet:
    """Upload samples for clients without a shared filesystem; returns an input-set id."""
    set_id = f"in-{secrets.token_hex(6)}"
    # Filled under a hidden name and renamed whole: a set that failed part-way is never
    # one a job can name.
    folder = _uploads(services, tenant) / f".{set_id}.part"
    folder.mkdir(parents=True)
    limit = tenant.quotas.upload_bytes
    total = 0
    try:
        for i, upload in enumerate(files):
            name = _SAFE_NAME.sub("_", Path(upload.filename or f"file{i}").name).lstrip(".")
            target = folder / f"{i:05d}-{name or 'file'}"
            total += await _save(upload, target, limit - total, limit)
        folder.rename(folder.with_name(set_id))
    finally:
        if folder.exists():
            shutil.rmtree(folder)
    return InputSet(input_set=set_id, files=len(files), bytes=total)


def _job(services: Services, tenant: Tenant, job_id: str) -> zarr.Group:
    """The tenant's job; someone else's answers exactly like one that does not exist."""
    missing = JobError(f"no job {job_id!r}; `GET /v1/jobs` lists yours")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", job_id):
        raise missing
    try:
        group = open_job(services.store, job_id, mode="r")
    except JobError:
        raise missing from None
    if attrs(group).get("tenant") != tenant.name:
        raise missing
    return group


def checked_sources(services: Services, tenant: Tenant, inputs: Iterable[str]) -> list[Source]:
    """The samples under `inputs`, every one resolving inside the tenant's roots."""
    sources = discover(tuple(inputs))
    roots = _roots(services, tenant)
    for source in sources:  # a symlink inside a root may point out of it
        if inside_roots(source.path, roots) is None:
            raise SpecError(f"input {source.id} resolves outside your allowed roots")
    return sources


def _active_jobs(services: Services, tenant: Tenant) -> int:
    """Jobs of this tenant not yet finished, from their attrs alone (no ledger reads)."""
    count = 0
    for job_id in job_ids(services.store):
        found = attrs(open_job(services.store, job_id, mode="r"))
        count += found.get("tenant") == tenant.name and found["state"] == JobState.QUEUED
    return count


def _sources(services: Services, tenant: Tenant, body: ExtractionRequest) -> list[str]:
    roots = _roots(services, tenant)
    inputs = list(body.inputs)
    if body.input_set is not None:
        folder = _uploads(services, tenant) / body.input_set
        if not re.fullmatch(r"in-[0-9a-f]{12}", body.input_set) or not folder.is_dir():
            raise JobError(f"no input set {body.input_set!r}; upload with POST /v1/inputs")
        inputs.append(str(folder))
    for item in inputs:
        if item.startswith("@") or inside_roots(item, roots) is None:
            raise SpecError(f"input {item} is not inside your allowed roots")
    return inputs


@router.post("/jobs/extractions", status_code=202, response_model=Accepted)
def submit_extraction(
    services: ServicesDep,
    tenant: TenantDep,
    body: ExtractionRequest,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Accepted:
    """Plan an extraction here (no worker needed) and queue its batches."""
    record = Registry(services.store).get(tenant.name, body.model_id)
    if record.state != "ready" or record.catalogue is None:
        raise Limit(f"model {record.id} is {record.state}: {record.error or 'wait for it'}", 409)
    known = record.catalogue.layer_names()
    for layer in body.layers:
        if layer not in known:
            raise SpecError(f"unknown layer {layer!r}; {close_matches(layer, known)}")
    inputs = _sources(services, tenant, body)
    spec = ExtractionSpec(
        model=record.ref, weights=record.weights, model_id=record.id, layers=tuple(body.layers),
        inputs=tuple(inputs), batch_size=body.batch_size, dtype=body.dtype,
        channels=tuple(body.channels) if body.channels else None, top_k=body.top_k,
        max_size=body.max_size, labels_from_dirs=body.labels_from_dirs, tenant=tenant.name,
        queue=body.queue,
    )  # fmt: skip
    sources = checked_sources(services, tenant, spec.inputs)
    limit = tenant.quotas.samples_per_job
    if len(sources) > limit:
        raise Limit(
            f"{len(sources)} samples is over your limit of {limit} (quotas.samples_per_job)", 413
        )
    key = f"actmap:idem:{tenant.name}:{idempotency_key}" if idempotency_key else None

    def admit() -> None:
        """Quota checks of a new job, run before its plan; a retry of a job already
        acknowledged (or half-done) is not a new job and skips them."""
        if _active_jobs(services, tenant) >= tenant.quotas.queued_jobs:
            raise Limit(
                f"you have {tenant.quotas.queued_jobs} jobs queued or running, your limit "
                "(quotas.queued_jobs); wait for one to finish",
                429,
            )

    def send(job_id: str, batches: list[int], queue: str) -> None:
        _send_batches(services, job_id, batches, queue)

    try:
        job = submit(
            services.store, spec, record.catalogue, send,
            sources=sources, keys=services.broker, key=key, admit=admit,
        )  # fmt: skip
    except (Unavailable, Busy) as exc:
        raise Limit(str(exc), 503) from None
    current = status(services.store, job.job_id)
    log.info(
        "extraction queued: %d samples in %d batches on %s", job.n_samples, job.n_batches,
        body.queue, extra={"job_id": job.job_id, "tenant": tenant.name},
    )  # fmt: skip
    return Accepted(
        job_id=job.job_id, state=current.state, n_samples=job.n_samples, queue=body.queue
    )


def _send_batches(services: Services, job_id: str, batches: Iterable[int], queue: str) -> None:
    cap = services.settings.batches_per_task
    for group in task_groups(batches, services.broker.workers(queue), cap):
        services.broker.send(TaskName.RUN_BATCH, [services.store, job_id, group], queue)


def _job_out(services: Services, group: zarr.Group, s: Status) -> JobOut:
    a = attrs(group)
    codes, messages, samples = (
        read(group, "error_code"),
        read(group, "error_message"),
        read(group, "sample"),
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
    services: ServicesDep, tenant: TenantDep, state: Annotated[JobState | None, Query()] = None
) -> list[JobOut]:
    found = [
        s
        for s in list_jobs(services.store, state.value if state else None)
        if s.tenant == tenant.name
    ]
    return [_job_out(services, open_job(services.store, s.job_id, mode="r"), s) for s in found]


@router.get("/jobs/{job_id}", response_model=JobOut)
def get_job(services: ServicesDep, tenant: TenantDep, job_id: str) -> JobOut:
    group = _job(services, tenant, job_id)
    return _job_out(services, group, status(services.store, job_id, services.broker.counters()))


@router.post("/jobs/{job_id}/cancel", response_model=JobOut)
def cancel(services: ServicesDep, tenant: TenantDep, job_id: str) -> JobOut:
    _job(services, tenant, job_id)
    if JobState(status(services.store, job_id).state).finished:
        raise Limit(f"job {job_id} has already finished; nothing to cancel", 409)
    current = cancel_job(services.store, job_id)
    log.info("job cancelled", extra={"job_id": job_id, "tenant": tenant.name})
    return _job_out(services, open_job(services.store, job_id, mode="r"), current)


@router.post("/jobs/{job_id}/resume", response_model=JobOut)
def resume(services: ServicesDep, tenant: TenantDep, job_id: str) -> JobOut:
    _job(services, tenant, job_id)
    missing = resume_batches(services.store, job_id, services.broker.counters())
    _send_batches(services, job_id, missing, queue_of(services.store, job_id))
    log.info("resumed %d batches", len(missing), extra={"job_id": job_id, "tenant": tenant.name})
    group = open_job(services.store, job_id, mode="r")
    return _job_out(services, group, status(services.store, job_id))


@router.get("/jobs/{job_id}/samples", response_model=SamplesPage)
def samples(
    services: ServicesDep,
    tenant: TenantDep,
    job_id: str,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=_MAX_ROWS)] = 100,
) -> SamplesPage:
    ids = array(_job(services, tenant, job_id), "sample")
    page = np.asarray(ids[offset : offset + limit]) if offset < ids.shape[0] else np.array([])
    return SamplesPage(samples=[str(s) for s in page], offset=offset, total=int(ids.shape[0]))


def _rows(group: zarr.Group, wanted: str | None, offset: int, limit: int) -> np.ndarray:
    """Row indices for `samples=id,id,...`, else the page [offset, offset+limit)."""
    n = array(group, "sample").shape[0]
    if not wanted:
        return np.arange(min(offset, n), min(offset + limit, n))
    ids = [w for w in wanted.split(",") if w]
    if len(ids) > _MAX_ROWS:
        raise SpecError(f"at most {_MAX_ROWS} samples per request")
    index = {str(s): i for i, s in enumerate(read(group, "sample"))}
    unknown = [w for w in ids if w not in index]
    if unknown:
        raise JobError(f"no sample {unknown[0]!r} in this job; see /samples")
    return np.asarray([index[w] for w in ids], dtype=np.int64)


def _npy(values: np.ndarray) -> Response:
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return Response(buffer.getvalue(), media_type="application/octet-stream")


_NPY: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}, "description": "a .npy array"}
}
Rows = Annotated[str | None, Query(max_length=100_000, description="comma-separated sample ids")]
Offset = Annotated[int, Query(ge=0)]
Limit_ = Annotated[int, Query(ge=1, le=_MAX_ROWS)]


def _layer(group: zarr.Group, layer: str) -> zarr.Group:
    layers = group.get("layers")
    names = [n for n, _ in layers.groups()] if isinstance(layers, zarr.Group) else []
    if layer not in names or not isinstance(layers, zarr.Group):
        raise JobError(f"this job has no layer {layer!r}; {close_matches(layer, names)}")
    found = layers[layer]
    assert isinstance(found, zarr.Group)
    return found


@router.get("/jobs/{job_id}/layers/{layer}/activations", responses=_NPY, response_class=Response)
def activations(
    services: ServicesDep,
    tenant: TenantDep,
    job_id: str,
    layer: str,
    samples: Rows = None,
    channels: Annotated[str | None, Query(max_length=20_000, pattern=r"^[0-9,]*$")] = None,
    offset: Offset = 0,
    limit: Limit_ = 16,
) -> Response:
    """`acts` of the chosen samples (and channels), as `.npy` bytes."""
    group = _job(services, tenant, job_id)
    acts = array(_layer(group, layer), "acts")
    rows = _rows(group, samples, offset, limit)
    chosen = [int(c) for c in channels.split(",") if c] if channels else None
    if chosen and max(chosen) >= acts.shape[1]:
        raise SpecError(f"channel {max(chosen)} asked of a layer with {acts.shape[1]} stored")
    if rows.size == 0:
        return _npy(np.zeros((0, *acts.shape[1:]), dtype=acts.dtype))
    selection: tuple[Any, ...] = (rows, chosen if chosen else slice(None))
    return _npy(np.asarray(acts.get_orthogonal_selection(selection)))


@router.get("/jobs/{job_id}/layers/{layer}/pooled", responses=_NPY, response_class=Response)
def pooled(
    services: ServicesDep, tenant: TenantDep, job_id: str, layer: str,
    samples: Rows = None, offset: Offset = 0, limit: Limit_ = _MAX_ROWS,
) -> Response:  # fmt: skip
    group = _job(services, tenant, job_id)
    values = array(_layer(group, layer), "pooled")
    return _npy(
        np.asarray(values.get_orthogonal_selection((_rows(group, samples, offset, limit),)))
    )


def _table(
    services: Services, tenant: Tenant, job_id: str, name: str, rows: tuple[str | None, int, int]
) -> Response:
    group = _job(services, tenant, job_id)
    index = _rows(group, *rows)
    return _npy(np.asarray(array(group, name).get_orthogonal_selection((index,))))


@router.get("/jobs/{job_id}/logits", responses=_NPY, response_class=Response)
def logits(
    services: ServicesDep, tenant: TenantDep, job_id: str,
    samples: Rows = None, offset: Offset = 0, limit: Limit_ = _MAX_ROWS,
) -> Response:  # fmt: skip
    return _table(services, tenant, job_id, "logits", (samples, offset, limit))


@router.get("/jobs/{job_id}/predictions", responses=_NPY, response_class=Response)
def predictions(
    services: ServicesDep, tenant: TenantDep, job_id: str,
    samples: Rows = None, offset: Offset = 0, limit: Limit_ = _MAX_ROWS,
) -> Response:  # fmt: skip
    return _table(services, tenant, job_id, "pred", (samples, offset, limit))


@router.get("/jobs/{job_id}/store", response_model=StoreLocation)
def store_location(services: ServicesDep, tenant: TenantDep, job_id: str) -> StoreLocation:
    """Where to open the job directly: `xarray.open_datatree(store, group=group, engine="zarr")`."""
    _job(services, tenant, job_id)
    return StoreLocation(store=services.store, group=f"jobs/{job_id}")
