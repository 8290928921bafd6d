"""One sample screened now, for real: `actmap serve`, a private Redis and a worker process of
the `screen` queue that keeps the profile and model loaded; the Python client and `actmap
screen sample` on a broker on the other side."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from api.broker import RedisBroker
from api.client import Client, Job
from tests.integration.conftest import ROOT, Cluster, serving
from workers.demo.digits import WEIGHTS
from workers.extraction.inputs import decode
from workers.jobs import Preprocessing, TaskName
from workers.lifecycle.submit import Unavailable
from workers.storage.layout import open_job, read

FACTORY = "workers.demo.digits:digits_cnn"
SAMPLES = ROOT / "workers" / "demo" / "samples"
TOKEN = "screen-token"


def _serve(cluster: Cluster, tmp_path: Path, queues: str) -> Iterator[str]:
    auth = {"tenants": {"acme": {"tokens": [TOKEN], "roots": [str(SAMPLES), str(tmp_path)]}}}
    (tmp_path / "auth.json").write_text(json.dumps(auth))
    cluster.env["ACTMAP_AUTH_FILE"] = str(tmp_path / "auth.json")
    cluster.env["ACTMAP_FACTORIES"] = json.dumps([FACTORY])
    cluster.env["ACTMAP_SCREEN_TIMEOUT_S"] = "3"
    with serving(cluster.env) as url:
        cluster.start(workers=1, queues=queues)
        yield url


@pytest.fixture
def server(cluster: Cluster, tmp_path: Path) -> Iterator[str]:
    yield from _serve(cluster, tmp_path, "screen,extract,analysis")


def _profile(client: Client) -> str:
    model_id = client.register_model("digits", weights=WEIGHTS, factory=FACTORY)
    job = client.submit_extraction(model_id, [str(SAMPLES)], ["conv3", "fc"], labels_from_dirs=True)
    assert job.wait(timeout=120)["state"] == "succeeded"
    fitted = client.request(
        "POST", "/v1/analyses/profiles", json={"reference_job": job.id, "fpr": 0.2}
    ).json()
    found = client.analysis(fitted["analysis_id"])
    while found["state"] in ("queued", "running"):
        found = client.analysis(fitted["analysis_id"])
    assert found["state"] == "succeeded", found
    return str(fitted["analysis_id"])


def test_a_warm_screen_worker_answers_one_sample_as_a_screening_job_scores_it_and_none_503s(
    server: str, cluster: Cluster, tmp_path: Path
) -> None:
    noise = tmp_path / "noise.npy"
    np.save(noise, (np.random.default_rng(2).standard_normal((1, 28, 28)) * 4).astype("f4"))
    digit = tmp_path / "digit.npy"  # a digit the profile has not seen: a shifted copy
    prep = Preprocessing(size=(28, 28), channels=1)
    first = next(iter(sorted(SAMPLES.glob("5/*.png"))))
    np.save(digit, np.roll(decode(str(first), prep), 2, axis=2))
    with Client(server, TOKEN) as client:
        profile = _profile(client)
        answers = [client.screen_sample(profile, f.read_bytes(), f.name) for f in (noise, digit)]
        job_id = client.request(
            "POST", "/v1/jobs/screenings",
            json={"profile_id": profile, "inputs": [str(noise), str(digit)]},
        ).json()["job_id"]  # fmt: skip
        assert Job(client, job_id).wait(timeout=120)["state"] == "succeeded"
    stored = open_job(cluster.store, job_id, mode="r")
    np.testing.assert_allclose(
        [a["score"] for a in answers], read(stored, "screen/score"), rtol=1e-4
    )
    assert [a["flag"] for a in answers] == read(stored, "screen/flag").tolist()
    assert answers[0]["flag"] is True  # the noise
    # The same through a broker, as a trusted script on the cluster runs it.
    broker = cluster.cli("screen", "sample", str(noise), str(digit), "--profile", profile,
                         "--json")  # fmt: skip
    assert broker.returncode == 0, broker.stderr
    found = json.loads(broker.stdout.splitlines()[-1])
    assert [a["score"] for a in found["answers"]] == [a["score"] for a in answers]
    # With no worker left, a 503 within ACTMAP_SCREEN_TIMEOUT_S, and the task expires unrun.
    cluster.stop()
    response = httpx.post(
        f"{server}/v1/analyses/{profile}/screen", params={"name": noise.name},
        content=noise.read_bytes(), headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30,
    )  # fmt: skip
    assert response.status_code == 503, response.text
    assert "no worker of the 'screen' queue answered within 3 s" in response.json()["detail"]
    broker_only = RedisBroker(cluster.redis.url, cluster.app())
    args = [cluster.store, None, profile, noise.name, ""]
    try:
        with pytest.raises(Unavailable):
            broker_only.call(TaskName.SCREEN_SAMPLE, args, "screen", 0.5)
    finally:
        broker_only.close()
