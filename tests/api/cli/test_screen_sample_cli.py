"""`actmap screen sample --profile P FILE...` as a user runs it: each file answered now,
without a job, embedded and through the API with the same answers; a file that cannot be
screened is one line and the others go on. The broker path is in tests/integration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.cli.main import main
from tests.api.test_analyses import fitted_profile, wide_api
from workers.storage.layout import JOBS, open_job, read

SAMPLES = Path(__file__).parents[3] / "workers" / "demo" / "samples"


def _last(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return found


def _files(folder: Path) -> list[Path]:
    noise = folder / "noise.npy"
    np.save(noise, (np.random.default_rng(1).standard_normal((1, 28, 28)) * 4).astype(np.float32))
    bad = folder / "bad.npy"
    np.save(bad, np.zeros((3, 3), np.float32))
    return [noise, next(iter(sorted(SAMPLES.glob("3/*.png")))), bad, folder / "missing.png"]


def test_embedded_each_file_gets_the_answer_a_screening_job_gives_and_bad_ones_a_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = str(tmp_path / "store")
    scan = ["scan", str(SAMPLES), "--model", "digits-cnn", "--layers", "conv1,conv3,fc",
            "--labels-from-dirs", "--out", store, "--json"]  # fmt: skip
    assert main(scan) == 0
    reference = _last(capsys)["job_id"]
    assert main(["screen", "fit", "--reference", reference, "--fpr", "0.2", "--store", store,
                 "--json"]) == 0  # fmt: skip
    profile = str(_last(capsys)["profile_id"])
    files = _files(tmp_path)
    jobs = sorted((Path(store) / JOBS).iterdir())
    argv = ["screen", "sample", *map(str, files), "--profile", profile, "--store", store]
    assert main([*argv, "--json"]) == 1  # two files could not be screened
    found = _last(capsys)
    assert sorted((Path(store) / JOBS).iterdir()) == jobs  # no job was made
    assert [a["sample"] for a in found["answers"]] == [files[0].name, files[1].name]
    assert [f["file"] for f in found["failed"]] == [str(files[2]), str(files[3])]
    assert "shape (3, 3)" in found["failed"][0]["error"]
    assert main(["screen", "run", str(files[0]), str(files[1]), "--profile", profile,
                 "--store", store, "--json"]) == 0  # fmt: skip
    job = open_job(store, _last(capsys)["job_id"], mode="r")
    np.testing.assert_allclose(
        [a["score"] for a in found["answers"]], read(job, "screen/score"), rtol=1e-4
    )
    assert (
        [a["flag"] for a in found["answers"]]
        == read(job, "screen/flag").tolist()
        == [
            True,
            False,
        ]
    )
    assert found["n_flagged"] == 1
    assert main(argv[:3] + ["--profile", profile, "--store", store]) == 0
    out = capsys.readouterr().out
    assert f"{files[0].name}: flagged, score" in out
    assert "1 of 1 flagged" in out


def test_through_the_api_the_answers_are_the_servers_and_a_bad_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    api = wide_api(tmp_path / "api")
    with api.client:
        profile = fitted_profile(api)["analysis_id"]
        monkeypatch.setattr(
            "api.client.httpx.Client",
            lambda base_url, headers, **_: TestClient(
                api.client.app, base_url=base_url, headers=headers
            ),
        )
        monkeypatch.setenv("ACTMAP_TOKEN", api.tokens["acme"])
        files = _files(tmp_path)
        argv = ["screen", "sample", *map(str, files), "--profile", profile]
        assert main([*argv, "--api", "http://actmap.test", "--json"]) == 1
        found = _last(capsys)
        assert [a["flag"] for a in found["answers"]] == [True, False]
        assert "(HTTP 422)" in found["failed"][0]["error"]
        assert main([*argv[:4], "--profile", "nope", "--api", "http://actmap.test"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("actmap: error: no analysis 'nope' of yours")
        assert len(err.strip().splitlines()) == 1
