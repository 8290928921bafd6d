"""The chaos test: a real API, two real workers and a Redis with an append-only file, put
through what clusters do. kill -9 of the API at several points of a submission, Redis shut
down and restarted twice mid-job, kill -9 of a whole worker while another lives: every
acknowledged job finishes by itself, bit-identical to an in-process run, and the time
from each fault to each job's end is printed."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.integration.conftest import (
    Cluster,
    RedisServer,
    _cluster,
    assert_same_job,
    free_port,
    start_api,
    until,
)
from tests.oracle import planned, run_job
from workers.demo.digits import WEIGHTS
from workers.extraction.cache import ModelCache
from workers.jobs import ExtractionSpec, JobState
from workers.lifecycle.state import status
from workers.storage.layout import open_job, read

pytestmark = pytest.mark.integration

FACTORY = "workers.demo.digits:digits_cnn"
TOKEN = "chaos-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LAYERS = ["conv1", "fc"]
N, BATCH = 240, 2  # 120 batches a job
FAST = {"ACTMAP_ROSTER_PERIOD_S": "1", "ACTMAP_RECONCILE_AFTER_S": "3",
        "ACTMAP_BATCHES_PER_TASK": "4"}  # fmt: skip
KILL_AFTER_S = (0.0, 0.15, 0.4)  # into a submission, kill -9 of the API


class Api:
    """`actmap serve` on a fixed port, killed and started again at will."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env, self.port = env, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc, _ = start_api(self.env, self.port)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def submit(self, body: dict[str, object], key: str) -> httpx.Response:
        return httpx.post(
            f"{self.url}/v1/jobs/extractions", json=body, timeout=60,
            headers={**AUTH, "Idempotency-Key": key},
        )  # fmt: skip


def _retry(api: Api, body: dict[str, object], key: str) -> str:
    """The client's idempotent retry, until the API acknowledges."""

    def once() -> str | None:
        try:
            answer = api.submit(body, key)
        except httpx.TransportError:
            return None
        return str(answer.json()["job_id"]) if answer.status_code == 202 else None

    job_id: str = until(once, 60, f"an answer to submission {key}", every=0.2)
    return job_id


@pytest.mark.timeout(600)  # four jobs through five faults: about four minutes on 2 cores
def test_every_acknowledged_job_survives_the_faults_bit_identical(
    durable_redis: RedisServer, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(3)
    for i in range(N):
        np.save(data / f"{i:04d}.npy", rng.standard_normal((1, 28, 28)).astype(np.float32))
    models = ModelCache(factories=(FACTORY,))
    spec = ExtractionSpec(model=FACTORY, weights=str(WEIGHTS), layers=tuple(LAYERS),
                          inputs=(str(data),), batch_size=BATCH)  # fmt: skip
    ref = planned(str(tmp_path / "ref"), spec, models.get(spec).info)
    run_job(str(tmp_path / "ref"), ref.job_id, models)

    auth = {"tenants": {"acme": {"tokens": [TOKEN], "roots": [str(data)]}}}
    (tmp_path / "auth.json").write_text(json.dumps(auth))
    first = _cluster(durable_redis, tmp_path)
    first.env.update(FAST, ACTMAP_AUTH_FILE=str(tmp_path / "auth.json"),
                     ACTMAP_FACTORIES=json.dumps([FACTORY]))  # fmt: skip
    second = Cluster(durable_redis, first.store, dict(first.env))
    api = Api(first.env)
    faults: list[tuple[str, float]] = []
    try:
        api.start()
        first.start(workers=1)
        second.start(workers=1, alive=1)
        with httpx.Client(base_url=api.url, headers=AUTH) as client:
            model_id = client.post(
                "/v1/models", data={"name": "digits", "factory": FACTORY},
                files={"weights": ("w.safetensors", WEIGHTS.read_bytes())},
            ).json()["id"]  # fmt: skip
            until(lambda: client.get(f"/v1/models/{model_id}").json()["state"] == "ready",
                  60, "the model to register")  # fmt: skip
        body = {"model_id": model_id, "inputs": [str(data)], "layers": LAYERS,
                "batch_size": BATCH}  # fmt: skip
        # No batch runs while the submissions are faulted, so that every job is still
        # running when Redis and a worker are: on a loaded machine the jobs ended first, and
        # the wait for progress after a Redis restart ran out.
        control = first.app().control
        control.cancel_consumer("extract", reply=True)

        jobs: list[str] = []
        for i, after in enumerate(KILL_AFTER_S):
            key = f"chaos-{i}"
            sender = threading.Thread(target=lambda k=key: _ignore(api, body, k), daemon=True)
            sender.start()
            time.sleep(after)
            api.kill()
            faults.append((f"kill -9 of the API {after:.2f} s into submission {i}", time.time()))
            api.start()
            jobs.append(_retry(api, body, key))
            sender.join(60)
        control.add_consumer("extract", reply=True)

        def done() -> int:
            return sum(status(first.store, j).batches_done for j in jobs)

        total = 120 * len(jobs)
        mark = until(lambda: (d := done()) >= total // 5 and d, 120, "a fifth of the batches")
        for n in (1, 2):
            durable_redis.restart()
            faults.append((f"Redis restart {n}", time.time()))
            mark = until(partial(_past, done, mark + 10), 120, "progress after the restart")
        first.kill()
        faults.append(("kill -9 of a whole worker (launcher and children)", time.time()))

        ended: dict[str, float] = {}

        def all_ended() -> bool:
            for job_id in jobs:
                if job_id not in ended and JobState(status(first.store, job_id).state).finished:
                    ended[job_id] = time.time()
            return len(ended) == len(jobs)

        until(all_ended, 240, "every acknowledged job to finish by itself", every=0.2)
        for what, at in faults:
            print(f"{what}: jobs ended {', '.join(f'{ended[j] - at:.1f}' for j in jobs)} s later")
        for job_id in jobs:
            found = status(first.store, job_id)
            assert found.state == "succeeded", _failures(first.store, job_id, found.reason)
            assert_same_job(first.store, job_id, str(tmp_path / "ref"), ref.job_id, LAYERS)
        assert len(set(jobs)) == len(jobs)
    finally:
        if api.proc is not None and api.proc.poll() is None:
            api.kill()
        first.stop()
        second.stop()


def _failures(store: str, job_id: str, reason: str | None) -> str:
    """Why a job did not succeed: its reason and each distinct message of its failed samples."""
    group = open_job(store, job_id, mode="r")
    codes = read(group, "error_code")
    messages = read(group, "error_message").astype(object)
    failed = np.flatnonzero(codes != 0)
    distinct = sorted({f"{codes[i]}: {messages[i]}" for i in failed})
    return f"job {job_id}: {reason}; {failed.size} samples failed: {distinct}"


def _past(done: Callable[[], int], goal: int) -> int:
    found = done()
    return found if found >= goal else 0


def _ignore(api: Api, body: dict[str, object], key: str) -> None:
    """A submission whose API is killed under it: the answer, if any, is not awaited."""
    with contextlib.suppress(httpx.TransportError):
        api.submit(body, key)
