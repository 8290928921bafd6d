"""`actmap` against a real `actmap serve` (issue 17, point 5): the same commands and output
as embedded, or a clear refusal."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT, Cluster, serving, until
from workers.demo.digits import WEIGHTS

FACTORY = "workers.demo.digits:digits_cnn"
SAMPLES = ROOT / "workers" / "demo" / "samples"
TOKEN = "cli-api-token"


@pytest.fixture
def api(cluster: Cluster, tmp_path: Path) -> Iterator[dict[str, str]]:
    data = tmp_path / "data"
    shutil.copytree(SAMPLES, data)
    auth = {"tenants": {"acme": {"tokens": [TOKEN], "roots": [str(data)]}}}
    (tmp_path / "auth.json").write_text(json.dumps(auth))
    cluster.env["ACTMAP_AUTH_FILE"] = str(tmp_path / "auth.json")
    cluster.env["ACTMAP_FACTORIES"] = json.dumps([FACTORY])
    with serving(cluster.env) as url:
        # One worker on every queue: scans, analyses and screenings (the fixture stops it).
        cluster.launcher = subprocess.Popen(
            [sys.executable, "-m", "api.cli.main", "worker", "--cpu", "1"],
            env=cluster.env, cwd=ROOT, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        app = cluster.app()
        until(lambda: len(app.control.ping(timeout=0.5)) >= 1, 120, "a worker")
        env = {**cluster.env, "ACTMAP_API_URL": url, "DATA": str(data)}
        env.pop("ACTMAP_BROKER_URL")
        yield env


def _cli(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api.cli.main", *argv], env=env, cwd=ROOT,
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_the_cli_through_the_api_registers_scans_reports_and_screens(
    api: dict[str, str], tmp_path: Path
) -> None:
    data = api["DATA"]
    unknown = _cli(api, "models", "list", "--token", "wrong")
    assert unknown.returncode == 2
    assert "--token" in unknown.stderr
    assert "ACTMAP_TOKEN" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    token = ("--token", TOKEN)
    registered = _cli(api, "models", "register", "digits", "--weights", str(WEIGHTS),
                      "--factory", FACTORY, *token)  # fmt: skip
    assert registered.returncode == 0, registered.stderr
    listed = _cli(api, "models", "list", "--json", *token)
    assert [m["name"] for m in json.loads(listed.stdout)["models"]] == ["digits"]
    report = tmp_path / "report"
    scanned = _cli(api, "scan", data, "--model", "digits", "--layers", "conv1,fc",
                   "--labels-from-dirs", "--report", str(report), *token)  # fmt: skip
    assert scanned.returncode == 0, scanned.stderr
    assert "accuracy on labelled samples: 38/40" in scanned.stdout
    assert "conv1: acts (40, 16, 28, 28)" in scanned.stdout
    assert "results in" in scanned.stdout
    assert (report / "index.html").is_file()
    job = scanned.stdout.split()[1]
    fitted = _cli(api, "screen", "fit", "--reference", job, "--json", *token)
    assert fitted.returncode == 0, fitted.stderr
    profile = json.loads(fitted.stdout.splitlines()[-1])["profile_id"]
    screened = _cli(api, "screen", "run", "--profile", profile, f"{data}/3", *token)
    assert screened.returncode == 0, screened.stderr
    assert "flagged (score above the threshold" in screened.stdout


def test_models_register_without_an_api_is_refused_in_one_line(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "ACTMAP_STORE": str(tmp_path)}
    refused = _cli(env, "models", "register", "digits", "--weights", str(WEIGHTS),
                   "--factory", FACTORY)  # fmt: skip
    assert refused.returncode == 2
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "needs the API" in refused.stderr
