"""The `/v1` routes: models, inputs, jobs and results, each scoped to the caller's tenant
(another tenant's id answers 404, the same as an id that does not exist)."""

from __future__ import annotations

import io
import logging
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import zarr
from fastapi import APIRouter, Depends, File, Form, Header, Query, Request, UploadFile
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from api.app import Limit, Services, tenant_of
from api.auth import Tenant, inside_roots
from api.quotas import UploadQuota, job_slot
from api.quotas import samples as samples_quota
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
from workers.errors import JobError, SampleCode, SpecError
from workers.extraction.inputs import OutsideRoots, Source, discover, fd_path, opened
from workers.jobs import ExtractionSpec, JobState, TaskName, close_matches
from workers.lifecycle.state import (
    Status,
    job_page,
    queue_of,
    resume_batches,
    status,
    task_groups,
)
from workers.lifecycle.state import cancel as cancel_job
from workers.lifecycle.submit import Busy, Unavailable, submit
from workers.storage.layout import array, attrs, open_job, read
from workers.storage.registry import ModelRecord, Registry

__all__ = ["router"]

_PROBLEMS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "description": text}
    for code, text in (
        (400, "a body that cannot be parsed"),
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
_MAX_NAME = 200  # an uploaded file's name, well inside the filesystem's 255 bytes
_MAX_DEPTH = 16  # folders in an uploaded file's path


def _services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


ServicesDep = Annotated[Services, Depends(_services)]


def _model_out(record: ModelRecord) -> ModelOut:
    return ModelOut(
        id=record.id, name=record.name, state=record.state, error=record.error,
        created=record.created, catalogue=record.catalogue,
    )  # fmt: skip


async def _save(upload: UploadFile, target: Path, quota: UploadQuota) -> int:
    """Stream an upload to disk, each chunk charged to the tenant's upload quota first. It
    is written under a hidden temporary name and renamed once whole, so a failure part-way
    leaves no file under `target`'s name (a temporary one only after a crash)."""
    written = 0
    partial = target.with_name(f".{target.name}.part")
    try:
        with partial.open("wb") as f:
            while chunk := await upload.read(1 << 20):
                await quota.charge(len(chunk))
                written += len(chunk)
                f.write(chunk)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return written


def _upload_path(given: str) -> str:
    """An uploaded file's relative path (`3/a.png`: folder labels need the folder), each
    part made safe; a path that is absolute or climbs is refused. The client's name is
    hostile: parts are sanitised, never resolved, and the folders are made here."""
    parts = given.replace("\\", "/").split("/")
    if given.startswith(("/", "\\")) or any(p in ("", ".", "..") for p in parts):
        raise SpecError(
            f"file name {given[:60]!r} is not a relative path without '.', '..' or empty "
            "parts; upload files named by their path below one folder, like 3/a.png"
        )
    safe = [_SAFE_NAME.sub("_", p).lstrip(".") or "file" for p in parts]
    if len(parts) > _MAX_DEPTH or any(len(p) > _MAX_NAME for p in safe):
        raise SpecError(
            f"file name {given[:40]}... has a part over {_MAX_NAME} characters or over "
            f"{_MAX_DEPTH} folders; shorten it"
        )
    return "/".join(safe)


def _uploads(services: Services, tenant: Tenant) -> Path:
    return Path(services.store.removeprefix("file://")) / "uploads" / tenant.name


def _roots(services: Services, tenant: Tenant) -> tuple[str, ...] | None:
    """Where the tenant's inputs are opened beneath (its jobs carry them to the worker);
    None for the open server's single local user, whose paths are trusted as the CLI's."""
    if services.tenants.open:
        return None
    # Absolute: a worker started in another folder opens beneath the same ones.
    return tuple(os.path.abspath(r) for r in (*tenant.roots, str(_uploads(services, tenant))))


def _copy_beneath(path: str, roots: tuple[str, ...] | None, target: Path, beside: bool) -> None:
    """Copy the file at `path`, opened beneath `roots`, to `target` (and its
    `.preprocessing.json` when `beside`), so that the model is never read from the
    tenant's path again."""
    try:
        with opened(path, roots) as fd:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO would block the copy
                raise OutsideRoots("is not a regular file")
            with open(fd_path(fd), "rb") as src, target.open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    except (OutsideRoots, OSError, ValueError):
        target.unlink(missing_ok=True)
        raise SpecError(
            f"{path} is not a file inside your allowed roots (links are not followed)"
        ) from None
    declared = str(Path(path).with_suffix(".preprocessing.json"))
    if beside and inside_roots(declared, roots):
        _copy_beneath(declared, roots, target.with_suffix(".preprocessing.json"), False)


@router.post("/models", status_code=202, response_model=ModelOut)
async def register_model(
    services: ServicesDep,
    tenant: TenantDep,
    name: Annotated[str, Form(min_length=1, max_length=200)],
    archive: Annotated[UploadFile | None, File(description="a torch.export .pt2")] = None,
    weights: Annotated[UploadFile | None, File(description="safetensors weights")] = None,
    factory: Annotated[str | None, Form(description="package.module:factory")] = None,
    path: Annotated[
        str | None, Form(description="a .pt2 or weights under your roots", pattern=r"^[^\x00]+$")
    ] = None,
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
    if weights is not None and factory is None:
        raise SpecError("weights need a factory (package.module:factory) from the allow-list")
    folder = registry.folder(tenant.name, model_id)
    quota = UploadQuota(services, tenant)
    try:
        upload = archive or weights
        if upload is not None:
            target = folder / ("model.pt2" if archive is not None else "weights.safetensors")
            await _save(upload, target, quota)
        else:  # a copy: a later swap of the tenant's file changes nothing registered
            roots = None if services.tenants.open else tenant.roots
            target = folder / (_SAFE_NAME.sub("_", Path(str(path)).name).lstrip(".") or "model")
            await run_in_threadpool(_copy_beneath, str(path), roots, target, factory is None)
    except BaseException:  # refused or cut off: nothing of it stays, nothing counts
        shutil.rmtree(folder, ignore_errors=True)
        quota.refund()
        raise
    if factory is not None and archive is None:  # weights for an allow-listed factory
        ref, weight_file = factory, str(target)
    else:
        ref, weight_file = str(target), None
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
    quota = UploadQuota(services, tenant)
    total = 0
    try:
        for i, upload in enumerate(files):
            relative = _upload_path(upload.filename or f"file{i}")
            target = folder / relative
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise SpecError(f"file {relative} lies below a file of the same upload") from None
            # Only this request writes in the new folder; a link there would be someone's.
            if os.path.lexists(target) or not target.parent.resolve().is_relative_to(
                folder.resolve()
            ):
                raise SpecError(f"file {relative} is uploaded twice")
            total += await _save(upload, target, quota)
        folder.rename(folder.with_name(set_id))
    except BaseException:  # refused or cut off: the whole set goes, nothing counts
        shutil.rmtree(folder, ignore_errors=True)
        quota.refund()
        raise
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
    """The samples under `inputs`, every one opening beneath the tenant's roots as the
    worker will open it (which checks again: this is for a clear answer now)."""
    roots = _roots(services, tenant)
    sources = discover(tuple(inputs), roots)
    for source in sources:
        if not inside_roots(source.path, roots):
            raise SpecError(
                f"input {source.id} resolves outside your allowed roots or through a "
                "symbolic link (links are not followed)"
            )
    return sources


def _sources(services: Services, tenant: Tenant, body: ExtractionRequest) -> list[str]:
    roots = _roots(services, tenant)
    inputs = list(body.inputs)
    if body.input_set is not None:
        folder = _uploads(services, tenant) / body.input_set
        if not re.fullmatch(r"in-[0-9a-f]{12}", body.input_set) or not folder.is_dir():
            raise JobError(f"no input set {body.input_set!r}; upload with POST /v1/inputs")
        inputs.append(str(folder))
    for item in inputs:
        if item.startswith("@") or not inside_roots(item, roots):
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
    registry = Registry(services.store)
    record = registry.get(tenant.name, body.model_id)
    if record.state != "ready" or record.catalogue is None:
        raise Limit(f"model {record.id} is {record.state}: {record.error or 'wait for it'}", 409)
    if not services.tenants.open and not registry.keeps_files_of(record):
        raise Limit(
            f"model {record.id} was registered by path before models were copied into the "
            "registry, so its file could still be swapped; register it again",
            409,
        )
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
        queue=body.queue, roots=_roots(services, tenant),
    )  # fmt: skip
    sources = checked_sources(services, tenant, spec.inputs)
    samples_quota(tenant, len(sources))
    key = f"actmap:idem:{tenant.name}:{idempotency_key}" if idempotency_key else None

    def admit() -> AbstractContextManager[None]:
        """A new job's quota, checked and held while it is planned; a retry of a job
        already acknowledged (or half-done) is not a new job and skips it."""
        return job_slot(services, tenant)

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
    """Where to open the job directly: `xarray.open_datatree(f"{store}/{group}", engine="zarr")`."""
    _job(services, tenant, job_id)
    return StoreLocation(store=services.store, group=f"jobs/{job_id}")
