"""Where a CLI command goes: the embedded default, straight to a broker, or the HTTP API.

Each runs scans and analyses; an analysis goes to the `analysis` queue and the backend
waits for its result in the store (or the API). The worker side is imported inside the
methods that need it, so that `import api.cli.main` stays free of torch and celery.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from workers.analysis.requests import Analysis
from workers.errors import REFUSALS, UserError
from workers.jobs import AnalysisKind, ExtractionSpec, TaskName, poll
from workers.lifecycle.counters import Counters
from workers.lifecycle.state import Status, can_progress, cancel, job_page, list_jobs, status
from workers.settings import Settings

if TYPE_CHECKING:
    from workers.lifecycle.submit import JobQueue

__all__ = ["ApiBackend", "Backend", "BrokerBackend", "EmbeddedBackend", "backend_for"]

OnPlan = Callable[[Any], None]
Progress = Callable[[Status], None]
AnalysisProgress = Callable[[Analysis], None]
Page = tuple[list[Status], str | None]  # a page of jobs and the next page's cursor
# The tenant of analyses sent straight to the store (embedded, broker): a trusted caller.
_LOCAL = "local"
_POLL_S = 0.2  # how often a wait through the API asks again


class Backend(Protocol):
    store: str

    def scan(
        self, spec: ExtractionSpec, wait: bool, on_plan: OnPlan, progress: Progress
    ) -> Status: ...
    def status(self, job_id: str) -> Status: ...
    def list(self, state: str | None) -> list[Status]: ...
    def page(self, state: str | None, limit: int, cursor: str | None) -> Page: ...
    def wait(self, job_id: str, progress: Progress) -> Status: ...
    def cancel(self, job_id: str) -> Status: ...
    def resume(self, job_id: str, wait: bool, progress: Progress) -> Status: ...
    def screen_sample(self, profile_id: str, name: str, data: bytes) -> dict[str, Any]:
        """One sample screened now, without a job (workers/execution/screen_one.py)."""
        ...

    def analyse(
        self, kind: AnalysisKind, params: dict[str, Any], progress: AnalysisProgress
    ) -> Analysis: ...


class _StoreReads:
    store: str

    def _counters(self) -> Counters | None:
        return None

    def status(self, job_id: str) -> Status:
        return status(self.store, job_id, self._counters())

    def list(self, state: str | None) -> list[Status]:
        return list_jobs(self.store, state)

    def page(self, state: str | None, limit: int, cursor: str | None) -> Page:
        return job_page(self.store, limit, cursor, state, counters=self._counters())

    def cancel(self, job_id: str) -> Status:
        return cancel(self.store, job_id)


class EmbeddedBackend(_StoreReads):
    """Same tasks, in-memory transport, a worker thread in this process."""

    def __init__(self, settings: Settings, store: str) -> None:
        self.settings = settings
        self.store = store

    def scan(self, spec: ExtractionSpec, wait: bool, on_plan: OnPlan, progress: Progress) -> Status:  # noqa: ARG002 (the signature the caller requires)
        from workers.execution import embedded

        return embedded.scan(spec, self.store, self.settings, on_plan, progress)

    def wait(self, job_id: str, progress: Progress) -> Status:
        from workers.lifecycle.state import wait

        return wait(self.store, job_id, None, progress)

    def resume(self, job_id: str, wait: bool, progress: Progress) -> Status:  # noqa: ARG002 (the signature the caller requires)
        from workers.execution import embedded

        return embedded.resume(self.store, job_id, self.settings, progress)

    def analyse(
        self, kind: AnalysisKind, params: dict[str, Any], progress: AnalysisProgress
    ) -> Analysis:
        from workers.analysis.requests import submit, wait
        from workers.execution import embedded

        with embedded.embedded(self.settings) as local:
            analysis_id = submit(local.jobs.send, self.store, kind, params, _LOCAL)
            return wait(self.store, analysis_id, progress, local.thread.is_alive)

    def screen_sample(self, profile_id: str, name: str, data: bytes) -> dict[str, Any]:
        from workers.execution.screen_one import screen_here

        return screen_here(self.settings, self.store, profile_id, name, data)


class BrokerBackend(_StoreReads):
    """A trusted script on the cluster: plan here, enqueue on the broker, workers share the
    store."""

    def __init__(self, settings: Settings, store: str) -> None:
        assert settings.broker_url is not None
        self.settings = settings
        self.store = store
        self._url = settings.broker_url.get_secret_value()

    def _counters(self) -> Counters:
        from workers.lifecycle.counters import RedisCounters

        return RedisCounters(self._url, self.settings.roster_period_s)

    def _app(self) -> Any:
        from workers.execution.celery_app import make_celery

        return make_celery(self.settings)

    def _jobs(self) -> JobQueue:
        """Tasks sized for the workers on the roster now."""
        from workers.execution.celery_app import CeleryQueue
        from workers.lifecycle.counters import Roster

        return CeleryQueue(self._app(), Roster(self._url).size)

    def scan(self, spec: ExtractionSpec, wait: bool, on_plan: OnPlan, progress: Progress) -> Status:
        from api.broker import RedisBroker
        from workers.execution.embedded import catalogue
        from workers.extraction.inputs import list_inputs
        from workers.lifecycle.submit import submit

        info = catalogue(spec.model, spec.weights, spec.preprocessing, self.settings)
        listed = list_inputs(spec, info)
        keys = RedisBroker(self._url, self._app())
        cap = self.settings.batches_per_task
        job = submit(self.store, spec, info, listed, self._jobs(), cap=cap, keys=keys)
        on_plan(job)
        return self.wait(job.job_id, progress) if wait else self.status(job.job_id)

    def wait(self, job_id: str, progress: Progress) -> Status:
        from workers.lifecycle.state import wait

        return wait(self.store, job_id, self._counters(), progress)

    def resume(self, job_id: str, wait: bool, progress: Progress) -> Status:
        from workers.lifecycle.submit import resume

        cap = self.settings.batches_per_task
        resume(self._jobs(), self.store, job_id, cap, self._counters())
        return self.wait(job_id, progress) if wait else self.status(job_id)

    def analyse(
        self, kind: AnalysisKind, params: dict[str, Any], progress: AnalysisProgress
    ) -> Analysis:
        from workers.analysis.requests import submit, wait

        analysis_id = submit(self._jobs().send, self.store, kind, params, _LOCAL)
        return wait(self.store, analysis_id, progress)

    def screen_sample(self, profile_id: str, name: str, data: bytes) -> dict[str, Any]:
        import base64

        from api.broker import RedisBroker

        args = [self.store, None, profile_id, name, base64.b64encode(data).decode()]
        broker = RedisBroker(self._url, self._app())
        try:
            found: dict[str, Any] = broker.call(
                TaskName.SCREEN_SAMPLE, args, "screen", self.settings.screen_timeout_s
            )
        finally:
            broker.close()
        if "refused" in found:
            raise REFUSALS.get(found["refused"], UserError)(found["error"])
        return found


class ApiBackend:
    """Through the HTTP API: `--model` names a registered model (id or name), inputs are
    paths on the server, or local files uploaded first with `--upload`."""

    def __init__(self, settings: Settings, url: str, upload: bool = False) -> None:
        from api.client import Client

        token = settings.token.get_secret_value() if settings.token else None
        self.client = Client(url, token)
        self.store = url
        self.upload = upload

    def _status(self, job: dict[str, Any]) -> Status:
        return Status(
            job["job_id"], job["state"], "", job["n_samples"], job["n_batches"],
            job["batches_done"], job["samples_done"], job["errors"]["n_failed"],
            job["samples_per_s"], job["eta_s"], job["created"], job["finished"], job["reason"],
        )  # fmt: skip

    def _model_id(self, ref: str) -> str:
        models = self.client.request("GET", "/v1/models").json()
        for model in models:
            if ref in (model["id"], model["name"]):
                return str(model["id"])
        known = ", ".join(f"{m['name']} ({m['id']})" for m in models) or "none yet"
        raise UserError(f"no registered model {ref!r} on the API; yours: {known}")

    def scan(self, spec: ExtractionSpec, wait: bool, on_plan: OnPlan, progress: Progress) -> Status:
        from workers.extraction.inputs import discover

        options: dict[str, Any] = {
            "batch_size": spec.batch_size, "dtype": spec.dtype, "top_k": spec.top_k,
            "channels": list(spec.channels) if spec.channels else None,
            "max_size": spec.max_size, "labels_from_dirs": spec.labels_from_dirs,
            **({"gradcam": list(spec.gradcam), "gradcam_target": spec.gradcam_target}
               if spec.gradcam else {}),
            **({"squeeze": True} if spec.squeeze else {}),
            **({"benign": True} if spec.benign else {}),
        }  # fmt: skip
        if spec.compression is not None:  # else the API's default
            options["compression"] = spec.compression
        inputs: list[str] = list(spec.inputs)
        if self.upload:
            options["input_set"] = self.client.upload([s.path for s in discover(spec.inputs)])
            inputs = []
        job = self.client.submit_extraction(
            self._model_id(spec.model), inputs, spec.layers, **options
        )
        current = self._status(job.status())
        on_plan(current)
        return self.wait(job.id, progress) if wait else current

    def status(self, job_id: str) -> Status:
        return self._status(self.client.job(job_id).status())

    def list(self, state: str | None) -> list[Status]:
        return [self._status(j) for j in self.client.jobs(state)]

    def page(self, state: str | None, limit: int, cursor: str | None) -> Page:
        found, after = self.client.jobs_page(state, limit, cursor)
        return [self._status(j) for j in found], after

    def wait(self, job_id: str, progress: Progress) -> Status:
        def read() -> Status:
            current = self.status(job_id)
            progress(current)
            return current

        return poll(read, lambda s: not can_progress(s), _POLL_S)

    def cancel(self, job_id: str) -> Status:
        return self._status(self.client.job(job_id).cancel())

    def resume(self, job_id: str, wait: bool, progress: Progress) -> Status:
        current = self._status(self.client.job(job_id).resume())
        return self.wait(job_id, progress) if wait else current

    def screen_sample(self, profile_id: str, name: str, data: bytes) -> dict[str, Any]:
        return self.client.screen_sample(profile_id, data, name)

    def analyse(
        self, kind: AnalysisKind, params: dict[str, Any], progress: AnalysisProgress
    ) -> Analysis:
        found = [self.client.request("POST", f"/v1/analyses/{_ROUTES[kind]}", json=params).json()]

        def read() -> Analysis:
            if not found:  # after the answer to the POST, the analysis as it is now
                found.append(self.client.request("GET", f"/v1/analyses/{analysis_id}").json())
            got = found.pop()
            current = Analysis(
                got["analysis_id"], got["kind"], got["state"], reason=got.get("reason"),
                summary=got.get("summary") or {},
            )  # fmt: skip
            progress(current)
            return current

        analysis_id = found[0]["analysis_id"]
        return poll(read, lambda a: not a.pending, _POLL_S)


# The API's route for each analysis kind.
_ROUTES = {
    AnalysisKind.HEALTH: "health",
    AnalysisKind.SIGNATURES: "signatures",
    AnalysisKind.COMPARE: "comparisons",
    AnalysisKind.SCREENING_PROFILE: "profiles",
    AnalysisKind.EXPLAIN: "explanations",
    AnalysisKind.ATLAS: "atlas",
}


def backend_for(
    settings: Settings, store: str, api: str | None = None, upload: bool = False
) -> Backend:
    url = api or settings.api_url
    if url:
        return ApiBackend(settings, url, upload)
    if settings.broker_url is not None:
        return BrokerBackend(settings, store)
    return EmbeddedBackend(settings, store)
