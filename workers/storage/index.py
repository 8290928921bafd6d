"""The job index: one small record per job, so that listing, filtering and counting never
open a job group.

Why records and not a database: the store must work on a local directory, on a shared
POSIX directory with several writers on several hosts, and on an object store, with no
locks. SQLite needs locks a shared filesystem often lacks and does not live on S3; a Redis
sorted set is lost with Redis and absent in the embedded mode. A record per job, written
whole (atomic rename locally, one PUT on S3), needs neither: writers of different jobs
never touch the same key, and the writers of one job write what its attrs say, so the last
write is the truth. Each record is written at plan and at every state change, in a few
fixed places (O(1) per job written):

    index/all/{key}                        every job
    index/tenant/{tenant}/{key}            a tenant's jobs
    index/state/{state}/{key}              jobs in a state
    index/tenant-state/{tenant}/{state}/{key}

`key` is the job's creation time with every digit inverted, then its id, so byte order is
newest first and a page is one listing of a prefix after a cursor (the last key seen):
O(page) on S3 (ListObjectsV2 StartAfter + MaxKeys). A state change writes the new state's
records, then removes the job's records under every other state. The index holds the state
stored in the job's attrs; a job `queued` there may be running by its ledger, which
`control.status` reads for the jobs of a page. If the index is lost or stale (a crash
between a state write and its record), `rebuild` writes it again from the job groups
(`actmap store reindex`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from workers.errors import UserError
from workers.jobs import JobState
from workers.storage.layout import INDEX, INDEX_COMPLETE, JOBS
from workers.storage.objects import filesystem, get_json, list_after, put_json, remove

__all__ = [
    "Entry", "Figures", "IndexMissing", "count", "figures", "holds", "page", "rebuild",
    "record", "state_counts", "unfinished",
]  # fmt: skip

# Written in a new store, and by a rebuild: a store with jobs and without it was written
# before the index, and a listing of it would silently miss every older job.


class IndexMissing(UserError):
    """Raised when a store written before the job index is listed or counted."""


def _checked(fs: Any, root: str, store: str) -> None:
    if fs.exists(f"{root}/{INDEX_COMPLETE}") or not fs.exists(f"{root}/{JOBS}"):
        return
    raise IndexMissing(
        f"store {store} was written before the job index: run `actmap store reindex "
        f"--store {store}` once"
    )


CURSOR = re.compile(r"[0-9]{17}_[A-Za-z0-9_-]{1,64}\.json")
# The states a job is stored in (STALLED is derived, never stored), unfinished ones first.
STATES = tuple(s for s in JobState if s is not JobState.STALLED)
_FIELDS = (
    "job_id", "tenant", "state", "kind", "created", "finished", "n_samples", "n_batches",
    "n_failed", "elapsed_s", "samples_per_s", "reason",
)  # fmt: skip


@dataclass(frozen=True)
class Entry:
    """One job as the index knows it: what its attrs said at its last state change."""

    key: str
    record: dict[str, Any]

    @property
    def job_id(self) -> str:
        return str(self.record["job_id"])

    @property
    def state(self) -> str:
        return str(self.record["state"])


def _key(job_id: str, created: str) -> str:
    digits = re.sub(r"\D", "", created)[:17].ljust(17, "0")
    return "".join(str(9 - int(d)) for d in digits) + "_" + job_id + ".json"


def _tenant(tenant: str) -> str:
    return quote(tenant, safe="") or "_"


def _places(root: str, key: str, tenant: str, state: str) -> list[str]:
    t = _tenant(tenant)
    return [
        f"{root}/{INDEX}/all/{key}",
        f"{root}/{INDEX}/tenant/{t}/{key}",
        f"{root}/{INDEX}/state/{state}/{key}",
        f"{root}/{INDEX}/tenant-state/{t}/{state}/{key}",
    ]


def record(store: str, job_id: str, attrs: dict[str, Any]) -> None:
    """Write the job's record from its attrs (at plan and at every state change)."""
    fs, root = filesystem(store)
    tenant, state = str(attrs.get("tenant") or "local"), str(attrs["state"])
    doc = {name: attrs.get(name) for name in _FIELDS}
    doc.update(job_id=job_id, tenant=tenant, kind=attrs.get("kind", "extraction"))
    key = _key(job_id, str(attrs["created"]))
    for path in _places(root, key, tenant, state):
        put_json(fs, path, doc)
    t = _tenant(tenant)
    stale = [
        path
        for other in STATES
        if other != state
        for path in (
            f"{root}/{INDEX}/state/{other}/{key}",
            f"{root}/{INDEX}/tenant-state/{t}/{other}/{key}",
        )
    ]
    remove(fs, stale)


