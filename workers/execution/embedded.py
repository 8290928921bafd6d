"""The embedded default: the same Celery tasks through the in-memory transport, drained by
a solo-pool worker in a thread of this process. No Redis anywhere."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from celery import Celery
from celery._state import _set_task_join_will_block
from celery.worker import state as worker_state
from celery.worker.worker import WorkController

from workers.errors import ActmapError
from workers.execution.celery_app import MEMORY_BROKER, CeleryQueue, make_celery
from workers.execution.tasks import register
from workers.extraction.cache import ModelCache
from workers.extraction.inputs import list_inputs
from workers.extraction.models import load_model
from workers.jobs import QUEUES, ExtractionSpec, ModelInfo, Preprocessing, host_compression
from workers.lifecycle.counters import MemoryCounters
from workers.lifecycle.delivery import Runtime
from workers.lifecycle.plan import Plan
from workers.lifecycle.state import Status, mark_interrupted, wait
from workers.lifecycle.submit import resume as resume_job
from workers.lifecycle.submit import submit
from workers.pipeline import Extraction, spec_of
from workers.settings import Settings
from workers.storage.layout import open_job

__all__ = ["Embedded", "Interrupted", "catalogue", "embedded", "resume", "scan"]


class Interrupted(KeyboardInterrupt):
    """Raised when Ctrl-C stopped an embedded run at a batch boundary; names the job,
    which `actmap jobs resume` finishes."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


Progress = Callable[[Status], None]


def catalogue(
    model: str, weights: str | None, prep: Preprocessing | None, settings: Settings
) -> ModelInfo:
    return load_model(model, weights, prep, settings.factories, settings.device).info


@dataclass
class Embedded:
    app: Celery
    models: ModelCache
    runtime: Runtime
    thread: threading.Thread

    @property
    def jobs(self) -> CeleryQueue:
        """Tasks for the one worker thread."""
        return CeleryQueue(self.app)

    def watch(self, progress: Progress | None) -> Progress:
        """Progress that also notices a worker thread that stopped (a bug): fail loudly
        instead of waiting forever."""

        def check(status: Status) -> None:
            if not self.thread.is_alive():
                raise ActmapError("the in-process worker stopped; see the log above")
            if progress is not None:
                progress(status)

        return check


@contextmanager
def embedded(settings: Settings) -> Iterator[Embedded]:
    """A Celery app on the memory transport and a worker thread draining it."""
    app = make_celery(settings, MEMORY_BROKER)
    with ThreadPoolExecutor(settings.decode_threads) as pool:
        models = ModelCache(settings.device, factories=settings.factories)
        runtime = Runtime(
            Extraction(models, pool), MemoryCounters(), settings.attempt_cap, settings.budget_s
        )
        register(app, lambda: runtime, lambda: models)

        @app.task(name="actmap.wake", shared=False)  # type: ignore[untyped-decorator]
        def wake() -> None:
            """Lets the worker loop see the stop flag now, not after its 2 s poll."""

        ready = threading.Event()
        app.finalize()
        # The worker thread resolves tasks through the process-wide default app.
        app.set_current()
        app.set_default()
        worker = WorkController(
            app=app,
            hostname="actmap-embedded@localhost",
            pool="solo",  # the threads pool hangs on the memory transport
            concurrency=1,
            queues=list(QUEUES),
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
            ready_callback=lambda *_: ready.set(),
            loglevel="WARNING",
        )
        thread = threading.Thread(target=worker.start, name="actmap-worker", daemon=True)
        thread.start()
        try:
            yield Embedded(app, models, runtime, thread)
        finally:
            worker_state.should_terminate = 0  # the worker loop's own stop flag
            # The loop checks the flag, then drains once more: two messages wake it twice
            # instead of waiting out its 2 s poll each time.
            wake.apply_async(queue="extract")
            wake.apply_async(queue="extract")
            thread.join(30)
            worker_state.should_terminate = None
            # The solo worker marks the process as one where joining results would block;
            # later senders in this process should not inherit that.
            _set_task_join_will_block(False)


def _until_done(local: Embedded, store: str, job_id: str, progress: Progress | None) -> Status:
    """Wait for the worker thread to finish the job. On Ctrl-C the worker stops at its
    next batch boundary (the batches before it written whole), then the job is recorded
    as interrupted and `Interrupted` raised, once the `embedded` block has joined it."""
    try:
        return wait(store, job_id, local.runtime.counters, local.watch(progress))
    except KeyboardInterrupt:
        local.runtime.stopping.set()
        raise Interrupted(job_id) from None


def _interrupted(store: str, job_id: str | None) -> None:
    if job_id is not None:
        mark_interrupted(store, job_id)


def scan(
    spec: ExtractionSpec,
    store: str,
    settings: Settings,
    on_plan: Callable[[Plan], None] | None = None,
    progress: Progress | None = None,
) -> Status:
    """Plan the job, enqueue its batches, and wait for the worker thread to finish them."""
    job_id: str | None = None
    if spec.compression is None:  # this host runs the forward: its default
        gpu = settings.device.startswith("cuda")
        spec = spec.model_copy(update={"compression": host_compression(gpu)})
    try:
        with embedded(settings) as local:
            info = local.models.get(spec).info
            job = submit(
                store, spec, info, list_inputs(spec, info), local.jobs,
                cap=settings.batches_per_task,
            )  # fmt: skip
            job_id = job.job_id
            if on_plan is not None:
                on_plan(job)
            return _until_done(local, store, job.job_id, progress)
    except Interrupted:
        _interrupted(store, job_id)
        raise


def resume(store: str, job_id: str, settings: Settings, progress: Progress | None = None) -> Status:
    """Run exactly the batches the ledger lacks."""
    try:
        with embedded(settings) as local:
            # Loaded here, before any task, as `scan` does: a model that no longer loads is
            # one error now rather than one per batch, and no task's batches pay the load.
            local.models.get(spec_of(open_job(store, job_id, mode="r")))
            counters = local.runtime.counters
            resume_job(local.jobs, store, job_id, settings.batches_per_task, counters)
            return _until_done(local, store, job_id, progress)
    except Interrupted:
        _interrupted(store, job_id)
        raise
