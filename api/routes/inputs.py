"""`/v1/inputs`: upload samples for clients without a shared filesystem."""

from __future__ import annotations

import os
import secrets
import shutil
from typing import Annotated

from fastapi import APIRouter, File, UploadFile
from starlette.concurrency import run_in_threadpool

from api.deps import ServicesDep, TenantDep, safe_name, uploads_of
from api.problems import PROBLEMS
from api.quotas import UploadQuota
from api.schemas import InputSet
from workers.errors import SpecError

__all__ = ["router"]

router = APIRouter(prefix="/v1", responses=PROBLEMS)
_MAX_NAME = 200  # an uploaded file's name, well inside the filesystem's 255 bytes
_MAX_DEPTH = 16  # folders in an uploaded file's path


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
    safe = [safe_name(p) or "file" for p in parts]
    if len(parts) > _MAX_DEPTH or any(len(p) > _MAX_NAME for p in safe):
        raise SpecError(
            f"file name {given[:40]}... has a part over {_MAX_NAME} characters or over "
            f"{_MAX_DEPTH} folders; shorten it"
        )
    return "/".join(safe)


@router.post("/inputs", status_code=201, response_model=InputSet)
async def upload_inputs(
    services: ServicesDep, tenant: TenantDep, files: Annotated[list[UploadFile], File()]
) -> InputSet:
    """Upload samples for clients without a shared filesystem; returns an input-set id."""
    set_id = f"in-{secrets.token_hex(6)}"
    # Filled under a hidden name and renamed whole: a set that failed part-way is never
    # one a job can name.
    folder = uploads_of(services, tenant) / f".{set_id}.part"
    quota = UploadQuota(services, tenant)
    await run_in_threadpool(quota.sweep)
    folder.mkdir(parents=True)
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
            total += await quota.save(upload, target)
        folder.rename(folder.with_name(set_id))
    except BaseException:  # refused or cut off: the whole set goes, nothing counts
        shutil.rmtree(folder, ignore_errors=True)
        quota.refund()
        raise
    return InputSet(input_set=set_id, files=len(files), bytes=total)
