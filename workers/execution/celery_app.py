"""`make_celery(settings)`: queues, routes and the reliability settings; no task bodies.
`CeleryQueue`: the app as the `JobQueue` that `workers.lifecycle.submit` sends through."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

from celery import Celery
from kombu.entity import Queue

from workers.execution.heartbeat import install as install_heartbeat
from workers.jobs import QUEUES
from workers.settings import Settings

__all__ = ["MEMORY_BROKER", "CeleryQueue", "make_celery"]

MEMORY_BROKER = "memory://localhost/"


def _ssl_options(url: str) -> dict[str, Any] | None:
    # rediss:// without ssl_cert_reqs in the URL: verify the server's certificate.
    if url.startswith("rediss://") and "ssl_cert_reqs" not in url:
        return {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return None


def make_celery(settings: Settings, broker: str | None = None) -> Celery:
    """The app for `settings`. `broker` overrides the settings' URL (the embedded default
    passes the in-memory transport)."""
    url = broker or (settings.broker_url.get_secret_value() if settings.broker_url else None)
    if url is None:
        raise ValueError("no broker: set ACTMAP_BROKER_URL, or run embedded")
    embedded = url == MEMORY_BROKER
    app = Celery("actmap", broker=url, backend=None if embedded else url, set_as_current=False)
    visibility = settings.visibility_timeout
    transport: dict[str, Any] = {"visibility_timeout": visibility}
    if embedded:
        transport["polling_interval"] = 0.01  # the memory transport polls; keep it snappy
    app.conf.update(
        # At-least-once delivery: acknowledge after the task, requeue when its worker dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.task_soft_time_limit,
        task_time_limit=settings.task_time_limit,
        # Celery reads the visibility timeout in three places; all must agree.
        visibility_timeout=visibility,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        # A task outlives a broker outage: cancelling it (SIGTERM to its child) cost each of
        # its started batches an attempt for no fault of theirs, and two Redis restarts and
        # a dead worker gave a batch up. Its ack is lost with the connection; the ledger
        # skips the redelivery.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # On SIGTERM a running batch gets this long to finish; an idle worker stops at once.
        worker_soft_shutdown_timeout=float(settings.shutdown_s),
        task_queues=[Queue(name) for name in QUEUES],  # type: ignore[no-untyped-call]
        task_default_queue="extract",
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=24 * 3600,
        task_ignore_result=embedded,
        worker_hijack_root_logger=False,
        broker_use_ssl=_ssl_options(url),
        redis_backend_use_ssl=_ssl_options(url),
    )
    if settings.health_dir is not None:
        install_heartbeat(app, settings.health_dir, settings.heartbeat_s)
    return app


class CeleryQueue:
    """Tasks sent by name through `app` (no task code needed to send), sized to the
    workers that `workers(queue)` counts: the roster's on a cluster, 1 by default (the
    embedded worker thread, or a task handing on its batches)."""

    def __init__(self, app: Celery, workers: Callable[[str], int] | None = None) -> None:
        self._app = app
        self._workers = workers

    def send(self, task: str, args: list[Any], queue: str) -> None:
        # Results are never read; without this Celery subscribes to a result channel per send.
        self._app.send_task(task, args=args, queue=queue, ignore_result=True)

    def workers(self, queue: str) -> int:
        return 1 if self._workers is None else self._workers(queue)
