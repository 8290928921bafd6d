"""Analyses and screening through the API: queued on their queues, run by the worker
functions, under the same tenant rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import workers.analysis.profiles
from tests.api.conftest import SAMPLES, Api, make_api
from workers.jobs import TaskName
from workers.storage.layout import attrs, open_job, read


def wide_api(tmp_path: Path) -> Api:
    """The API with every demo digit under acme's `all/{digit}/`."""
    api = make_api(tmp_path)
    root = api.roots["acme"]
    for digit in range(10):  # every class, enough samples to fit and calibrate a profile
        folder = root / "all" / str(digit)
        folder.mkdir(parents=True)
        for png in sorted((SAMPLES / str(digit)).glob("*.png")):
            (folder / png.name).write_bytes(png.read_bytes())
    return api


def _finished_job(api: Api, model_id: str, **body: Any) -> str:
    accepted = api.submit(model_id, **body)
    assert accepted.status_code == 202, accepted.text
    job_id: str = accepted.json()["job_id"]
    return job_id


def test_health_and_comparison_are_queued_on_the_analysis_queue_and_open_as_results(
    tmp_path: Path,
) -> None:
    api = wide_api(tmp_path)
    with api.client:
        model_id = api.register()
        job_id = _finished_job(
            api, model_id, inputs=[str(api.roots["acme"] / "all")], labels_from_dirs=True,
            layers=["conv1", "conv3", "fc"],
        )  # fmt: skip
        health = api.client.post(
            "/v1/analyses/health", headers=api.as_("acme"), json={"job_id": job_id}
        )
        assert health.status_code == 202
        assert health.json()["state"] == "succeeded"  # the in-line worker ran it
        assert ("actmap.analyse", "analysis") in {(t, q) for t, _a, q in api.broker.sent}
        assert "conv3" in health.json()["summary"]["layers"]
        compare = api.client.post(
            "/v1/analyses/comparisons", headers=api.as_("acme"),
            json={"a": {"job_id": job_id, "labels": [1]}, "b": {"job_id": job_id, "labels": [7]}},
        )  # fmt: skip
        assert compare.json()["state"] == "succeeded"
        got = api.client.get(
            f"/v1/analyses/{compare.json()['analysis_id']}", headers=api.as_("acme")
        )
        assert got.json()["kind"] == "compare"
        assert api.client.get(f"/v1/analyses/{compare.json()['analysis_id']}",
                              headers=api.as_("other")).status_code == 404  # fmt: skip


def fitted_profile(api: Api) -> dict[str, Any]:
    """A screening profile fitted on every demo digit under acme's `all/`, at FPR 0.2."""
    reference = _finished_job(
        api, api.register(), inputs=[str(api.roots["acme"] / "all")], labels_from_dirs=True,
        layers=["conv3", "fc"],
    )  # fmt: skip
    profile: dict[str, Any] = api.client.post(
        "/v1/analyses/profiles", headers=api.as_("acme"),
        json={"reference_job": reference, "fpr": 0.2},
    ).json()  # fmt: skip
    return profile


def test_a_screening_job_scores_each_sample_with_a_profile(tmp_path: Path) -> None:
    api = wide_api(tmp_path)
    with api.client:
        profile = fitted_profile(api)
        assert profile["state"] == "succeeded", profile
        noise = api.roots["acme"] / "noise.npy"
        np.save(
            noise, (np.random.default_rng(0).standard_normal((1, 28, 28)) * 4).astype(np.float32)
        )
        screened = api.client.post(
            "/v1/jobs/screenings", headers=api.as_("acme"),
            json={"profile_id": profile["analysis_id"], "inputs": [str(noise)]},
        )  # fmt: skip
        assert screened.status_code == 202, screened.text
        assert screened.json()["queue"] == "screen"
        group = open_job(str(api.store), screened.json()["job_id"], mode="r")
        assert read(group, "screen/flag").tolist() == [True]
        assert all(q == "screen" for t, _a, q in api.broker.sent[-1:] if t == TaskName.RUN_BATCH)
        answer = api.client.get(
            f"/v1/jobs/{screened.json()['job_id']}/screen", headers=api.as_("acme")
        ).json()
        assert answer["flags"] == [True]
        assert answer["n_flagged"] == answer["total"] == 1
        assert answer["scores"][0] > answer["threshold"]
        assert answer["profile_id"] == profile["analysis_id"]
        not_screened = api.client.get(
            f"/v1/jobs/{profile['summary']['inputs']['reference_job']}/screen",
            headers=api.as_("acme"),
        )
        assert not_screened.status_code == 404
        assert api.client.get(f"/v1/jobs/{screened.json()['job_id']}/screen",
                              headers=api.as_("other")).status_code == 404  # fmt: skip


