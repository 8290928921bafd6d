"""Submitting an extraction: plan it, cut it into tasks, send them, once, however often and
however concurrently it is asked. The API, the broker CLI and the embedded default all
submit through `submit`, so a job id is handed out only once its plan is complete and its
tasks are sent. Every task of a job is sent from here: `send_batches` cuts batches into
tasks sized to the workers the `JobQueue` reports (a submission, a resume, the
reconciler's resend), and `hand_on` sends what a task had no time left to start.

With `keys` (a broker), the whole submission runs under a lease named after the
idempotency key (or the new job's id): concurrent retries wait for the first and get its
job; a retry after a crash finds the claimed id and finishes what the crash left: a plan
cut short is planned again, tasks not all sent are sent (again: a batch may then run
twice, which the ledger makes harmless). The lease is the first thing asked of Redis, so a
submission while Redis is down plans nothing. Redis lost between the plan and the sending
leaves a complete plan, which the reconciler sends after its bound.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import fsspec

from workers.errors import ActmapError, NotFound, SpecError, UserError
from workers.jobs import ExtractionSpec, JobState, Listing, ModelInfo, TaskName, new_id
from workers.lifecycle.counters import Counters
from workers.lifecycle.plan import Plan, plan
from workers.lifecycle.state import queue_of, resume_batches
from workers.storage.consolidate import publish
from workers.storage.index import holds
from workers.storage.layout import attrs, open_job

__all__ = [
    "SUBMISSION",
    "Busy",
    "JobQueue",
    "Keys",
    "Unavailable",
    "hand_on",
    "resume",
    "send_batches",
    "submit",
    "task_groups",
]

SUBMISSION = "submission"  # job attribute: "sent" once every task of the plan is sent
LEASE_S = 60.0  # a submission's lease: longer than a plan of many thousands of samples
# Each worker gets this many tasks of a job, split evenly, so none idles while another has
# a queue (tests/bench/queueing.py, 4 simulated GPUs, 200 batches: 17 tasks of 12 reached
# 0.86 of ideal, 20 tasks of 10 reached 0.97).
TASKS_PER_WORKER = 5
# Batches to a task when nobody says how many workers there are.
UNKNOWN_WORKERS_PER_TASK = 4

# Held around a new job's plan: raises to refuse it (a quota), holds a lock until it counts.
Admit = Callable[[], AbstractContextManager[None]]


class Unavailable(ActmapError):
    """Raised when the broker cannot be reached: nothing was acknowledged; retry later."""


class Busy(ActmapError):
    """Raised when another request with the same idempotency key holds the submission
    past the lease's wait."""


class JobQueue(Protocol):
    """Where tasks go: Celery in a worker or the CLI (`workers.execution.celery_app.
    CeleryQueue`), the API's broker. Tasks are sent by name, so the sender needs no task
    code."""

    def send(self, task: str, args: list[Any], queue: str) -> None: ...
    def workers(self, queue: str) -> int:
        """How many workers consume `queue` now (0: unknown); tasks are sized to them."""
        ...


class Keys(Protocol):
    """What a submission needs of the broker besides sending."""

    def claim(self, key: str, value: str) -> str | None: ...
    def release(self, key: str) -> None: ...
    def guard(self, name: str, timeout: float) -> AbstractContextManager[object]:
        """Hold the lease `name` for at most `timeout` s, waiting as long for it; raises
        `Busy` when the wait runs out."""
        ...


