"""`/v1/models`: register a model (its catalogue is computed on a worker), list, get."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile
from starlette.concurrency import run_in_threadpool

from api.auth import inside_roots
from api.deps import ServicesDep, TenantDep, safe_name
from api.problems import PROBLEMS
from api.quotas import UploadQuota
from api.schemas import ModelOut
from workers.errors import SpecError
from workers.extraction.inputs import OutsideRoots, fd_path, opened
from workers.jobs import TaskName
from workers.storage.registry import ModelRecord, Registry

__all__ = ["router"]

router = APIRouter(prefix="/v1", responses=PROBLEMS)


def _model_out(record: ModelRecord) -> ModelOut:
    return ModelOut(
        id=record.id, name=record.name, state=record.state, error=record.error,
        created=record.created, catalogue=record.catalogue,
    )  # fmt: skip


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
            await quota.save(upload, target)
        else:  # a copy: a later swap of the tenant's file changes nothing registered
            roots = None if services.tenants.open else tenant.roots
            target = folder / (safe_name(str(path)) or "model")
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
