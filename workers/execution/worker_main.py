"""The Celery app of a worker process (`celery -A workers.execution.worker_main worker`), built from
the environment once, at this entry point."""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any

import redis
from celery.signals import worker_process_init, worker_process_shutdown

from workers.execution.celery_app import CeleryQueue, make_celery
from workers.execution.roster import keep_checking_in, member
from workers.execution.slots import device
from workers.execution.tasks import register
from workers.extraction.cache import ModelCache
from workers.extraction.isolation import ChildLimits, Verdicts
from workers.lifecycle.counters import RedisCounters, Roster
from workers.lifecycle.delivery import Runtime
from workers.lifecycle.reconciler import Reconciler
from workers.lifecycle.submit import send_batches
from workers.pipeline import Extraction
from workers.settings import Settings

settings = Settings()
app = make_celery(settings)
# A hold outlives one missed renewal: renewed each period, it lasts two.
LEASE_S = 2 * settings.roster_period_s


@functools.cache
def models() -> ModelCache:
    # Built on the first task, in the child: CUDA never crosses a fork.
    return ModelCache(
        device(),
        factories=settings.factories,
        verdicts=Verdicts(
            ChildLimits(settings.model_check_memory_mb, settings.model_check_deadline_s)
        ),
    )


@functools.cache
def runtime() -> Runtime:
    # Built on the first task, in the child: Redis connections never cross a fork.
    assert settings.broker_url is not None
    return Runtime(
        Extraction(
            models(),
            ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="actmap-decode"),
        ),
        RedisCounters(settings.broker_url.get_secret_value()),
        settings.attempt_cap,
        settings.budget_s,
        lease_s=LEASE_S,
    )


register(app, runtime, models)


def _queues() -> list[str]:
    """The queues this worker consumes (`--queues`, selected in the parent before the fork)."""
    return sorted(app.amqp.queues.consume_from)


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _child_started(**_: Any) -> None:
    # Move what the imports made (torch's, Celery's, zarr's objects: most of the heap) out
    # of the collector's reach: each full collection in a child walked all of it, a pause
    # long enough to show in the queue benchmark.
    gc.freeze()
    if settings.broker_url is not None:
        url = settings.broker_url.get_secret_value()
        roster = Roster(url, settings.roster_period_s)
        keep_checking_in(roster, member(), _queues(), _duties(url, roster))


def _duties(url: str, roster: Roster) -> Callable[[], None]:
    """What the child does each roster period after checking in: renew the holds of its
    running task, then reconcile (one child of the cluster per period)."""

    jobs = CeleryQueue(app, roster.size)

    def send(job_id: str, batches: list[int], queue: str) -> None:
        send_batches(jobs, settings.store, job_id, batches, queue, settings.batches_per_task)

    counters = RedisCounters(url, settings.roster_period_s)
    reconciler = Reconciler(
        settings.store, url, counters, send,
        settings.roster_period_s, settings.reconcile_after_s, LEASE_S,
    )  # fmt: skip

    def duties() -> None:
        if runtime.cache_info().currsize:  # built by a task: there may be holds to renew
            runtime().renew()
        reconciler.run_once()

    return duties


@worker_process_shutdown.connect  # type: ignore[untyped-decorator]
def _child_stopping(**_: Any) -> None:
    if settings.broker_url is not None:
        # Redis away: the entry expires by itself, FRESH_S after the last check-in.
        with suppress(redis.RedisError, OSError):
            Roster(settings.broker_url.get_secret_value()).check_out(member(), _queues())