def task_groups(batches: Iterable[int], workers: int, cap: int) -> list[list[int]]:
    """The batches cut into tasks of consecutive batches, so that a task runs for seconds
    and its writes overlap its next forward: at most `cap` to a task, since each task's
    first decode and last write go unoverlapped. Sizes differ by one at most (larger
    first), and with several `workers` the task count is TASKS_PER_WORKER or more for each,
    a multiple of theirs where the job has batches enough: tasks of 16 filling 6.25 rounds
    of 16 workers left a quarter of them a seventh task while the rest idled, 0.86 of ideal
    (tests/bench/queueing.py). `workers` 0 (none checked in, or nobody asked) gives the
    cautious size."""
    found = [int(b) for b in batches]
    if not found:
        return []
    cap = max(1, min(cap, UNKNOWN_WORKERS_PER_TASK) if workers <= 0 else cap)
    tasks = -(-len(found) // cap)
    if workers > 1:
        rounds = max(TASKS_PER_WORKER, -(-tasks // workers))
        tasks = min(len(found), rounds * workers)
    size, larger = divmod(len(found), tasks)
    groups, start = [], 0
    for i in range(tasks):
        end = start + size + (i < larger)
        groups.append(found[start:end])
        start = end
    return groups


def send_batches(
    jobs: JobQueue, store: str, job_id: str, batches: Iterable[int], queue: str, cap: int
) -> int:
    """Send the batches as tasks (`task_groups`, sized to the workers on `queue` now, at
    most `cap` batches each); returns how many."""
    groups = task_groups(batches, jobs.workers(queue), cap)
    for group in groups:
        jobs.send(TaskName.RUN_BATCH, [store, job_id, group], queue)
    return len(groups)


def hand_on(jobs: JobQueue, store: str, job_id: str, batches: list[int]) -> None:
    """A task's batches it had no time left to start, as one new task: they were one
    task's share already."""
    jobs.send(TaskName.RUN_BATCH, [store, job_id, batches], queue_of(store, job_id))


def resume(
    jobs: JobQueue, store: str, job_id: str, cap: int, counters: Counters | None = None
) -> list[int]:
    """Send what the job lacks (`resume_batches`) to its queue; returns those batches."""
    missing = resume_batches(store, job_id, counters)
    send_batches(jobs, store, job_id, missing, queue_of(store, job_id), cap)
    return missing


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
    except NotFound:
        found = None
    if found is None:
        return None
    if holds(store, job_id, str(found["created"])) or found["state"] != JobState.QUEUED:
        return Plan(store, job_id, int(found["n_samples"]), int(found["batch_size"]))
    _remove(store, job_id)  # planned part-way: planned again whole
    return None


def _submit(
    store: str, spec: ExtractionSpec, info: ModelInfo, inputs: Listing,
    job_id: str, jobs: JobQueue, cap: int, fresh: bool = True, admit: Admit | None = None,
) -> Plan:  # fmt: skip
    job = None if fresh else _existing(store, job_id)
    if job is not None and attrs(open_job(store, job_id, mode="r")).get(SUBMISSION) == "sent":
        return job
    if job is None:
        with admit() if fresh and admit is not None else nullcontext():
            job = plan(store, spec, info, inputs, job_id)
    send_batches(jobs, store, job_id, range(job.n_batches), spec.queue, cap)
    open_job(store, job_id).update_attributes({SUBMISSION: "sent"})
    publish(store, job_id)  # an attrs write drops the group's consolidated map
    return job


def _claim(keys: Keys, key: str, job_id: str, spec: ExtractionSpec) -> str | None:
    """The job of the first request with `key`, or None when this is the first; a key sent
    again with another request is refused, since its job answers a different request (as
    the IETF's Idempotency-Key draft asks: a 422)."""
    digest = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:16]
    earlier = keys.claim(key, f"{job_id} {digest}")
    if earlier is None:
        return None
    earlier_id, _, earlier_digest = earlier.partition(" ")
    if earlier_digest and earlier_digest != digest:  # no digest: claimed before they were kept
        raise SpecError(
            "this Idempotency-Key was first sent with another request; send that request "
            "again to get its job, or use a new key for this one"
        )
    return earlier_id


def submit(
    store: str,
    spec: ExtractionSpec,
    info: ModelInfo,
    inputs: Listing,
    jobs: JobQueue,
    *,
    cap: int,
    keys: Keys | None = None,
    key: str | None = None,
    admit: Admit | None = None,
) -> Plan:
    """Plan the job and send its tasks (`send_batches`, at most `cap` batches each); with
    `key`, the job of the first request with that key, finished if it was not. `admit` is
    entered around a new job's plan (quotas, checked and held until the job is counted; a
    retry skips it). Raises `Unavailable` when the broker is away (retry: with a key, the
    retry gets the same job)."""
    job_id = new_id()
    if keys is None:
        return _submit(store, spec, info, inputs, job_id, jobs, cap, admit=admit)
    try:
        with keys.guard(f"actmap:submitting:{key or job_id}", LEASE_S):
            earlier = _claim(keys, key, job_id, spec) if key is not None else None
            try:
                return _submit(
                    store, spec, info, inputs, earlier or job_id, jobs, cap,
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
