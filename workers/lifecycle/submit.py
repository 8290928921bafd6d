"""Submitting an extraction: plan it, cut it into tasks, send them, once, however often and
however concurrently it is asked. The API, the broker CLI and the embedded default all
submit through `submit`, so a job id is handed out only once its plan is complete and its
tasks are sent.

With `keys` (a broker), the whole submission runs under a lease named after the
idempotency key (or the new job's id): concurrent retries wait for the first and get its
job; a retry after a crash finds the claimed id and finishes what the crash left: a plan
cut short is planned again, tasks not all sent are sent (again: a batch may then run
twice, which the ledger makes harmless). The lease is the first thing asked of Redis, so a
submission while Redis is down plans nothing. Redis lost between the plan and the sending
leaves a complete plan, which the reconciler sends after its bound.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

import fsspec

from workers.errors import ActmapError, JobError, UserError
from workers.extraction.inputs import Source
from workers.jobs import ExtractionSpec, JobState, ModelInfo
from workers.lifecycle.plan import Plan, new_job_id, plan
from workers.storage.consolidate import publish
from workers.storage.index import holds
from workers.storage.layout import attrs, open_job

__all__ = ["SUBMISSION", "Busy", "Keys", "Unavailable", "submit"]

SUBMISSION = "submission"  # job attribute: "sent" once every task of the plan is sent
LEASE_S = 60.0  # a submission's lease: longer than a plan of many thousands of samples

Send = Callable[[str, list[int], str], None]  # job id, batches, queue
# Held around a new job's plan: raises to refuse it (a quota), holds a lock until it counts.
Admit = Callable[[], AbstractContextManager[None]]


class Unavailable(ActmapError):
    """Raised when the broker cannot be reached: nothing was acknowledged; retry later."""


class Busy(ActmapError):
    """Raised when another request with the same idempotency key holds the submission
    past the lease's wait."""


class Keys(Protocol):
    """What a submission needs of the broker besides sending."""

    def claim(self, key: str, value: str) -> str | None: ...
    def release(self, key: str) -> None: ...
    def guard(self, name: str, timeout: float) -> AbstractContextManager[object]:
        """Hold the lease `name` for at most `timeout` s, waiting as long for it; raises
        `Busy` when the wait runs out."""
        ...


def _broker_errors() -> tuple[type[Exception], ...]:
    import kombu.exceptions
    import redis

    return (redis.RedisError, kombu.exceptions.OperationalError)


def _remove(store: str, job_id: str) -> None:
    fs, root = fsspec.core.url_to_fs(store)
    path = f"{root.rstrip('/')}/jobs/{job_id}"
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _existing(store: str, job_id: str) -> Plan | None:
    """The job's plan when it is complete; a partial one is removed, to plan again."""
    try:
        found = attrs(open_job(store, job_id, mode="r"))
    except JobError:
        found = None
    if found is None:
        return None
    if holds(store, job_id, str(found["created"])) or found["state"] != JobState.QUEUED:
        return Plan(store, job_id, int(found["n_samples"]), int(found["batch_size"]))
    _remove(store, job_id)  # planned part-way: planned again whole
    return None


def _submit(
    store: str, spec: ExtractionSpec, info: ModelInfo, sources: list[Source] | None,
    job_id: str, send: Send, fresh: bool = True, admit: Admit | None = None,
) -> Plan:  # fmt: skip
    job = None if fresh else _existing(store, job_id)
    if job is not None and attrs(open_job(store, job_id, mode="r")).get(SUBMISSION) == "sent":
        return job
    if job is None:
        with admit() if fresh and admit is not None else nullcontext():
            job = plan(store, spec, info, job_id, sources)
    send(job_id, list(range(job.n_batches)), spec.queue)
    open_job(store, job_id).update_attributes({SUBMISSION: "sent"})
    publish(store, job_id)  # an attrs write drops the group's consolidated map
    return job


def submit(
    store: str,
    spec: ExtractionSpec,
    info: ModelInfo,
    send: Send,
    *,
    sources: list[Source] | None = None,
    keys: Keys | None = None,
    key: str | None = None,
    admit: Admit | None = None,
) -> Plan:
    """Plan the job and send its tasks; with `key`, the job of the first request with that
    key, finished if it was not. `admit` is entered around a new job's plan (quotas,
    checked and held until the job is counted; a retry skips it). Raises `Unavailable`
    when the broker is away (retry: with a key, the retry gets the same job)."""
    job_id = new_job_id()
    if keys is None:
        return _submit(store, spec, info, sources, job_id, send, admit=admit)
    try:
        with keys.guard(f"actmap:submitting:{key or job_id}", LEASE_S):
            earlier = keys.claim(key, job_id) if key is not None else None
            try:
                return _submit(
                    store, spec, info, sources, earlier or job_id, send,
                    fresh=earlier is None, admit=admit,
                )  # fmt: skip
            except UserError:
                if key is not None:  # the same request again would fail the same way
                    keys.release(key)
                raise
    except _broker_errors() as exc:
        raise Unavailable(
            f"the broker is unavailable ({type(exc).__name__}); nothing was queued, retry"
        ) from exc
