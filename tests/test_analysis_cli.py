"""`actmap health`, `compare`, `screen fit|run` and `report` as a user runs them, embedded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from api.cli import main

SAMPLES = Path(__file__).parents[1] / "workers" / "demo" / "samples"


def _last(capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    found: dict[str, object] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return found


@pytest.fixture
def scanned(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    store = str(tmp_path / "store")
    argv = ["scan", str(SAMPLES), "--model", "digits-cnn", "--layers", "conv1,conv3,fc",
            "--labels-from-dirs", "--out", store, "--json"]  # fmt: skip
    assert main(argv) == 0
    return store, str(_last(capsys)["job_id"])


def test_health_and_compare_print_an_analysis_that_opens_in_xarray(
    scanned: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    store, job_id = scanned
    assert main(["health", job_id, "--store", store, "--json"]) == 0
    health = _last(capsys)
    assert health["kind"] == "health"
    tree = xr.open_datatree(store, group=f"analyses/{health['analysis_id']}", engine="zarr")
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


def test_a_selection_a_person_cannot_mean_is_a_one_line_error(
    scanned: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    store, job_id = scanned
    assert main(["compare", job_id, "--a", "colour=red", "--store", store]) == 2
    assert "cannot read selection 'colour=red'" in capsys.readouterr().err
    assert main(["health", "nope", "--store", store]) == 2


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
