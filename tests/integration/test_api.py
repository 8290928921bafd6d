"""The API for real: uvicorn, a private Redis and a real worker process; the Python client
and `actmap --api` on the other side."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from api.client import Client
from tests.integration.conftest import ROOT, Cluster, free_port, serving, until
from tests.oracle import planned, run_job
from workers.demo.digits import WEIGHTS
from workers.errors import Conflict
from workers.extraction.cache import ModelCache
from workers.jobs import ExtractionSpec
from workers.storage.layout import open_job, read

FACTORY = "workers.demo.digits:digits_cnn"
SAMPLES = ROOT / "workers" / "demo" / "samples"
TOKEN = "integration-token"


@pytest.fixture
def server(cluster: Cluster, tmp_path: Path) -> Iterator[str]:
    data = tmp_path / "data"
    data.mkdir()
    for digit in ("1", "8"):
        shutil.copytree(SAMPLES / digit, data / digit)
    auth = {"tenants": {"acme": {"tokens": [TOKEN], "roots": [str(data), str(SAMPLES)]}}}
    (tmp_path / "auth.json").write_text(json.dumps(auth))
    cluster.env["ACTMAP_AUTH_FILE"] = str(tmp_path / "auth.json")
    cluster.env["ACTMAP_FACTORIES"] = json.dumps([FACTORY])
    with serving(cluster.env) as url:
        cluster.start(workers=1)
        yield url


def test_a_client_submits_waits_and_fetches_what_an_in_process_run_stores(
    server: str, tmp_path: Path
) -> None:
    with Client(server, TOKEN) as client:
        model_id = client.register_model("digits", weights=WEIGHTS, factory=FACTORY)
        data = str(tmp_path / "data")
        job = client.submit_extraction(model_id, [data], ["conv1", "fc"], batch_size=3)
        final = job.wait(timeout=120)
        assert final["state"] == "succeeded"
        assert final["n_samples"] == 8
        with pytest.raises(Conflict, match="succeeded"):  # as cancel raises embedded
            job.cancel()
        ids = client.request("GET", f"/v1/jobs/{job.id}/samples").json()["samples"]
        fetched = job.fetch("conv1", samples=ids, channels=[1, 2])
        tree = job.open()
    models = ModelCache(factories=(FACTORY,))
    spec = ExtractionSpec(
        model=FACTORY, weights=str(WEIGHTS), layers=("conv1", "fc"), inputs=(data,), batch_size=3
    )
    ref = planned(str(tmp_path / "ref"), spec, models.get(spec).info)
    run_job(str(tmp_path / "ref"), ref.job_id, models)
    want = read(open_job(str(tmp_path / "ref"), ref.job_id, mode="r"), "layers/conv1/acts")
    np.testing.assert_array_equal(fetched, want[:, [1, 2]])
    assert tree["layers/fc"]["acts"].shape == (8, 10)


def test_actmap_scan_through_the_api_has_the_same_output_and_exit_codes(
    server: str, cluster: Cluster
) -> None:
    with Client(server, TOKEN) as client:
        client.register_model("digits", weights=WEIGHTS, factory=FACTORY)
    env = {**cluster.env, "ACTMAP_API_URL": server, "ACTMAP_TOKEN": TOKEN}
    env.pop("ACTMAP_BROKER_URL")

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "api.cli.main", *argv], env=env, cwd=ROOT,
            capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip

    uploaded = cli("scan", str(SAMPLES / "2"), "--model", "digits", "--layers", "fc",
                   "--upload", "--json")  # fmt: skip
    assert uploaded.returncode == 0, uploaded.stderr
    result = json.loads(uploaded.stdout.splitlines()[-1])
    assert result["state"] == "succeeded"
    assert result["n_samples"] == 4
    status = cli("jobs", "status", result["job_id"], "--json")
    assert json.loads(status.stdout)["samples_done"] == 4
    refused = cli("scan", "/etc", "--model", "digits", "--layers", "fc")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "actmap: error: input /etc is not inside your allowed roots (HTTP 422)"
    ]
    no_model = cli("scan", str(SAMPLES / "2"), "--model", "nope", "--layers", "fc")
    assert no_model.returncode == 2
    assert "no registered model 'nope'" in no_model.stderr
    assert os.environ.get("ACTMAP_TOKEN") != TOKEN


def test_without_an_auth_file_serve_listens_on_loopback_only_and_says_so(cluster: Cluster) -> None:
    env = {k: v for k, v in cluster.env.items() if k != "ACTMAP_AUTH_FILE"}
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.cli.main", "serve", "--host", "0.0.0.0", "--port", str(port)],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:

        def listening() -> list[str]:
            conns = psutil.Process(proc.pid).net_connections(kind="tcp")
            return [c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN]

        addresses = until(listening, 60, "the server to listen")
        assert addresses == ["127.0.0.1"]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    said = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert any("listening on loopback only" in entry["message"] for entry in said)
