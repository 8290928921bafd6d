"""The API with a real store and an in-memory broker that runs each task in line, through
the same worker functions a Celery worker calls."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.broker import MemoryBroker
from workers.analysis.requests import run_analysis
from workers.demo.digits import WEIGHTS
from workers.execution.registration import register_model
from workers.execution.screen_one import Screeners, answer
from workers.extraction.cache import ModelCache
from workers.jobs import TaskName
from workers.lifecycle.counters import Counters, MemoryCounters
from workers.lifecycle.delivery import Runtime, execute_batches
from workers.pipeline import Extraction
from workers.settings import Settings

FACTORY = "workers.demo.digits:digits_cnn"
SAMPLES = Path(__file__).parents[2] / "workers" / "demo" / "samples"


@dataclass
class Api:
    client: TestClient
    broker: MemoryBroker
    store: Path
    roots: dict[str, Path]
    tokens: dict[str, str]
    settings: Settings

    def as_(self, tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[tenant]}"}

    def register(self, tenant: str = "acme") -> str:
        with WEIGHTS.open("rb") as f:
            response = self.client.post(
                "/v1/models", headers=self.as_(tenant),
                data={"name": "digits", "factory": FACTORY},
                files={"weights": ("w.safetensors", f, "application/octet-stream")},
            )  # fmt: skip
        assert response.status_code == 202, response.text
        model_id: str = response.json()["id"]
        return model_id

    def submit(self, model_id: str, tenant: str = "acme", **body: Any) -> Any:
        payload = {"model_id": model_id, "layers": ["conv1", "fc"], **body}
        payload.setdefault("inputs", [str(self.roots[tenant])])
        return self.client.post("/v1/jobs/extractions", headers=self.as_(tenant), json=payload)


def _inline(settings: Settings, counters: Counters | None = None) -> Any:
    runtime = Runtime(
        Extraction(ModelCache(factories=settings.factories)), counters or MemoryCounters()
    )

    models, screeners = ModelCache(factories=settings.factories), Screeners()

    def run(task: str, args: list[Any]) -> Any:
        if task == TaskName.SCREEN_SAMPLE:
            store, tenant, profile_id, name, data = args
            return answer(store, tenant, profile_id, name, data, models, screeners)
        if task == TaskName.REGISTER_MODEL:
            store, tenant, model_id = args
            register_model(store, tenant, model_id, settings.factories)
        elif task == TaskName.ANALYSE:
            store, kind, params, analysis_id, tenant = args
            run_analysis(store, kind, params, analysis_id, tenant)
        elif task == TaskName.RUN_BATCH:
            store, job_id, batches = args
            execute_batches(store, job_id, batches, runtime)
        return None  # only the screening of one sample is waited for

    return run


def make_api(
    tmp_path: Path,
    run_tasks: bool = True,
    quotas: dict[str, int] | None = None,
    counters: Counters | None = None,
    **settings_given: Any,
) -> Api:
    roots = {name: tmp_path / f"{name}-data" for name in ("acme", "other")}
    for name, root in roots.items():
        for digit in ("3", "7"):
            (root / digit).mkdir(parents=True)
            for png in sorted((SAMPLES / digit).glob("*.png"))[:2]:
                (root / digit / png.name).write_bytes(png.read_bytes())
        _ = name
    tokens = {"acme": "acme-secret-token", "other": "other-secret-token"}
    auth = {
        "tenants": {
            name: {"tokens": [tokens[name]], "roots": [str(roots[name])], "quotas": quotas or {}}
            for name in roots
        }
    }
    auth_file = tmp_path / "auth.json"
    auth_file.write_text(json.dumps(auth))
    settings_given.setdefault("store", str(tmp_path / "store"))
    settings = Settings(
        auth_file=str(auth_file),
        factories=(FACTORY,),
        **settings_given,
    )
    counters = counters or MemoryCounters()
    broker = MemoryBroker(_inline(settings, counters) if run_tasks else None, counters)
    client = TestClient(create_app(settings, broker))
    return Api(client, broker, tmp_path / "store", roots, tokens, settings)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    found = make_api(tmp_path)
    with found.client:
        yield found
