"""`/v1/inputs`: upload samples for clients without a shared filesystem."""

from __future__ import annotations

import secrets
import shutil
from typing import Annotated

from fastapi import APIRouter, File, UploadFile

from api.deps import ServicesDep, TenantDep, safe_name, uploads_of
from api.problems import PROBLEMS
from api.quotas import UploadQuota
from api.schemas import InputSet
from workers.errors import SpecError

__all__ = ["router"]

router = APIRouter(prefix="/v1", responses=PROBLEMS)
_MAX_NAME = 200  # an uploaded file's name, well inside the filesystem's 255 bytes


@router.post("/inputs", status_code=201, response_model=InputSet)
async def upload_inputs(
    services: ServicesDep, tenant: TenantDep, files: Annotated[list[UploadFile], File()]
) -> InputSet:
    """Upload samples for clients without a shared filesystem; returns an input-set id."""
    set_id = f"in-{secrets.token_hex(6)}"
    # Filled under a hidden name and renamed whole: a set that failed part-way is never
    # one a job can name.
    folder = uploads_of(services, tenant) / f".{set_id}.part"
    folder.mkdir(parents=True)
    quota = UploadQuota(services, tenant)
    total = 0
    try:
        for i, upload in enumerate(files):
            name = safe_name(upload.filename or f"file{i}")
            if len(name) > _MAX_NAME:
                raise SpecError(
                    f"file name {name[:40]}... is over {_MAX_NAME} characters; shorten it"
                )
            target = folder / f"{i:05d}-{name or 'file'}"
            total += await quota.save(upload, target)
        folder.rename(folder.with_name(set_id))
    except BaseException:  # refused or cut off: the whole set goes, nothing counts
        shutil.rmtree(folder, ignore_errors=True)
        quota.refund()
        raise
    return InputSet(input_set=set_id, files=len(files), bytes=total)
