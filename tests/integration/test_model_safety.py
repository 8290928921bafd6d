"""Registering a hostile model through a real `actmap serve` and `actmap worker`: an archive
that would run code is refused with its reason and runs nothing; a model whose first load
needs too much memory or never ends fails its registration, and the worker goes on serving."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.extraction.hostile import genuine, hostile
from tests.integration.conftest import Cluster, serving, until
from workers.demo.digits import WEIGHTS

TOKEN = "integration-token"
SLEEPY = "tests.extraction.hostile:sleepy_net"
HUNGRY = "tests.extraction.hostile:hungry_net"


@pytest.fixture
def server(cluster: Cluster, tmp_path: Path) -> Iterator[str]:
    auth = {"tenants": {"acme": {"tokens": [TOKEN], "roots": [str(tmp_path)]}}}
    (tmp_path / "auth.json").write_text(json.dumps(auth))
    cluster.env["ACTMAP_AUTH_FILE"] = str(tmp_path / "auth.json")
    cluster.env["ACTMAP_FACTORIES"] = json.dumps([SLEEPY, HUNGRY])
    cluster.env["ACTMAP_MODEL_CHECK_MEMORY_MB"] = "1024"
    cluster.env["ACTMAP_MODEL_CHECK_TIMEOUT_S"] = "60"
    with serving(cluster.env) as url:
        cluster.start(workers=1)
        yield url


def _register(url: str, data: dict[str, str], files: dict[str, Any]) -> dict[str, Any]:
    """POST /v1/models, then the record once the worker has decided."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    sent = httpx.post(f"{url}/v1/models", headers=headers, data=data, files=files, timeout=30)
    assert sent.status_code == 202, sent.text
    model_id = sent.json()["id"]

    def decided() -> dict[str, Any] | None:
        got = httpx.get(f"{url}/v1/models/{model_id}", headers=headers, timeout=30).json()
        return got if got["state"] != "pending" else None

    record: dict[str, Any] = until(decided, 240, f"model {model_id} to be decided", every=0.2)
    return record


def _archive(path: Path) -> dict[str, Any]:
    return {"archive": (path.name, path.read_bytes(), "application/octet-stream")}


def test_a_hostile_archive_fails_its_registration_and_runs_nothing_on_the_worker(
    server: str, tmp_path: Path
) -> None:
    marker = tmp_path / "MARKER"
    for kind in ("weights marked use_pickle", "a symbolic shape"):
        path = hostile(kind, tmp_path / "evil.pt2", marker)
        record = _register(server, {"name": "evil"}, _archive(path))
        assert not marker.exists()
        assert record["state"] == "failed"
        assert "refused" in record["error"]
        assert "\n" not in record["error"]


def test_a_first_load_past_its_limits_fails_and_the_worker_goes_on_serving(
    server: str, tmp_path: Path
) -> None:
    def weights() -> dict[str, Any]:
        return {"weights": ("w.safetensors", WEIGHTS.read_bytes(), "application/octet-stream")}

    hungry = _register(server, {"name": "hungry", "factory": HUNGRY}, weights())
    assert hungry["state"] == "failed"
    assert "1024 MiB" in hungry["error"]
    sleepy = _register(server, {"name": "sleepy", "factory": SLEEPY}, weights())
    assert sleepy["state"] == "failed"
    assert "took longer than 60 s" in sleepy["error"]
    good = _register(server, {"name": "tiny"}, _archive(genuine(tmp_path / "tiny.pt2")))
    assert good["state"] == "ready", good