def test_a_screening_job_is_not_seen_finished_before_its_scores_are_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = wide_api(tmp_path)
    seen_while_scoring: list[str] = []
    score_job = workers.analysis.profiles.score_job

    def watched(store: str, job_id: str, profile_id: str, **options: Any) -> Any:
        seen_while_scoring.append(str(attrs(open_job(store, job_id, mode="r"))["state"]))
        return score_job(store, job_id, profile_id, **options)

    monkeypatch.setattr(workers.analysis.profiles, "score_job", watched)
    with api.client:
        profile = fitted_profile(api)
        digit = next(iter(sorted((api.roots["acme"] / "all").glob("*/*.png"))))
        screened = api.client.post(
            "/v1/jobs/screenings", headers=api.as_("acme"),
            json={"profile_id": profile["analysis_id"], "inputs": [str(digit)]},
        ).json()  # fmt: skip
        job = api.client.get(f"/v1/jobs/{screened['job_id']}", headers=api.as_("acme")).json()
    assert len(seen_while_scoring) == 1
    assert seen_while_scoring[0] not in ("succeeded", "partial", "failed", "cancelled")
    assert job["state"] == "succeeded"


def test_a_bad_analysis_request_fails_with_its_reason_and_other_tenants_see_nothing(
    api: Api,
) -> None:
    model_id = api.register()
    job_id = _finished_job(api, model_id)
    profile = api.client.post(
        "/v1/analyses/profiles", headers=api.as_("acme"),
        json={"reference_job": job_id, "fpr": 0.45, "layers": ["conv_9"]},
    ).json()  # fmt: skip
    assert profile["state"] == "failed"
    assert "conv_9" in profile["reason"]
    screened = api.client.post(
        "/v1/jobs/screenings", headers=api.as_("acme"),
        json={"profile_id": profile["analysis_id"], "inputs": [str(api.roots["acme"])]},
    )  # fmt: skip
    assert screened.status_code == 422
    stolen = api.client.post(
        "/v1/analyses/health", headers=api.as_("other"), json={"job_id": job_id}
    )
    assert stolen.status_code == 404


def test_a_reference_too_small_for_the_rate_is_refused_before_anything_is_queued(
    api: Api,
) -> None:
    job_id = _finished_job(api, api.register())  # four samples
    sent = len(api.broker.sent)
    refused = api.client.post(
        "/v1/analyses/profiles", headers=api.as_("acme"), json={"reference_job": job_id}
    )
    assert refused.status_code == 422, refused.text
    detail = refused.json()["detail"]
    assert "needs at least 19 held-out clean samples" in detail
    assert "\n" not in detail
    assert len(api.broker.sent) == sent
    whole = api.client.post(
        "/v1/analyses/profiles", headers=api.as_("acme"),
        json={"reference_job": job_id, "held_out": 1.0},
    )  # fmt: skip
    assert whole.status_code == 422
    assert [e["loc"][-1] for e in whole.json()["errors"]] == ["held_out"]


def test_an_atlas_is_queued_and_its_channel_sheets_are_the_owning_tenants_only(
    api: Api,
) -> None:
    model_id = api.register()
    job_id = _finished_job(api, model_id, layers=["conv1", "conv3"])
    atlas = api.client.post(
        "/v1/analyses/atlas", headers=api.as_("acme"),
        json={"job_id": job_id, "layer": "conv3", "top": 3},
    )  # fmt: skip
    assert atlas.status_code == 202, atlas.text
    found = atlas.json()
    assert found["state"] == "succeeded", found
    assert found["summary"]["layers"]["conv3"]["top"] == 3
    sheet = f"/v1/analyses/{found['analysis_id']}/channels/5.png"
    for scale in ("layer", "tile"):
        png = api.client.get(sheet, params={"scale": scale}, headers=api.as_("acme"))
        assert png.status_code == 200
        assert png.headers["content-type"] == "image/png"
    assert api.client.get(sheet, headers=api.as_("other")).status_code == 404
    outside = api.client.get(
        f"/v1/analyses/{found['analysis_id']}/channels/64.png", headers=api.as_("acme")
    )
    assert outside.status_code == 422
    assert "channel 64 is not in this atlas; its channels are 0..63" in outside.json()["detail"]
    bad_scale = api.client.get(sheet, params={"scale": "log"}, headers=api.as_("acme"))
    assert bad_scale.status_code == 422
    flat = api.client.post(
        "/v1/analyses/atlas", headers=api.as_("acme"), json={"job_id": job_id, "layer": "fc"}
    ).json()
    assert flat["state"] == "failed"
    assert "stores no layer 'fc'" in flat["reason"]


