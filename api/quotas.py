"""Tenant quotas that hold under concurrency and across API processes.

Queued jobs are counted from the job index under a per-tenant lock in the broker, held while the
job is planned, so two submissions never both see the last free slot. Upload bytes are a
per-tenant tally in the broker, first counted from what the tenant holds (its input sets
and its registered model files) and then charged chunk by chunk as uploads stream in, so
concurrent uploads share one budget; a refused or failed upload gives its bytes back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from api.app import Limit, Services
from api.auth import Tenant
from api.broker import Busy
from workers.jobs import JobState
from workers.storage.index import count
from workers.storage.layout import UPLOADS
from workers.storage.objects import location
from workers.storage.registry import REGISTRY

__all__ = ["UploadQuota", "job_slot", "samples"]

_ACTIVE = (JobState.QUEUED.value, JobState.RUNNING.value)


def _active_jobs(services: Services, tenant: Tenant) -> int:
    """Jobs of this tenant not yet finished, from the job index's names alone."""
    return count(services.store, tenant.name, list(_ACTIVE))


@contextmanager
def job_slot(services: Services, tenant: Tenant) -> Iterator[None]:
    """Hold this while the job is planned: raises Limit (429) when the tenant has its
    `queued_jobs` unfinished already."""
    limit = tenant.quotas.queued_jobs
    try:
        with services.broker.lock(
            f"actmap:quota:jobs:{tenant.name}", services.settings.quota_lock_s
        ):
            if _active_jobs(services, tenant) >= limit:
                raise Limit(
                    f"you have {limit} jobs queued or running, your limit "
                    "(quotas.queued_jobs); wait for one to finish",
                    429,
                )
            yield
    except Busy:
        raise Limit("too many of your submissions at once; retry in a few seconds", 429) from None


def samples(tenant: Tenant, n: int) -> None:
    """Raises Limit (413) when a job of `n` samples is over the tenant's `samples_per_job`."""
    limit = tenant.quotas.samples_per_job
    if n > limit:
        raise Limit(f"{n} samples is over your limit of {limit} (quotas.samples_per_job)", 413)


def _bytes_under(*folders: Path) -> int:
    return sum(f.stat().st_size for d in folders if d.is_dir() for f in d.rglob("*") if f.is_file())


class UploadQuota:
    """One request's share of the tenant's `upload_bytes`: `charge` before each chunk is
    written, `refund` what this request charged when its files are removed."""

    def __init__(self, services: Services, tenant: Tenant) -> None:
        root = Path(location(services.store))
        self._held = (root / UPLOADS / tenant.name, root / REGISTRY / tenant.name)
        self._broker = services.broker
        self._key = f"actmap:quota:upload:{tenant.name}"
        self.limit = tenant.quotas.upload_bytes
        self.charged = 0

    def _add(self, amount: int) -> bool:
        return self._broker.add(self._key, amount, self.limit, lambda: _bytes_under(*self._held))

    async def charge(self, amount: int) -> None:
        if not await run_in_threadpool(self._add, amount):
            raise Limit(
                f"upload over your limit of {self.limit} bytes in all (quotas.upload_bytes); "
                "ask your operator for more",
                413,
            )
        self.charged += amount

    def refund(self) -> None:
        if self.charged:
            self._add(-self.charged)
            self.charged = 0
