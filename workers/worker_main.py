"""The Celery app of a worker process (`celery -A workers.worker_main worker`), built from
the environment once, at this entry point."""

from __future__ import annotations

import functools
import gc
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery.signals import worker_process_init

from workers.batches import Runtime
from workers.celery_app import make_celery
from workers.counters import RedisCounters
from workers.extraction.cache import ModelCache
from workers.gpu import device
from workers.settings import Settings
from workers.tasks import register

settings = Settings()
app = make_celery(settings)


@functools.cache
def runtime() -> Runtime:
    # Built on the first task, in the child: CUDA and Redis connections never cross a fork.
    assert settings.broker_url is not None
    return Runtime(
        ModelCache(device(), factories=settings.factories),
        RedisCounters(settings.broker_url.get_secret_value()),
        settings.attempt_cap,
        ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="actmap-decode"),
    )


register(app, runtime)


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _freeze_imports(**_: Any) -> None:
    """Move what the imports made (torch's, Celery's, zarr's objects: most of the heap)
    out of the collector's reach: each full collection in a child walked all of it, about
    0.2 s a time on 2 cores, twice in 7 jobs of the queue benchmark."""
    gc.freeze()