def _prefixes(root: str, tenant: str | None, states: Iterable[str] | None) -> list[str]:
    if states is None:
        top = "all" if tenant is None else f"tenant/{_tenant(tenant)}"
        return [f"{root}/{INDEX}/{top}"]
    if tenant is None:
        return [f"{root}/{INDEX}/state/{s}" for s in states]
    return [f"{root}/{INDEX}/tenant-state/{_tenant(tenant)}/{s}" for s in states]


def page(
    store: str,
    limit: int,
    cursor: str | None = None,
    tenant: str | None = None,
    states: Iterable[str] | None = None,
) -> tuple[list[Entry], str | None]:
    """Up to `limit` entries, newest first, after `cursor`, of `tenant` (all when None) in
    `states` (any when None); and the cursor of the next page, None after the last."""
    if cursor is not None and not CURSOR.fullmatch(cursor):
        raise UserError(f"cursor {cursor[:80]!r} is not one a listing gave; start without one")
    fs, root = filesystem(store)
    _checked(fs, root, store)
    prefixes = _prefixes(root, tenant, None if states is None else list(states))
    keys = sorted({k for p in prefixes for k in list_after(fs, p, cursor, limit + 1)})
    more = len(keys) > limit
    entries = []
    for key in keys[:limit]:
        for prefix in prefixes:  # the first place that holds it (one read, normally)
            doc = get_json(fs, f"{prefix}/{key}")
            if doc is not None:
                entries.append(Entry(key, doc))
                break
    return entries, keys[limit - 1] if more and limit else None


def count(store: str, tenant: str | None = None, states: Iterable[str] | None = None) -> int:
    """How many jobs the index holds (of `tenant`, in `states`), from names alone."""
    fs, root = filesystem(store)
    _checked(fs, root, store)
    return sum(len(list_after(fs, p, None, None)) for p in _prefixes(root, tenant, states))


def holds(store: str, job_id: str, created: str) -> bool:
    """Whether the index has the job's record, which its plan writes last: a job it does
    not hold was cut short while planned (or predates the index)."""
    fs, root = filesystem(store)
    return bool(fs.exists(f"{root}/{INDEX}/all/{_key(job_id, created)}"))


def unfinished(store: str) -> list[str]:
    """The jobs the index holds as queued or running, from names alone (a key is 17
    digits, `_`, the job id, `.json`)."""
    fs, root = filesystem(store)
    names = {n for p in _prefixes(root, None, STATES[:2]) for n in list_after(fs, p, None, None)}
    return sorted(n.split("_", 1)[1].removesuffix(".json") for n in names)


def state_counts(store: str) -> dict[str, int]:
    """Jobs per stored state, from names alone."""
    return {state: count(store, states=[state]) for state in STATES}


@dataclass(frozen=True)
class Figures:
    """What /metrics shows of the store: jobs per stored state, the summed rate of the
    unfinished jobs, and the mean seconds per batch of the latest finished ones."""

    counts: dict[str, int]
    rate: float
    task_seconds: float


def figures(store: str, recent: int = 50) -> Figures:
    """From names alone, then the records of the unfinished jobs and of the `recent` latest
    finished ones: a gauge of the recent past, not an average over the store's life."""
    counts = state_counts(store)
    active, _ = page(
        store, max(1, counts[JobState.QUEUED] + counts[JobState.RUNNING]), None, None, STATES[:2]
    )
    rate = sum(float(e.record.get("samples_per_s") or 0) for e in active)
    done, _ = page(store, recent, None, None, STATES[2:])
    per_task = [
        float(e.record["elapsed_s"]) / int(e.record["n_batches"])
        for e in done
        if e.record.get("elapsed_s") and e.record.get("n_batches")
    ]
    return Figures(counts, rate, sum(per_task) / len(per_task) if per_task else 0.0)


def rebuild(store: str, jobs: dict[str, dict[str, Any]]) -> int:
    """Write the record of every job in `jobs` (id: attrs) again, and drop the records of
    jobs not in it. Returns the number of jobs indexed."""
    fs, root = filesystem(store)
    present = set()
    for job_id, attrs in jobs.items():
        if "created" in attrs and "state" in attrs:
            record(store, job_id, attrs)
            present.add(_key(job_id, str(attrs["created"])))
    gone: list[str] = []
    for name in list_after(fs, f"{root}/{INDEX}/all", None, None):
        if name not in present:
            doc = get_json(fs, f"{root}/{INDEX}/all/{name}")
            tenant = str((doc or {}).get("tenant") or "local")
            for state in STATES:
                gone.extend(_places(root, name, tenant, state)[2:])
            gone.extend(_places(root, name, tenant, STATES[0])[:2])
    remove(fs, gone)
    put_json(fs, f"{root}/{INDEX_COMPLETE}", {"version": 1})
    return len(present)
