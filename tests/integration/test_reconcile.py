"""Nothing acknowledged is lost, nothing stalls unseen: a dead worker host and a Redis
restart are noticed by the reconciler in about the roster's period plus its bound, status
says `stalled` and why meanwhile, and Ctrl-C of an embedded scan leaves a resumable job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.integration.conftest import ROOT, Cluster, RedisServer, assert_same_job, until
from tests.integration.poison_model import HOLD
from tests.integration.test_cluster import LAYERS, MODEL, _inputs, _reference, _spec
from workers.extraction.cache import ModelCache
from workers.lifecycle.state import status
from workers.storage.index import unfinished

# Short periods so that a test sees the reconciler act in seconds, not minutes.
FAST = {
    "ACTMAP_ROSTER_PERIOD_S": "1",
    "ACTMAP_RECONCILE_AFTER_S": "3",
    "ACTMAP_BATCHES_PER_TASK": "8",
}
BATCH = 4  # 200 batches of the 800 inputs: long enough to fault mid-job


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _inputs(tmp_path_factory.mktemp("inputs") / "x", 800)


@pytest.fixture(scope="module")
def models() -> ModelCache:
    return ModelCache()


def scan(cluster: Cluster, inputs: Path) -> str:
    """`actmap scan --no-wait` on the broker: how a trusted script submits."""
    done = cluster.cli(
        "scan", str(inputs), "--model", MODEL, "--layers", ",".join(LAYERS),
        "--batch-size", str(BATCH), "--no-wait", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    job_id: str = json.loads(done.stdout.splitlines()[-1])["job_id"]
    return job_id


def job_status(cluster: Cluster, job_id: str) -> dict[str, Any]:
    done = cluster.cli("jobs", "status", job_id, "--json")
    assert done.returncode == 0, done.stderr
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def test_a_dead_worker_host_is_noticed_said_stalled_and_its_batches_sent_again(
    cluster: Cluster, inputs: Path, models: ModelCache, tmp_path: Path
) -> None:
    ref = _reference(tmp_path / "ref", _spec(inputs, BATCH), models)
    cluster.env.update(FAST)
    cluster.start(workers=1)
    job_id = scan(cluster, inputs)
    until(lambda: status(cluster.store, job_id).batches_done >= 5, 120, "5 batches")
    cluster.kill()  # its task stays unacknowledged in Redis until the visibility timeout

    def stalled() -> dict[str, Any] | None:
        found = job_status(cluster, job_id)
        return found if found["state"] == "stalled" else None

    said = until(stalled, 60, "status to say stalled", every=0.5)
    assert said["reason"].startswith("no worker has checked in on queue extract"), said
    assert said["eta_s"] is None
    assert said["samples_per_s"] is None
    cluster.start(workers=1)
    result = cluster.wait(job_id, timeout=180)
    assert result.state == "succeeded"
    assert_same_job(cluster.store, job_id, str(tmp_path / "ref"), ref, LAYERS)


def test_redis_restarted_mid_job_the_lost_task_is_sent_again_by_itself(
    durable_cluster: Cluster, durable_redis: RedisServer, inputs: Path, models: ModelCache,
    tmp_path: Path,
) -> None:  # fmt: skip
    ref = _reference(tmp_path / "ref", _spec(inputs, BATCH), models)
    durable_cluster.env.update(FAST)
    durable_cluster.start(workers=1)
    job_id = scan(durable_cluster, inputs)
    until(lambda: status(durable_cluster.store, job_id).batches_done >= 10, 120, "10 batches")
    durable_redis.restart()
    result = durable_cluster.wait(job_id, timeout=180)
    assert result.state == "succeeded"
    assert_same_job(durable_cluster.store, job_id, str(tmp_path / "ref"), ref, LAYERS)


def test_ctrl_c_of_an_embedded_scan_stops_resumably_and_says_how_to_resume(
    inputs: Path, models: ModelCache, tmp_path: Path
) -> None:
    ref = _reference(tmp_path / "ref", _spec(inputs, BATCH), models)
    store = str(tmp_path / "store")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTMAP_")}
    env["PYTHONPATH"] = str(ROOT)
    argv = [sys.executable, "-m", "api.cli.main"]
    proc = subprocess.Popen(
        [*argv, "scan", str(inputs), "--model", MODEL, "--layers", ",".join(LAYERS),
         "--batch-size", str(BATCH), "--out", store, "--json"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:

        def started() -> str | None:
            found = unfinished(store)  # planned whole: its arrays are all there
            if found and status(store, found[0]).batches_done >= 3:
                return found[0]
            return None

        job_id: str = until(started, 120, "3 batches of the embedded scan", every=0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert f"actmap jobs resume {job_id}" in err

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*argv, *args, "--store", store], env=env, cwd=ROOT, capture_output=True,
            text=True, timeout=120, check=False,
        )  # fmt: skip

    said = json.loads(cli("jobs", "status", job_id, "--json").stdout)
    assert said["state"] == "stalled"
    assert said["reason"].startswith("interrupted"), said
    assert 3 <= said["batches_done"] < said["n_batches"]
    waited = cli("jobs", "wait", job_id)  # returns at once: nothing will run it by itself
    assert waited.returncode == 1, waited.stderr
    assert "interrupted" in waited.stdout
    resumed = cli("jobs", "resume", job_id, "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["state"] == "succeeded"
    assert_same_job(store, job_id, str(tmp_path / "ref"), ref, LAYERS)


def test_a_batch_running_through_a_redis_restart_costs_no_attempt(
    durable_cluster: Cluster, durable_redis: RedisServer, models: ModelCache, tmp_path: Path
) -> None:
    """A Redis restart is no failure of the batch in flight: it is not started again at the
    cost of an attempt. With a cap of one attempt, a batch running through a restart would
    be given up (the job partial) if the restart cut it short; a poison batch still meets
    the cap (test_cluster)."""
    inputs = _inputs(tmp_path / "x", 40)
    held = np.load(inputs / "00010.npy")
    held[0, 0, 0] = HOLD  # batch 2 of 10: the model waits on it while the hold file exists
    np.save(inputs / "00010.npy", held)
    ref = _reference(tmp_path / "ref", _spec(inputs, BATCH), models)
    hold = tmp_path / "hold"
    hold.touch()
    durable_cluster.env.update(FAST, ACTMAP_ATTEMPT_CAP="1", ACTMAP_TEST_HOLD=str(hold))
    durable_cluster.start(workers=1)
    job_id = scan(durable_cluster, inputs)
    until(Path(f"{hold}.started").exists, 120, "the held batch to start")
    durable_redis.restart()
    hold.unlink()
    result = durable_cluster.wait(job_id, timeout=180)
    assert result.state == "succeeded", result.reason
    assert_same_job(durable_cluster.store, job_id, str(tmp_path / "ref"), ref, LAYERS)
