"""Acknowledge only what will run: a real `actmap serve`, a private Redis, a real worker.
Retries with one idempotency key get one job, whoever planned it and however far it got;
a submission while Redis is down answers 503 and plans nothing."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import httpx

from api.client import Client
from tests.integration.conftest import Cluster, until
from tests.integration.test_api import FACTORY, TOKEN, server
from workers.demo.digits import WEIGHTS
from workers.storage.layout import job_ids

__all__ = ["server"]  # the fixture, imported for this module's tests

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _model(url: str) -> str:
    with Client(url, TOKEN) as client:
        return client.register_model("digits", weights=WEIGHTS, factory=FACTORY)


def _body(model_id: str, tmp_path: Path) -> dict[str, object]:
    return {"model_id": model_id, "inputs": [str(tmp_path / "data")], "layers": ["fc"],
            "batch_size": 3}  # fmt: skip


def _finished(url: str, job_id: str) -> dict[str, object] | None:
    found: dict[str, object] = httpx.get(f"{url}/v1/jobs/{job_id}", headers=AUTH).json()
    return found if found["state"] in ("succeeded", "partial", "failed") else None


def test_concurrent_retries_with_one_key_get_the_same_job(
    server: str, cluster: Cluster, tmp_path: Path
) -> None:
    body = {**_body(_model(server), tmp_path), "layers": ["conv1", "conv2", "fc"]}
    rounds = 4
    for i in range(rounds):
        headers = {**AUTH, "Idempotency-Key": f"concurrent-{i}"}

        def post(_: int, headers: dict[str, str] = headers) -> httpx.Response:
            url = f"{server}/v1/jobs/extractions"
            return httpx.post(url, json=body, headers=headers, timeout=60)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, range(8)))
        assert [a.status_code for a in answers] == [202] * 8, [a.text for a in answers]
        ids = {a.json()["job_id"] for a in answers}
        assert len(ids) == 1
        job_id = ids.pop()
        final = until(partial(_finished, server, job_id), 120, "the job to finish")
        assert final["state"] == "succeeded"
    assert len(job_ids(cluster.store)) == rounds


def test_a_key_claimed_by_a_crashed_request_is_finished_by_the_retry(
    server: str, cluster: Cluster, tmp_path: Path
) -> None:
    body = _body(_model(server), tmp_path)
    # What a request killed after its claim leaves: the key, and no job behind it.
    cluster.redis.client().set("actmap:idem:acme:crashed-1", "20260101-000000-abcdef")
    headers = {**AUTH, "Idempotency-Key": "crashed-1"}
    answer = httpx.post(f"{server}/v1/jobs/extractions", json=body, headers=headers, timeout=60)
    assert answer.status_code == 202, answer.text
    assert answer.json()["job_id"] == "20260101-000000-abcdef"
    final = until(lambda: _finished(server, "20260101-000000-abcdef"), 120, "the job to finish")
    assert final["state"] == "succeeded"


def test_a_submission_while_redis_is_down_answers_503_and_plans_nothing(
    server: str, cluster: Cluster, tmp_path: Path
) -> None:
    body = _body(_model(server), tmp_path)
    cluster.redis.stop()
    try:
        for key in ({}, {"Idempotency-Key": "down-1"}):
            answer = httpx.post(
                f"{server}/v1/jobs/extractions", json=body, headers={**AUTH, **key}, timeout=60
            )
            assert answer.status_code == 503, answer.text
            assert len(answer.json()["detail"].splitlines()) == 1
            assert "retry" in answer.json()["detail"]
        assert job_ids(cluster.store) == []
    finally:
        cluster.redis.start()