def test_an_extraction_with_gradcam_is_explained_for_its_owner_only(tmp_path: Path) -> None:
    from api.client import Client

    api = make_api(tmp_path)
    with api.client:
        model_id = api.register()
        job_id = _finished_job(
            api, model_id, layers=["conv1", "conv3"], gradcam=["conv3"], gradcam_target="3"
        )
        group = open_job(str(api.store), job_id, mode="r")
        assert (read(group, "layers/conv3/gradcam_target") == 3).all()
        body = {"job_id": job_id, "layer": "conv3", "top": 2}
        mine = api.client.post("/v1/analyses/explanations", headers=api.as_("acme"), json=body)
        assert mine.status_code == 202, mine.text
        assert mine.json()["state"] == "succeeded"
        assert list(mine.json()["summary"]["classes"]) == ["3"]
        theirs = api.client.post("/v1/analyses/explanations", headers=api.as_("other"), json=body)
        assert theirs.status_code == 404
        other = api.client.get(
            f"/v1/analyses/{mine.json()['analysis_id']}", headers=api.as_("other")
        )
        assert other.status_code == 404
        client = Client("http://testserver", api.tokens["acme"])
        client._http = api.client  # type: ignore[assignment]
        client._http.headers.update(api.as_("acme"))
        found = client.job(job_id).explain("conv3", top=1)
        assert found["kind"] == "explain"
        assert found["summary"]["top"] == 1
        failed = client.explain(job_id, "conv1")  # scanned without Grad-CAM there
        assert failed["state"] == "failed"
        assert "--gradcam conv1" in failed["reason"]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"layers": ["conv3"], "gradcam": ["conv1"]}, "Grad-CAM layer 'conv1'"),
        ({"layers": ["fc"], "gradcam": ["fc"]}, "is flat"),
        ({"layers": ["conv3"], "gradcam": ["conv3"], "gradcam_target": "11"}, "not a class"),
    ],
)
def test_impossible_gradcam_options_answer_422_with_one_line(
    api: Api, body: dict[str, Any], words: str
) -> None:
    model_id = api.register()
    refused = api.submit(model_id, **body)
    assert refused.status_code == 422, refused.text
    detail = refused.json()["detail"]
    assert words in detail
    assert "\n" not in detail


def test_explaining_a_job_without_gradcam_fails_with_its_reason(api: Api) -> None:
    model_id = api.register()
    job_id = _finished_job(api, model_id, layers=["conv3"])
    body = {"job_id": job_id, "layer": "conv3"}
    found = api.client.post("/v1/analyses/explanations", headers=api.as_("acme"), json=body)
    assert found.json()["state"] == "failed"
    assert "no Grad-CAM maps for layer 'conv3'" in found.json()["reason"]


def test_a_profile_fitted_with_squeezing_and_benign_copies_screens_with_squeezing(
    tmp_path: Path,
) -> None:
    api = wide_api(tmp_path)
    with api.client:
        reference = _finished_job(
            api, api.register(), inputs=[str(api.roots["acme"] / "all")], labels_from_dirs=True,
            layers=["conv3", "fc"], squeeze=True, benign=True,
        )  # fmt: skip
        profile = api.client.post(
            "/v1/analyses/profiles", headers=api.as_("acme"),
            json={"reference_job": reference, "fpr": 0.2},
        ).json()  # fmt: skip
        assert profile["state"] == "succeeded", profile
        assert profile["summary"]["squeeze"] is True
        assert len(profile["summary"]["benign_copies"]) == 6
        digit = next(iter(sorted((api.roots["acme"] / "all").glob("*/*.png"))))
        screened = api.client.post(
            "/v1/jobs/screenings", headers=api.as_("acme"),
            json={"profile_id": profile["analysis_id"], "inputs": [str(digit)]},
        )  # fmt: skip
        assert screened.status_code == 202, screened.text
        group = open_job(str(api.store), screened.json()["job_id"], mode="r")
        spec = attrs(group)["spec"]
        assert spec["squeeze"] is True
        assert "benign" not in spec
        assert np.isfinite(read(group, "squeeze")).all()
        assert read(group, "screen/flag").shape == (1,)
