"""Tenant quotas that hold under concurrency and across API processes.

Queued jobs are counted from the job index under a per-tenant lock in the broker, held while the
job is planned, so two submissions never both see the last free slot. Upload bytes are a
per-tenant tally in the broker, first counted from what the tenant holds (its input sets
and its registered model files) and then charged chunk by chunk as uploads stream in, so
concurrent uploads share one budget; a refused or failed upload gives its bytes back.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastapi import UploadFile
from starlette.concurrency import run_in_threadpool

from api.auth import Tenant
from api.broker import Busy
from api.deps import Services, uploads_of
from workers.errors import UserError
from workers.jobs import JobState
from workers.storage.index import count
from workers.storage.objects import location
from workers.storage.registry import REGISTRY

__all__ = ["InFlight", "TooLarge", "TooMany", "UploadQuota", "job_slot", "samples"]

_ACTIVE = (JobState.QUEUED.value, JobState.RUNNING.value)


class TooLarge(UserError):
    """Raised when a job or an upload is over a size quota of the tenant (HTTP 413)."""


class TooMany(UserError):
    """Raised when the tenant has its quota of jobs queued, or too many submissions at
    once (HTTP 429): waiting, not changing the request, lets it through."""


def _active_jobs(services: Services, tenant: Tenant) -> int:
    """Jobs of this tenant not yet finished, from the job index's names alone."""
    return count(services.store, tenant.name, list(_ACTIVE))


@contextmanager
def job_slot(services: Services, tenant: Tenant) -> Iterator[None]:
    """Hold this while the job is planned: raises TooMany when the tenant has its
    `queued_jobs` unfinished already."""
    limit = tenant.quotas.queued_jobs
    try:
        with services.broker.lock(
            f"actmap:quota:jobs:{tenant.name}", services.settings.quota_lock_s
        ):
            if _active_jobs(services, tenant) >= limit:
                raise TooMany(
                    f"you have {limit} jobs queued or running, your limit "
                    "(quotas.queued_jobs); wait for one to finish"
                )
            yield
    except Busy:
        raise TooMany("too many of your submissions at once; retry in a few seconds") from None


class InFlight:
    """Requests of each tenant in progress in this process, each tenant under its quota
    `screenings_at_once`: one tenant's burst waits on its own 429s, not on the shared
    `screen` queue ahead of everyone else's samples."""

    def __init__(self) -> None:
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    @contextmanager
    def slot(self, tenant: Tenant) -> Iterator[None]:
        limit = tenant.quotas.screenings_at_once
        with self._lock:
            if self._held.get(tenant.name, 0) >= limit:
                raise TooMany(
                    f"you have {limit} screenings waiting for an answer, your limit "
                    "(quotas.screenings_at_once); wait for one, or submit a screening job"
                )
            self._held[tenant.name] = self._held.get(tenant.name, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._held[tenant.name] -= 1


def samples(tenant: Tenant, n: int) -> None:
    """Raises TooLarge when a job of `n` samples is over the tenant's `samples_per_job`."""
    limit = tenant.quotas.samples_per_job
    if n > limit:
        raise TooLarge(f"{n} samples is over your limit of {limit} (quotas.samples_per_job)")


def _bytes_under(*folders: Path) -> int:
    return sum(f.stat().st_size for d in folders if d.is_dir() for f in d.rglob("*") if f.is_file())


# An upload set untouched this long was left by a server that died while writing it.
STALE_UPLOAD_S = 3600


class UploadQuota:
    """One request's share of the tenant's `upload_bytes`: `charge` before each chunk is
    written, `refund` what this request charged when its files are removed."""

    def __init__(self, services: Services, tenant: Tenant) -> None:
        root = Path(location(services.store))
        self._held = (uploads_of(services, tenant), root / REGISTRY / tenant.name)
        self._broker = services.broker
        self._key = f"actmap:quota:upload:{tenant.name}"
        self.limit = tenant.quotas.upload_bytes
        self.charged = 0

    def _add(self, amount: int) -> bool:
        return self._broker.add(self._key, amount, self.limit, lambda: _bytes_under(*self._held))

    async def charge(self, amount: int) -> None:
        if not await run_in_threadpool(self._add, amount):
            raise TooLarge(
                f"upload over your limit of {self.limit} bytes in all (quotas.upload_bytes); "
                "ask your operator for more"
            )
        self.charged += amount

    async def save(self, upload: UploadFile, target: Path) -> int:
        """Stream an upload to `target`, each chunk charged first; returns its size. It is
        written under a hidden temporary name and renamed once whole, so a failure part-way
        leaves no file under `target`'s name (a temporary one only after a crash)."""
        written = 0
        partial = target.with_name(f".{target.name}.part")
        try:
            with partial.open("wb") as f:
                while chunk := await upload.read(1 << 20):
                    await self.charge(len(chunk))
                    written += len(chunk)
                    f.write(chunk)
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
        return written

    def refund(self) -> None:
        if self.charged:
            self._add(-self.charged)
            self.charged = 0

    def sweep(self, now: float | None = None) -> int:
        """Remove the sets left part-way by a server that died mid-upload (untouched for
        `STALE_UPLOAD_S`), giving their bytes back to the quota; returns how many. A live
        upload writes a chunk every few seconds, so its newest file is never that old."""
        uploads, now = self._held[0], time.time() if now is None else now
        swept = 0
        for folder in uploads.glob(".in-*.part") if uploads.is_dir() else []:
            files = [f for f in folder.rglob("*") if f.is_file()]
            newest = max((f.stat().st_mtime for f in files), default=folder.stat().st_mtime)
            if now - newest < STALE_UPLOAD_S:
                continue
            # Given back first: a tally counted from disk meanwhile still sees the files.
            self._add(-sum(f.stat().st_size for f in files))
            shutil.rmtree(folder, ignore_errors=True)
            swept += 1
        return swept
