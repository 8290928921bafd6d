"""A simulated GPU worker for tests/bench/queueing.py: the real Celery app, a fake forward pass.

Started by the benchmark, never by hand, from the repository root:

    ACTMAP_BROKER_URL=redis://127.0.0.1:PORT/0 ACTMAP_BENCH_SLEEP=0.05 \\
        .venv/bin/python -m celery -A tests.bench.sim_worker worker --pool threads \\
        --concurrency 16 --prefetch-multiplier 1 --queues extract ...

The app is `workers.execution.celery_app.make_celery(Settings())`, so acks late, prefetch 1, reject
on
worker lost and the visibility timeout are the ones a real worker runs with, and the result
backend too. It registers a task under the real name `TaskName.RUN_BATCH` with the real
signature, whose body keeps the per-batch Redis pattern of
`workers.lifecycle.delivery.execute_batch`
(`RedisCounters.attempt`, the forward pass, `RedisCounters.done`, `claim_finalize` after the
last batch) but replaces the store and torch with `time.sleep(ACTMAP_BENCH_SLEEP)`: a GPU
that is busy for a fixed time and leaves the CPU idle. One pool thread is one simulated
GPU worker with a prefetch of one message.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

from celery import Task
from celery.signals import worker_ready, worker_shutdown

from workers.execution.celery_app import make_celery
from workers.execution.roster import member
from workers.jobs import TaskName
from workers.lifecycle.counters import RedisCounters, Roster
from workers.settings import Settings

__all__ = ["app"]

settings = Settings()
app = make_celery(settings)
SLEEP = float(os.environ.get("ACTMAP_BENCH_SLEEP", "0.05"))  # seconds of "GPU" per batch
GPUS = int(os.environ.get("ACTMAP_BENCH_GPUS", "1"))  # pool threads of this process


def _gpus() -> list[str]:
    return [f"{member()}:{i}" for i in range(GPUS)]


@worker_ready.connect  # type: ignore[untyped-decorator]
def _check_in(**_: Any) -> None:
    """On the roster as GPUS workers, as that many real worker children would be, so that
    the submitter sizes tasks as it would for them (checked in once: a round is short)."""
    if settings.broker_url is not None:
        roster = Roster(settings.broker_url.get_secret_value())
        for name in _gpus():
            roster.check_in(name, ["extract"])


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _check_out(**_: Any) -> None:
    if settings.broker_url is not None:
        roster = Roster(settings.broker_url.get_secret_value())
        for name in _gpus():
            roster.check_out(name, ["extract"])


@functools.cache
def counters() -> RedisCounters:
    # One client (a thread-safe connection pool) per process, made on the first task.
    assert settings.broker_url is not None
    return RedisCounters(settings.broker_url.get_secret_value())


@app.task(name=TaskName.RUN_BATCH, bind=True, max_retries=5, shared=False)  # type: ignore[untyped-decorator]
def run_batch(_task: Task, store: str, job_id: str, batches: list[int]) -> dict[str, Any]:
    """`execute_batches` without the store: per batch, count the attempt, "compute", record
    done."""
    redis = counters()
    n_batches = int(store.rsplit("#", 1)[-1]) if "#" in store else -1
    for batch in batches:
        redis.attempt(job_id, batch)
        time.sleep(SLEEP)
        if redis.done(job_id, batch) >= n_batches > 0:
            redis.claim_finalize(job_id)
    return {"job_id": job_id, "batches": batches, "outcomes": ["ran"] * len(batches)}
