"""Celery tasks: thin adapters from a message to `workers.lifecycle.delivery`, errors mapped to
retries. Nothing else lives here."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded

from workers.errors import TransientError
from workers.execution import registration
from workers.execution.celery_app import CeleryQueue
from workers.execution.screen_one import Screeners, answer
from workers.extraction.cache import ModelCache
from workers.extraction.isolation import ChildLimits
from workers.jobs import TaskName
from workers.lifecycle.delivery import Outcome, Runtime, execute_batches, give_up
from workers.lifecycle.submit import hand_on

__all__ = ["register"]

_RETRY_BACKOFF = 2.0  # seconds, doubled per retry
# Redis away under a running task (a restart outlasting the client's retries): a retry,
# not a bug that gives the task's batches up.
_REDIS_LOST = (redis.ConnectionError, redis.TimeoutError)
log = logging.getLogger("actmap")


def register(app: Celery, runtime: Callable[[], Runtime], models: Callable[[], ModelCache]) -> None:
    """Register the tasks on `app`. `runtime()` builds or returns the per-process state,
    and `models()` the models it extracts with, so that models and connections are made in
    the worker child, after the fork."""
    screeners = Screeners()  # numpy arrays only: safe to make before the fork

    @app.task(name=TaskName.RUN_BATCH, bind=True, max_retries=5, shared=False)  # type: ignore[untyped-decorator]
    def run_batch(self: Task, store: str, job_id: str, batches: list[int]) -> dict[str, Any]:
        try:
            # Held while the task runs: the reconciler sends again only batches nobody holds.
            runtime().hold(job_id, batches)
            try:
                outcomes = execute_batches(store, job_id, batches, runtime())
            finally:
                runtime().let_go(job_id, batches)
        except SoftTimeLimitExceeded:
            # One batch took longer than a task may: the others of the job will too, so the
            # task's batches fail now, with what to do, rather than one limit at a time.
            limit = self.app.conf.task_soft_time_limit
            reason = (
                f"a batch of this task ran past its soft time limit of {limit} s: submit with "
                "a smaller batch size, or raise ACTMAP_TASK_SOFT_TIME_LIMIT and "
                "ACTMAP_TASK_TIME_LIMIT"
            )
            outcomes = [give_up(store, job_id, b, reason, runtime()) for b in batches]
        except (TransientError, ConnectionError, TimeoutError, *_REDIS_LOST) as exc:
            if self.request.retries < self.max_retries:
                delay = _RETRY_BACKOFF * 2**self.request.retries
                raise self.retry(exc=exc, countdown=delay) from exc
            reason = f"still failing: {exc}"
            outcomes = [give_up(store, job_id, b, reason, runtime()) for b in batches]
        except Exception as exc:  # a bug: keep the traceback, let the job finish without it
            log.exception("job %s batches %s failed unexpectedly", job_id, batches)
            reason = f"internal error: {exc!r}"
            outcomes = [give_up(store, job_id, b, reason, runtime()) for b in batches]
        left = [b for b, o in zip(batches, outcomes, strict=True) if o is Outcome.DEFERRED]
        if left:  # sent before this task is acknowledged: a crash between runs them twice
            try:
                hand_on(CeleryQueue(self.app), store, job_id, left)
            except Exception as exc:  # the broker is away: this task again later, done skipped
                raise self.retry(exc=exc, countdown=_RETRY_BACKOFF) from exc
        return {"job_id": job_id, "batches": batches, "outcomes": [o.value for o in outcomes]}

    @app.task(name=TaskName.ANALYSE, shared=False)  # type: ignore[untyped-decorator]
    def analyse(
        store: str, kind: str, params: dict[str, Any], analysis_id: str, tenant: str
    ) -> dict[str, Any]:
        from workers.analysis.requests import run_analysis  # numpy work, analysis queue

        state = run_analysis(store, kind, params, analysis_id, tenant)
        return {"analysis_id": analysis_id, "state": state}

    @app.task(name=TaskName.REGISTER_MODEL, shared=False)  # type: ignore[untyped-decorator]
    def register_model(store: str, tenant: str, model_id: str) -> dict[str, Any]:
        cache = models()
        limits = cache.verdicts.limits if cache.verdicts else ChildLimits()
        state = registration.register_model(store, tenant, model_id, cache.factories, limits)
        return {"model_id": model_id, "state": state}

    @app.task(name=TaskName.SCREEN_SAMPLE, shared=False)  # type: ignore[untyped-decorator]
    def screen(
        store: str, tenant: str | None, profile_id: str, name: str, data: str
    ) -> dict[str, Any]:
        # The answer is the result: the caller waits for it (no job, nothing stored).
        return answer(store, tenant, profile_id, name, data, models(), screeners)
