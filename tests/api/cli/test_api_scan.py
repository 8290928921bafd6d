"""`actmap scan --api` prints the summary an embedded scan prints, also when the API's store
is not reachable from the client (the API's side answers it: GET /v1/jobs/{id}/summary)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.cli.main import main
from tests.api.conftest import Api, make_api


def _through(api: Api, monkeypatch: pytest.MonkeyPatch) -> str:
    """The CLI's HTTP client answered by the app in this process."""
    monkeypatch.setattr(
        "api.client.httpx.Client",
        lambda base_url, headers, **_: TestClient(
            api.client.app, base_url=base_url, headers=headers
        ),
    )
    monkeypatch.setenv("ACTMAP_TOKEN", api.tokens["acme"])
    return "http://actmap.test"


def test_the_summary_route_answers_what_the_job_holds_to_its_owner_only(api: Api) -> None:
    accepted = api.submit(api.register(), labels_from_dirs=True, layers=["conv1", "fc"])
    job_id = accepted.json()["job_id"]
    found = api.client.get(f"/v1/jobs/{job_id}/summary", headers=api.as_("acme"))
    assert found.status_code == 200, found.text
    summary = found.json()
    assert (summary["correct"], summary["labelled"]) == (4, 4)  # two 3s and two 7s, all right
    assert [(s["name"], s["acts"], s["pooled"]) for s in summary["layers"]] == [
        ("conv1", [4, 16, 28, 28], [4, 16]),
        ("fc", [4, 10], [4, 10]),
    ]
    assert (summary["skipped"], summary["failures"]) == (0, [])
    other = api.client.get(f"/v1/jobs/{job_id}/summary", headers=api.as_("other"))
    assert other.status_code == 404


def test_a_scan_through_an_api_whose_store_is_out_of_reach_prints_accuracy_and_shapes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An fsspec URL: the API reaches the store, this client does not (as with S3).
    api = make_api(tmp_path, store=(tmp_path / "store").absolute().as_uri())
    with api.client:
        model_id = api.register()
        url = _through(api, monkeypatch)
        inputs = str(api.roots["acme"])
        argv = ["scan", inputs, "--model", model_id, "--layers", "conv1,fc", "--api", url,
                "--labels-from-dirs"]  # fmt: skip
        assert main(argv) == 0
    out = capsys.readouterr().out
    assert "accuracy on labelled samples: 4/4 (100.0%)" in out
    assert "conv1: acts (4, 16, 28, 28) float16, pooled (4, 16)" in out
    assert "fc: acts (4, 10) float16, pooled (4, 10)" in out
    assert "on the API's side; fetch them with" in out
