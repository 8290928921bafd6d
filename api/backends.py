"""Where a CLI command goes: the embedded default, or straight to a broker.

The worker side is imported inside the methods that need it, so that `import api.cli`
stays free of torch and celery (the API issue adds an HTTP backend beside these).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from workers.control import Status, cancel, list_jobs, status
from workers.counters import Counters
from workers.jobs import ExtractionSpec
from workers.settings import Settings

__all__ = ["Backend", "BrokerBackend", "EmbeddedBackend", "backend_for"]

OnPlan = Callable[[Any], None]
Progress = Callable[[Status], None]


class Backend(Protocol):
    store: str

    def scan(
        self, spec: ExtractionSpec, wait: bool, on_plan: OnPlan, progress: Progress
    ) -> Status: ...
    def status(self, job_id: str) -> Status: ...
    def list(self, state: str | None) -> list[Status]: ...
    def wait(self, job_id: str, progress: Progress) -> Status: ...
    def cancel(self, job_id: str) -> Status: ...
    def resume(self, job_id: str, wait: bool, progress: Progress) -> Status: ...


class _StoreReads:
    store: str

    def _counters(self) -> Counters | None:
        return None

    def status(self, job_id: str) -> Status:
        return status(self.store, job_id, self._counters())

    def list(self, state: str | None) -> list[Status]:
        return list_jobs(self.store, state)

    def cancel(self, job_id: str) -> Status:
        return cancel(self.store, job_id)


class EmbeddedBackend(_StoreReads):
    """Same tasks, in-memory transport, a worker thread in this process."""

    def __init__(self, settings: Settings, store: str) -> None:
        self.settings = settings
        self.store = store

    def scan(self, spec: ExtractionSpec, wait: bool, on_plan: OnPlan, progress: Progress) -> Status:
        from workers import embedded

        return embedded.scan(spec, self.store, self.settings, on_plan, progress)

    def wait(self, job_id: str, progress: Progress) -> Status:
        from workers.control import wait

        return wait(self.store, job_id, None, progress)

    def resume(self, job_id: str, wait: bool, progress: Progress) -> Status:
        from workers import embedded

        return embedded.resume(self.store, job_id, self.settings, progress)


class BrokerBackend(_StoreReads):
    """A trusted script on the cluster: plan here, enqueue on the broker, workers share the
    store."""

    def __init__(self, settings: Settings, store: str) -> None:
        assert settings.broker_url is not None
        self.settings = settings
        self.store = store
        self._url = settings.broker_url.get_secret_value()

    def _counters(self) -> Counters:
        from workers.counters import RedisCounters

        return RedisCounters(self._url)

    def _app(self) -> Any:
        from workers.celery_app import make_celery

        return make_celery(self.settings)

    def scan(self, spec: ExtractionSpec, wait: bool, on_plan: OnPlan, progress: Progress) -> Status:
        from workers.control import enqueue
        from workers.embedded import catalogue
        from workers.pipeline import plan

        info = catalogue(spec.model, spec.weights, spec.preprocessing, self.settings)
        job = plan(self.store, spec, info)
        on_plan(job)
        enqueue(self._app(), self.store, job.job_id, range(job.n_batches))
        return self.wait(job.job_id, progress) if wait else self.status(job.job_id)

    def wait(self, job_id: str, progress: Progress) -> Status:
        from workers.control import wait

        return wait(self.store, job_id, self._counters(), progress)

    def resume(self, job_id: str, wait: bool, progress: Progress) -> Status:
        from workers.control import enqueue, prepare_resume

        missing = prepare_resume(self.store, job_id, self._counters())
        enqueue(self._app(), self.store, job_id, missing)
        return self.wait(job_id, progress) if wait else self.status(job_id)


def backend_for(settings: Settings, store: str) -> Backend:
    if settings.broker_url is not None:
        return BrokerBackend(settings, store)
    return EmbeddedBackend(settings, store)
