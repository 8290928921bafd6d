"""One sample screened now (POST /v1/analyses/{id}/screen): the same answer a screening job
gives, without a job, under the same tenant rules and limits."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from api.auth import Quotas, Tenant
from api.quotas import InFlight, TooMany
from tests.api.conftest import Api
from tests.api.test_analyses import fitted_profile, wide_api
from workers.jobs import TaskName
from workers.storage.layout import open_job, read


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Api, dict[str, Any]]]:
    """One API and one profile for the module: fitting takes most of a test's time."""
    api = wide_api(tmp_path_factory.mktemp("screen"))
    with api.client:
        yield api, fitted_profile(api)


def _screen(api: Any, profile_id: str, data: bytes, name: str, tenant: str = "acme") -> Any:
    return api.client.post(
        f"/v1/analyses/{profile_id}/screen", headers=api.as_(tenant), params={"name": name},
        content=data,
    )  # fmt: skip


def test_a_sample_gets_the_score_a_screening_job_stores_for_it_and_no_job_is_made(
    fitted: tuple[Api, dict[str, Any]],
) -> None:
    api, profile = fitted
    # Digits the profile was not fitted on (shifted copies): a reference digit is its
    # own nearest neighbour, where a batch of 1 and a batch of 4 differ in the last bit.
    digits = []
    for i, png in enumerate(sorted((api.roots["acme"] / "all").glob("*/*.png"))[::13]):
        shifted = api.roots["acme"] / f"shifted-{i}.png"
        Image.fromarray(np.roll(np.asarray(Image.open(png)), 1, axis=1)).save(shifted)
        digits.append(shifted)
    noise = api.roots["acme"] / "noise.npy"
    np.save(noise, (np.random.default_rng(0).standard_normal((1, 28, 28)) * 4).astype("f4"))
    files = [*digits, noise]
    job = api.client.post(
        "/v1/jobs/screenings", headers=api.as_("acme"),
        json={"profile_id": profile["analysis_id"], "inputs": [str(f) for f in files]},
    ).json()  # fmt: skip
    stored = open_job(str(api.store), job["job_id"], mode="r")
    jobs_before = len(list((api.store / "jobs").iterdir()))
    answers = []
    for file in files:
        response = _screen(api, profile["analysis_id"], file.read_bytes(), file.name)
        assert response.status_code == 200, response.text
        answers.append(response.json())
    assert len(list((api.store / "jobs").iterdir())) == jobs_before
    np.testing.assert_allclose(
        [a["score"] for a in answers], read(stored, "screen/score"), rtol=1e-4
    )
    assert [a["flag"] for a in answers] == read(stored, "screen/flag").tolist()
    assert answers[-1]["flag"] is True  # the noise
    assert [a["pred"] for a in answers] == read(stored, "pred").tolist()
    assert answers[0]["threshold"] == pytest.approx(profile["summary"]["threshold"])
    assert answers[0]["sample"] == digits[0].name
    assert api.broker.sent[-1][0] == TaskName.SCREEN_SAMPLE
    assert api.broker.sent[-1][2] == "screen"


def test_another_tenants_profile_answers_as_one_that_does_not_exist(
    fitted: tuple[Api, dict[str, Any]],
) -> None:
    api, profile = fitted
    digit = next(iter(sorted((api.roots["acme"] / "all").glob("*/*.png"))))
    theirs = _screen(api, profile["analysis_id"], digit.read_bytes(), "d.png", "other")
    nobody = _screen(api, "0" * 20, digit.read_bytes(), "d.png", "other")
    assert theirs.status_code == nobody.status_code == 404
    assert "of yours" in theirs.json()["detail"]


def test_a_sample_that_cannot_be_read_is_refused_with_its_reason(
    fitted: tuple[Api, dict[str, Any]],
) -> None:
    api, profile_id = fitted[0], fitted[1]["analysis_id"]
    refusals = {
        "truncated": _screen(api, profile_id, b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "x.png"),
        "shape": _screen(api, profile_id, _npy(np.zeros((3, 5, 5), "f4")), "x.npy"),
        "pickle": _screen(api, profile_id, _npy(np.array([{}], dtype=object)), "x.npy"),
        "kind": _screen(api, profile_id, b"MZ\x90\x00" * 100, "x.exe"),
        "empty": _screen(api, profile_id, b"", "x.png"),
        "name": _screen(api, profile_id, b"123", "../x.png"),
    }
    for what, response in refusals.items():
        assert response.status_code == 422, (what, response.text)
        assert "\n" not in response.json()["detail"], what
    assert "shape (3, 5, 5)" in refusals["shape"].json()["detail"]
    assert "not an image" in refusals["kind"].json()["detail"]
    assert "not a valid .npy" in refusals["pickle"].json()["detail"]


def test_a_sample_over_the_tenants_upload_quota_is_refused_before_it_is_sent(
    fitted: tuple[Api, dict[str, Any]],
) -> None:
    api, profile_id = fitted[0], fitted[1]["analysis_id"]
    sent = len(api.broker.sent)
    limit = Tenant().quotas.upload_bytes
    response = _screen(api, profile_id, b"\0" * (limit + 1), "big.bin")
    assert response.status_code == 413, response.text
    assert len(api.broker.sent) == sent


def test_an_analysis_that_is_not_a_fitted_profile_is_refused(
    fitted: tuple[Api, dict[str, Any]],
) -> None:
    api, profile = fitted
    health = api.client.post(
        "/v1/analyses/health", headers=api.as_("acme"),
        json={"job_id": profile["summary"]["inputs"]["reference_job"]},
    ).json()  # fmt: skip
    response = _screen(api, health["analysis_id"], b"x", "x.png")
    assert response.status_code == 422
    assert "not a fitted screening profile" in response.json()["detail"]


def test_no_worker_to_answer_is_a_503_saying_to_retry(
    fitted: tuple[Api, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    api, profile_id = fitted[0], fitted[1]["analysis_id"]
    monkeypatch.setattr(api.broker, "_run", None)  # the workers went away
    digit = next(iter(sorted((api.roots["acme"] / "all").glob("*/*.png"))))
    response = _screen(api, profile_id, digit.read_bytes(), "d.png")
    assert response.status_code == 503
    assert "screen" in response.json()["detail"]


def test_a_tenant_holds_at_most_its_quota_of_screenings_waiting_at_once() -> None:
    gate = InFlight()
    acme = Tenant(name="acme", quotas=Quotas(screenings_at_once=2))
    other = Tenant(name="other", quotas=Quotas(screenings_at_once=2))
    with gate.slot(acme), gate.slot(acme):
        with pytest.raises(TooMany, match="screenings_at_once"), gate.slot(acme):
            pass
        with gate.slot(other):  # another tenant is not held up
            pass
    with gate.slot(acme), gate.slot(acme):  # given back on the way out
        pass


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()
