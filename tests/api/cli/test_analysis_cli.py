"""`actmap health`, `compare`, `screen fit|run` and `report` as a user runs them: embedded
(the analysis is a task on the `analysis` queue, run by the in-process worker), and through
the API with the same output. The broker backend is in tests/integration."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
from fastapi.testclient import TestClient

from api.cli.main import main
from api.client import Client
from tests.api.test_analyses import wide_api
from workers.analysis import analyses, requests
from workers.execution.celery_app import CeleryQueue

SAMPLES = Path(__file__).parents[3] / "workers" / "demo" / "samples"


def _last(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return found


@pytest.fixture
def scanned(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    store = str(tmp_path / "store")
    argv = ["scan", str(SAMPLES), "--model", "digits-cnn", "--layers", "conv1,conv3,fc",
            "--labels-from-dirs", "--out", store, "--json"]  # fmt: skip
    assert main(argv) == 0
    return store, str(_last(capsys)["job_id"])


def test_atlas_prints_each_channels_strongest_response_and_opens_in_xarray(
    scanned: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    store, job_id = scanned
    assert main(["atlas", job_id, "--layer", "conv3", "--top", "3", "--store", store]) == 0
    shown = capsys.readouterr().out
    assert "conv3: strongest response per channel" in shown
    assert (
        main(["atlas", job_id, "--layer", "conv3", "--top", "3", "--store", store, "--json"]) == 0
    )
    found = _last(capsys)
    tree = xr.open_datatree(f"{store}/analyses/{found['analysis_id']}", engine="zarr")
    assert tree["layers/conv3"]["value"].shape == (64, 3)
    assert main(["atlas", job_id, "--layer", "fc", "--store", store]) == 2  # no 2-d maps
    assert capsys.readouterr().err.count("\n") == 1


def test_health_and_compare_print_an_analysis_that_opens_in_xarray(
    scanned: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    store, job_id = scanned
    assert main(["health", job_id, "--store", store, "--json"]) == 0
    health = _last(capsys)
    assert health["kind"] == "health"
    tree = xr.open_datatree(f"{store}/analyses/{health['analysis_id']}", engine="zarr")
    assert tree["layers/conv3"]["on_rate"].dims == ("channel",)
    argv = [
        "compare",
        job_id,
        "--a",
        "correct=true",
        "--b",
        "correct=false",
        "--store",
        store,
        "--json",
    ]
    assert main(argv) == 0
    assert _last(capsys)["kind"] == "compare"


def test_an_analysis_is_sent_to_the_analysis_queue_and_run_by_the_worker_thread(
    scanned: tuple[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, job_id = scanned
    sent: list[tuple[str, str]] = []
    ran_in: list[str] = []
    send, run = CeleryQueue.send, requests.run_analysis

    def recording_send(self: CeleryQueue, task: str, args: list[Any], queue: str) -> None:
        sent.append((task, queue))
        send(self, task, args, queue)

    def recording_run(*args: Any) -> str:
        ran_in.append(threading.current_thread().name)
        return run(*args)

    monkeypatch.setattr(CeleryQueue, "send", recording_send)
    monkeypatch.setattr(requests, "run_analysis", recording_run)
    assert main(["health", job_id, "--layers", "fc", "--store", store, "--json"]) == 0
    assert _last(capsys)["state"] == "succeeded"
    assert sent == [("actmap.analyse", "analysis")]
    assert ran_in == ["actmap-worker"]  # embedded.py's worker thread, not this one


def test_a_selection_a_person_cannot_mean_is_a_one_line_error(
    scanned: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    store, job_id = scanned
    assert main(["compare", job_id, "--a", "colour=red", "--store", store]) == 2
    assert "cannot read selection 'colour=red'" in capsys.readouterr().err
    assert main(["compare", job_id, "--a", "label=seven", "--store", store]) == 2
    assert "cannot read selection 'label=seven'" in capsys.readouterr().err
    assert main(["health", "nope", "--store", store]) == 2
    err = capsys.readouterr().err
    assert err.startswith("actmap: error: no job 'nope'")
    assert err.count("\n") == 1


def test_a_bug_in_an_analysis_is_a_one_line_internal_error_not_a_user_error(
    scanned: tuple[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, job_id = scanned

    def broken(*_: object, **__: object) -> str:
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(analyses, "run_health", broken)
    assert main(["health", job_id, "--store", store, "--json"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("actmap: analysis ")
    assert err[-1].endswith("failed: internal error: ZeroDivisionError('planted')")


def test_through_the_api_health_and_compare_print_what_the_embedded_run_prints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    api = wide_api(tmp_path / "api")
    inputs = api.roots["acme"] / "all"
    layers = ["conv1", "conv3", "fc"]
    with api.client:
        model_id = api.register()
        accepted = api.submit(model_id, inputs=[str(inputs)], labels_from_dirs=True, layers=layers)
        remote_job = accepted.json()["job_id"]
        # The CLI's HTTP client, answered by the app in this process.
        monkeypatch.setattr(
            "api.client.httpx.Client",
            lambda base_url, headers, **_: TestClient(
                api.client.app, base_url=base_url, headers=headers
            ),
        )
        monkeypatch.setenv("ACTMAP_TOKEN", api.tokens["acme"])
        url = "http://actmap.test"
        assert main(["health", remote_job, "--api", url, "--json"]) == 0
        remote = _last(capsys)
        argv = ["compare", remote_job, "--a", "label=1", "--b", "label=7", "--api", url, "--json"]
        assert main(argv) == 0
        remote_compare = _last(capsys)
        assert main(["atlas", remote_job, "--layer", "conv3", "--top", "2", "--api", url]) == 0
        assert "conv3: strongest response per channel" in capsys.readouterr().out
        with Client(url, api.tokens["acme"]) as client:
            atlas = client.atlas(remote_job, "conv3", top=2)
        assert (atlas["state"], atlas["summary"]["layers"]["conv3"]["top"]) == ("succeeded", 2)
        assert main(["health", "nope", "--api", url]) == 2
        assert capsys.readouterr().err.startswith("actmap: error: no job 'nope'")
    store = str(tmp_path / "store")
    argv = ["scan", str(inputs), "--model", "digits-cnn", "--layers", ",".join(layers),
            "--labels-from-dirs", "--out", store, "--json"]  # fmt: skip
    assert main(argv) == 0
    local_job = _last(capsys)["job_id"]
    assert main(["health", local_job, "--store", store, "--json"]) == 0
    local = _last(capsys)
    argv = ["compare", local_job, "--a", "label=1", "--b", "label=7", "--store", store, "--json"]
    assert main(argv) == 0
    local_compare = _last(capsys)
    assert remote.keys() == local.keys()
    assert (remote["store"], local["store"]) == (url, store)
    assert remote["kind"] == local["kind"] == "health"
    assert remote["layers"] == local["layers"]  # the same samples and model: the same filters
    assert remote_compare.keys() == local_compare.keys()
    assert remote_compare["layers"] == local_compare["layers"]


def test_screen_fit_then_run_flags_what_does_not_look_like_the_reference(
    scanned: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, job_id = scanned
    assert (
        main(["screen", "fit", "--reference", job_id, "--fpr", "0.2", "--store", store, "--json"])
        == 0
    )
    profile = str(_last(capsys)["profile_id"])
    noise = tmp_path / "noise.npy"
    np.save(noise, (np.random.default_rng(1).standard_normal((1, 28, 28)) * 4).astype(np.float32))
    assert (
        main(["screen", "run", str(noise), "--profile", profile, "--store", store, "--json"]) == 0
    )
    result = _last(capsys)
    assert result["state"] == "succeeded"
    assert result["n_flagged"] == 1


def test_screen_fit_prints_its_rate_and_weights_and_run_prints_threshold_and_count(
    scanned: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, job_id = scanned
    argv = ["screen", "fit", "--reference", job_id, "--fpr", "0.2", "--store", store]
    assert main([*argv, "--detectors", "mahalanobis,margin", "--combine", "mean"]) == 0
    out = capsys.readouterr().out
    assert "realised" in out
    assert "weight carried by:" in out
    assert "combine mean" in out
    profile = out.split()[1]
    noise = tmp_path / "noise.npy"
    np.save(noise, (np.random.default_rng(1).standard_normal((1, 28, 28)) * 4).astype(np.float32))
    assert main(["screen", "run", str(noise), "--profile", profile, "--store", store]) == 0
    assert "1 of 1 flagged (score above the threshold" in capsys.readouterr().out
    argv = [*argv, "--detectors", "odin", "--json"]
    assert main(argv) != 0


def test_report_writes_a_static_page_with_relative_images(
    scanned: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, job_id = scanned
    out = tmp_path / "report"
    assert main(["report", job_id, "--out", str(out), "--store", store, "--json"]) == 0
    page = Path(str(_last(capsys)["report"]))
    assert page == (out / "index.html").resolve()
    html = page.read_text()
    assert 'src="img/' in html
    assert "http://" not in html.replace("http://127.0.0.1", "")
    assert any((out / "img").glob("*.png"))


def test_a_jobs_report_shows_its_stored_comparisons(
    scanned: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, job_id = scanned
    argv = ["compare", job_id, "--a", "label=1", "--b", "label=7", "--store", store, "--json"]
    assert main(argv) == 0
    analysis_id = _last(capsys)["analysis_id"]
    out = tmp_path / "report"
    assert main(["report", job_id, "--out", str(out), "--store", store]) == 0
    html = (out / "index.html").read_text()
    assert f"Comparison {analysis_id}" in html
