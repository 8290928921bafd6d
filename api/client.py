"""`Client(url, token)`: the Python client of the HTTP API. Importable without torch.

    client = Client("http://actmap:8000", token)
    model = client.register_model("digits", weights="w.safetensors", factory="pkg.mod:fn")
    job = client.submit_extraction(model, ["/data/acme/samples"], layers=["conv1"])
    job.wait(progress=True)
    acts = job.fetch("conv1", samples=["3/0001.png"])   # numpy, over HTTP
    tree = job.open()                                    # xarray, when the store is reachable

Connection errors and 5xx answers are retried with backoff; every submission carries an
idempotency key, so a retried POST never makes two jobs.
"""

from __future__ import annotations

import io
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from workers.errors import ActmapError, Conflict, NotFound, UserError
from workers.jobs import poll

__all__ = ["ApiError", "Client", "Job", "Refused"]

_FINISHED = {"succeeded", "partial", "failed", "cancelled"}


class ApiError(ActmapError):
    """Raised when the API keeps failing (5xx after the retries)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{message} (HTTP {status})")
        self.status = status


class Refused(UserError):
    """Raised when the API refuses a request the caller can fix (4xx); says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{message} (HTTP {status})")
        self.status = status


class Client:
    def __init__(
        self, url: str, token: str | None = None, retries: int = 5, timeout: float = 60.0
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.retries = retries

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call, retried on connection errors and 5xx with exponential backoff."""
        delay = 0.2
        for attempt in range(self.retries + 1):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise ActmapError(
                        f"cannot reach the actmap API at {self._http.base_url}: {exc}"
                    ) from None
            else:
                if response.status_code < 500 or attempt == self.retries:
                    return _checked(response)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    def register_model(
        self,
        name: str,
        archive: str | Path | None = None,
        weights: str | Path | None = None,
        factory: str | None = None,
        path: str | None = None,
        wait: bool = True,
        timeout: float = 300,
    ) -> str:
        """Upload a `.pt2`, or weights with a factory, or name a server path; returns the
        model id once its catalogue is ready (with `wait`)."""
        data = {
            "name": name,
            **({"factory": factory} if factory else {}),
            **({"path": path} if path else {}),
        }
        files = {}
        if archive is not None:
            files["archive"] = (Path(archive).name, Path(archive).read_bytes())
        if weights is not None:
            files["weights"] = (Path(weights).name, Path(weights).read_bytes())
        model = self.request("POST", "/v1/models", data=data, files=files or None).json()
        deadline = time.monotonic() + timeout
        while wait and model["state"] == "pending" and time.monotonic() < deadline:
            time.sleep(0.2)
            model = self.request("GET", f"/v1/models/{model['id']}").json()
        if model["state"] == "failed":
            raise UserError(f"model {name} could not be registered: {model['error']}")
        model_id: str = model["id"]
        return model_id

    def upload(self, files: Sequence[str | Path]) -> str:
        """Upload local files, each named by its path below the folder that holds all
        their folders (`3/a.png`), so folder labels work on the server; returns an
        input-set id to scan."""
        paths = [Path(f).absolute() for f in files]
        top = Path(os.path.commonpath([p.parent.parent for p in paths])) if paths else Path()
        parts = [("files", (p.relative_to(top).as_posix(), p.read_bytes())) for p in paths]
        input_set: str = self.request("POST", "/v1/inputs", files=parts).json()["input_set"]
        return input_set

    def submit_extraction(
        self, model_id: str, inputs: Sequence[str] = (), layers: Sequence[str] = (), **options: Any
    ) -> Job:
        body = {"model_id": model_id, "inputs": list(inputs), "layers": list(layers), **options}
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        accepted = self.request("POST", "/v1/jobs/extractions", json=body, headers=headers).json()
        return Job(self, accepted["job_id"])

    def analysis(self, analysis_id: str) -> dict[str, Any]:
        """An analysis as it is now: kind, state, reason and summary."""
        found: dict[str, Any] = self.request("GET", f"/v1/analyses/{analysis_id}").json()
        return found

    def atlas(
        self, job_id: str, layer: str, top: int = 9, wait: bool = True, timeout: float = 600
    ) -> dict[str, Any]:
        """Queue the filter atlas of `layer`; with `wait`, poll until it has finished.
        Its arrays are under `analyses/{analysis_id}` in the store; its channel sheets
        at GET /v1/analyses/{id}/channels/{c}.png."""
        return self._analyse("atlas", {"job_id": job_id, "layer": layer, "top": top}, wait, timeout)

    def explain(
        self, job_id: str, layer: str, top: int = 5, wait: bool = True, timeout: float = 600
    ) -> dict[str, Any]:
        """Queue `actmap explain` of a layer scanned with Grad-CAM; with `wait`, poll until
        it has finished. Its summary names, per class, the channels most often on the
        evidence; its arrays are under `analyses/{analysis_id}` in the store."""
        body = {"job_id": job_id, "layer": layer, "top": top}
        return self._analyse("explanations", body, wait, timeout)

    def screen_sample(self, profile_id: str, data: bytes, name: str = "sample") -> dict[str, Any]:
        """Screen one sample now with a fitted profile: its bytes (an image, a `.npy`
        array or a binary, decoded by the suffix of `name`). Returns the score, the flag,
        the threshold and the model's prediction; nothing is stored."""
        found: dict[str, Any] = self.request(
            "POST", f"/v1/analyses/{profile_id}/screen", params={"name": name}, content=data,
            headers={"Content-Type": "application/octet-stream"},
        ).json()  # fmt: skip
        return found

    def _analyse(
        self, route: str, body: dict[str, Any], wait: bool, timeout: float
    ) -> dict[str, Any]:
        """Queue an analysis at /v1/analyses/{route}; with `wait`, poll until it finished."""
        found: dict[str, Any] = self.request("POST", f"/v1/analyses/{route}", json=body).json()
        if not wait:
            return found
        return poll(
            lambda: self.analysis(found["analysis_id"]),
            lambda a: a["state"] not in ("queued", "running"), 0.2, timeout, grow=1.5, most=2.0,
        )  # fmt: skip

    def job(self, job_id: str) -> Job:
        return Job(self, job_id)

    def jobs(self, state: str | None = None) -> list[dict[str, Any]]:
        return list(self.iter_jobs(state))

    def jobs_page(
        self, state: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page, newest first, and the cursor of the next (None after the last)."""
        params: dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = state
        if cursor:
            params["cursor"] = cursor
        response = self.request("GET", "/v1/jobs", params=params)
        found: list[dict[str, Any]] = response.json()
        return found, response.headers.get("X-Next-Cursor")

    def iter_jobs(self, state: str | None = None, page_size: int = 50) -> Iterator[dict[str, Any]]:
        """Every job of yours, newest first, fetched a page at a time as it is consumed."""
        cursor: str | None = None
        while True:
            found, cursor = self.jobs_page(state, page_size, cursor)
            yield from found
            if cursor is None:
                return


class Job:
    """A handle on one job of the API."""

    def __init__(self, client: Client, job_id: str) -> None:
        self.client = client
        self.id = job_id

    def status(self) -> dict[str, Any]:
        found: dict[str, Any] = self.client.request("GET", f"/v1/jobs/{self.id}").json()
        return found

    def summary(self) -> dict[str, Any]:
        """Accuracy counts, stored shapes, skipped files and first failures."""
        found: dict[str, Any] = self.client.request("GET", f"/v1/jobs/{self.id}/summary").json()
        return found

    def wait(
        self, progress: bool = False, timeout: float | None = None, poll: float = 0.2
    ) -> dict[str, Any]:
        """Poll until the job finishes; a rich progress bar on a terminal with `progress`."""
        from rich.progress import Progress

        deadline = None if timeout is None else time.monotonic() + timeout
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task(f"job {self.id}", total=None)
            while True:
                current = self.status()
                bar.update(task, total=current["n_samples"], completed=current["samples_done"])
                if current["state"] in _FINISHED:
                    return current
                if deadline is not None and time.monotonic() > deadline:
                    return current
                time.sleep(poll)

    def cancel(self) -> dict[str, Any]:
        found: dict[str, Any] = self.client.request("POST", f"/v1/jobs/{self.id}/cancel").json()
        return found

    def resume(self) -> dict[str, Any]:
        found: dict[str, Any] = self.client.request("POST", f"/v1/jobs/{self.id}/resume").json()
        return found

    def fetch(
        self,
        layer: str,
        samples: Sequence[str] | None = None,
        channels: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Activations of `layer` for the chosen samples (and channels), as numpy."""
        params: dict[str, Any] = {}
        if samples is not None:
            params["samples"] = ",".join(samples)
            params["limit"] = max(1, min(len(samples), 1000))
        if channels is not None:
            params["channels"] = ",".join(map(str, channels))
        response = self.client.request(
            "GET", f"/v1/jobs/{self.id}/layers/{layer}/activations", params=params
        )
        values: np.ndarray = np.load(io.BytesIO(response.content), allow_pickle=False)
        return values

    def explain(
        self, layer: str, top: int = 5, wait: bool = True, timeout: float = 600
    ) -> dict[str, Any]:
        """`Client.explain` of this job."""
        return self.client.explain(self.id, layer, top, wait, timeout)

    def open(self) -> Any:
        """The job as an xarray DataTree straight from the store, when this host reaches it."""
        import xarray as xr

        where = self.client.request("GET", f"/v1/jobs/{self.id}/store").json()
        return xr.open_datatree(f"{where['store']}/{where['group']}", engine="zarr")


def _checked(response: httpx.Response) -> httpx.Response:
    if response.is_success:
        return response
    try:
        message = str(response.json().get("detail", response.text))
    except ValueError:
        message = response.text
    if response.status_code == 404:
        raise NotFound(message)
    if response.status_code == 409:
        raise Conflict(message)
    if response.status_code < 500:
        raise Refused(response.status_code, message)
    raise ApiError(response.status_code, message)
