"""GET /v1/jobs pages through the job index: newest first, the next page's cursor in a
header, a tenant's own jobs only, a hostile cursor a 422; /metrics counts from the index."""

from __future__ import annotations

from pathlib import Path

from tests.api.conftest import Api, make_api


def test_a_tenant_pages_through_its_own_jobs_newest_first(api: Api) -> None:
    model_id = api.register("acme")
    mine = [api.submit(model_id).json()["job_id"] for _ in range(3)]
    api.submit(api.register("other"), tenant="other")
    first = api.client.get("/v1/jobs", params={"limit": 2}, headers=api.as_("acme"))
    assert first.status_code == 200
    assert [j["job_id"] for j in first.json()] == mine[::-1][:2]
    cursor = first.headers["X-Next-Cursor"]
    rest = api.client.get(
        "/v1/jobs", params={"limit": 2, "cursor": cursor}, headers=api.as_("acme")
    )
    assert [j["job_id"] for j in rest.json()] == mine[:1]
    assert "X-Next-Cursor" not in rest.headers
    done = api.client.get("/v1/jobs", params={"state": "succeeded"}, headers=api.as_("acme"))
    assert [j["job_id"] for j in done.json()] == mine[::-1]


def test_a_cursor_that_is_not_one_is_a_422_with_one_line(api: Api) -> None:
    bad = api.client.get("/v1/jobs", params={"cursor": "../x"}, headers=api.as_("acme"))
    assert bad.status_code == 422
    assert "\n" not in bad.json()["detail"]


def test_metrics_count_jobs_by_state_from_the_index(tmp_path: Path) -> None:
    api = make_api(tmp_path, metrics="open")  # off by default with an auth file
    with api.client:
        model_id = api.register("acme")
        for _ in range(2):
            assert api.submit(model_id).status_code == 202
        metrics = api.client.get("/metrics").text
    assert 'actmap_jobs{state="succeeded"} 2.0' in metrics
    assert 'actmap_jobs{state="queued"} 0.0' in metrics
