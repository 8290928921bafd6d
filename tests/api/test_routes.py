"""The HTTP API through FastAPI's TestClient: what a script and an operator rely on."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest

from tests.api.conftest import Api, make_api
from workers.jobs import TaskName
from workers.storage.layout import attrs, open_job, read


def _npy(content: bytes) -> np.ndarray:
    values: np.ndarray = np.load(io.BytesIO(content), allow_pickle=False)
    return values


def test_no_token_or_an_unknown_one_is_401(api: Api) -> None:
    assert api.client.get("/v1/jobs").status_code == 401
    wrong = api.client.get("/v1/jobs", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert "bearer token" in wrong.json()["detail"]


def test_a_registered_model_gets_its_catalogue_from_a_worker(api: Api) -> None:
    model_id = api.register()
    got = api.client.get(f"/v1/models/{model_id}", headers=api.as_("acme")).json()
    assert got["state"] == "ready"
    assert got["catalogue"]["classes"] == 10
    names = [row["name"] for row in got["catalogue"]["layers"]]
    assert "block2.conv1" in names
    listed = api.client.get("/v1/models", headers=api.as_("acme")).json()
    assert [m["id"] for m in listed] == [model_id]


def test_a_factory_off_the_allow_list_is_refused(api: Api) -> None:
    response = api.client.post(
        "/v1/models", headers=api.as_("acme"),
        data={"name": "x", "factory": "os:system"},
        files={"weights": ("w.safetensors", b"x", "application/octet-stream")},
    )  # fmt: skip
    assert response.status_code == 422
    assert "allow-list" in response.json()["detail"]


def test_an_extraction_runs_and_its_results_come_back_as_npy(api: Api) -> None:
    model_id = api.register()
    accepted = api.submit(model_id, batch_size=3)
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["job_id"]
    job = api.client.get(f"/v1/jobs/{job_id}", headers=api.as_("acme")).json()
    assert job["state"] == "succeeded"
    assert job["samples_done"] == job["n_samples"] == 4
    assert job["errors"]["n_failed"] == 0
    page = api.client.get(f"/v1/jobs/{job_id}/samples?limit=2&offset=1", headers=api.as_("acme"))
    assert page.json()["total"] == 4
    ids = page.json()["samples"]
    assert len(ids) == 2
    group = open_job(str(api.store), job_id, mode="r")
    acts = api.client.get(
        f"/v1/jobs/{job_id}/layers/conv1/activations",
        params={"samples": ",".join(ids), "channels": "0,5"}, headers=api.as_("acme"),
    )  # fmt: skip
    assert acts.status_code == 200
    np.testing.assert_array_equal(
        _npy(acts.content), read(group, "layers/conv1/acts")[1:3][:, [0, 5]]
    )
    pooled = api.client.get(f"/v1/jobs/{job_id}/layers/fc/pooled", headers=api.as_("acme"))
    np.testing.assert_array_equal(_npy(pooled.content), read(group, "layers/fc/pooled"))
    logits = api.client.get(f"/v1/jobs/{job_id}/logits", headers=api.as_("acme"))
    np.testing.assert_array_equal(_npy(logits.content), read(group, "logits"))
    preds = api.client.get(f"/v1/jobs/{job_id}/predictions", headers=api.as_("acme"))
    np.testing.assert_array_equal(_npy(preds.content), read(group, "pred"))
    where = api.client.get(f"/v1/jobs/{job_id}/store", headers=api.as_("acme")).json()
    assert where == {"store": str(api.store), "group": f"jobs/{job_id}"}


def test_another_tenants_ids_answer_404_on_every_route(api: Api) -> None:
    model_id = api.register("acme")
    job_id = api.submit(model_id).json()["job_id"]
    theirs = api.as_("other")
    for path in (
        f"/v1/models/{model_id}", f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/samples",
        f"/v1/jobs/{job_id}/layers/conv1/activations", f"/v1/jobs/{job_id}/layers/fc/pooled",
        f"/v1/jobs/{job_id}/logits", f"/v1/jobs/{job_id}/predictions", f"/v1/jobs/{job_id}/store",
    ):  # fmt: skip
        assert api.client.get(path, headers=theirs).status_code == 404, path
    for path in (f"/v1/jobs/{job_id}/cancel", f"/v1/jobs/{job_id}/resume"):
        assert api.client.post(path, headers=theirs).status_code == 404, path
    assert api.client.get("/v1/jobs", headers=theirs).json() == []
    assert api.client.get("/v1/models", headers=theirs).json() == []
    stolen = api.submit(model_id, tenant="other")
    assert stolen.status_code == 404


def test_cancelling_a_finished_job_answers_409_with_its_state(api: Api) -> None:
    job_id = api.submit(api.register("acme")).json()["job_id"]  # the inline runner finishes it
    done = api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.as_("acme"))
    assert done.status_code == 409
    assert f"job {job_id} is already succeeded; nothing to cancel" in done.text


@pytest.mark.parametrize("escape", ["dotdot", "symlink", "absolute"])
def test_inputs_outside_the_tenants_roots_are_refused_before_anything_is_queued(
    api: Api, tmp_path: Path, escape: str
) -> None:
    model_id = api.register()
    root = api.roots["acme"]
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "x.png").write_bytes((root / "3" / os.listdir(root / "3")[0]).read_bytes())
    if escape == "dotdot":
        path = f"{root}/../secret"
    elif escape == "symlink":
        (root / "link").symlink_to(secret)
        path = str(root / "link")
    else:
        path = str(secret / "x.png")
    sent_before = len(api.broker.sent)
    response = api.submit(model_id, inputs=[path])
    assert response.status_code == 422
    assert "allowed roots" in response.json()["detail"]
    assert len(api.broker.sent) == sent_before


def test_a_symlinked_file_inside_a_root_that_points_out_is_refused(
    api: Api, tmp_path: Path
) -> None:
    model_id = api.register()
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(b"\x89PNG")
    (api.roots["acme"] / "3" / "sneaky.png").symlink_to(outside)
    response = api.submit(model_id)
    assert response.status_code == 422
    assert "resolves outside" in response.json()["detail"]


def test_an_invalid_spec_is_422_with_a_message_a_person_can_act_on(api: Api) -> None:
    model_id = api.register()
    bad = api.submit(model_id, batch_size=0)
    assert bad.status_code == 422
    assert bad.json()["detail"].startswith("invalid batch_size")
    unknown = api.submit(model_id, layers=["conv_1"])
    assert unknown.status_code == 422
    assert "close matches: conv1" in unknown.json()["detail"]


def test_an_oversized_upload_is_413_and_leaves_nothing_behind(tmp_path: Path) -> None:
    api = make_api(tmp_path, quotas={"upload_bytes": 1000})
    response = api.client.post(
        "/v1/inputs", headers=api.as_("acme"),
        files=[("files", ("a.bin", b"x" * 600, "application/octet-stream")),
               ("files", ("b.bin", b"y" * 600, "application/octet-stream"))],
    )  # fmt: skip
    assert response.status_code == 413
    assert "upload_bytes" in response.json()["detail"]
    assert not any((api.store / "uploads" / "acme").iterdir())


def test_uploaded_inputs_can_be_scanned_by_their_input_set(api: Api) -> None:
    model_id = api.register()
    png = next((api.roots["acme"] / "7").iterdir()).read_bytes()
    up = api.client.post(
        "/v1/inputs",
        headers=api.as_("acme"),
        files=[("files", ("7/x.png", png, "image/png"))],
    )
    assert up.status_code == 201
    set_id = up.json()["input_set"]
    job = api.submit(model_id, inputs=[], input_set=set_id, queue="screen").json()
    assert job["n_samples"] == 1
    assert job["queue"] == "screen"
    assert all(q == "screen" for t, _a, q in api.broker.sent if t == TaskName.RUN_BATCH)


def test_quotas_answer_429_and_413_naming_the_limit(tmp_path: Path) -> None:
    api = make_api(tmp_path, run_tasks=False, quotas={"queued_jobs": 1, "samples_per_job": 3})
    from tests.api.conftest import _inline

    run = _inline(api.settings)
    with api.client:
        with (Path(__file__).parents[2] / "workers" / "demo" / "digits_cnn.safetensors").open(
            "rb"
        ) as f:
            registered = api.client.post(
                "/v1/models", headers=api.as_("acme"),
                data={"name": "d", "factory": "workers.demo.digits:digits_cnn"},
                files={"weights": ("w.safetensors", f, "application/octet-stream")},
            ).json()  # fmt: skip
        run(*api.broker.sent[-1][:2])
        model_id = registered["id"]
        too_many = api.submit(model_id)
        assert too_many.status_code == 413
        assert "samples_per_job" in too_many.json()["detail"]
        first = api.submit(model_id, inputs=[str(api.roots["acme"] / "3")])
        assert first.status_code == 202
        second = api.submit(model_id, inputs=[str(api.roots["acme"] / "7")])
        assert second.status_code == 429
        assert "queued_jobs" in second.json()["detail"]


def test_the_same_idempotency_key_gets_back_the_same_job(api: Api) -> None:
    model_id = api.register()
    headers = {**api.as_("acme"), "Idempotency-Key": "scan-42"}
    body = {"model_id": model_id, "layers": ["fc"], "inputs": [str(api.roots["acme"])]}
    first = api.client.post("/v1/jobs/extractions", headers=headers, json=body).json()
    planned = attrs(open_job(str(api.store), first["job_id"], mode="r"))["created"]
    second = api.client.post("/v1/jobs/extractions", headers=headers, json=body).json()
    assert first["job_id"] == second["job_id"]
    batches = [a for t, a, _q in api.broker.sent if t == TaskName.RUN_BATCH]
    assert len(batches) == 1
    # the finished job is the one planned first, not removed and planned again
    assert attrs(open_job(str(api.store), first["job_id"], mode="r"))["created"] == planned


def test_an_idempotency_key_sent_again_with_another_request_is_refused(api: Api) -> None:
    model_id = api.register()
    headers = {**api.as_("acme"), "Idempotency-Key": "scan-43"}
    body = {"model_id": model_id, "layers": ["fc"], "inputs": [str(api.roots["acme"] / "3")]}
    first = api.client.post("/v1/jobs/extractions", headers=headers, json=body)
    assert first.status_code == 202
    other = {**body, "inputs": [str(api.roots["acme"] / "7")]}
    refused = api.client.post("/v1/jobs/extractions", headers=headers, json=other)
    assert refused.status_code == 422, refused.text
    assert refused.json()["detail"].startswith("this Idempotency-Key was first sent with another")
    again = api.client.post("/v1/jobs/extractions", headers=headers, json=body)
    assert again.json()["job_id"] == first.json()["job_id"]  # the key still names its job


def test_health_readiness_and_metrics(tmp_path: Path) -> None:
    api = make_api(tmp_path, metrics="open")
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "redis": True, "store": True}
    model_id = api.register()
    api.submit(model_id)
    text = api.client.get("/metrics").text
    assert 'actmap_jobs{state="succeeded"} 1.0' in text
    assert 'actmap_queue_depth{queue="extract"}' in text
    assert "actmap_samples_per_second" in text
    assert "actmap_request_seconds_bucket" in text


def test_the_openapi_schema_is_served(api: Api) -> None:
    schema = api.client.get("/openapi.json").json()
    assert "/v1/jobs/extractions" in schema["paths"]
    assert api.client.get("/docs").status_code == 200


def test_resume_finishes_a_job_whose_count_fell_short_on_the_jobs_own_queue(
    tmp_path: Path,
) -> None:
    from tests.lifecycle.test_completion import LosesOneCount

    api = make_api(tmp_path, counters=LosesOneCount(lost=1))
    with api.client:
        model_id = api.register()
        job_id = api.submit(model_id, batch_size=1, queue="screen").json()["job_id"]
        job = api.client.get(f"/v1/jobs/{job_id}", headers=api.as_("acme")).json()
        assert job["state"] == "running"  # every batch written; the count says one short

        resumed = api.client.post(f"/v1/jobs/{job_id}/resume", headers=api.as_("acme"))
        assert resumed.status_code == 200, resumed.text
        assert resumed.json()["state"] == "succeeded"
        task, args, queue = api.broker.sent[-1]
        assert (task, queue) == (TaskName.RUN_BATCH, "screen")
