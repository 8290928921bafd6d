"""Jobs across real worker processes and a real Redis, surviving what clusters do to them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.integration.conftest import ROOT, Cluster, RedisServer, assert_same_job, until
from tests.integration.poison_model import POISON
from tests.oracle import planned, run_job
from workers.errors import SampleCode
from workers.execution.celery_app import CeleryQueue
from workers.extraction.cache import ModelCache
from workers.jobs import ExtractionSpec
from workers.lifecycle.plan import Plan
from workers.lifecycle.state import prepare_resume, resume_batches, status
from workers.lifecycle.submit import send_batches
from workers.storage.layout import open_job, read

MODEL = "tests.integration.poison_model:poison_net"
LAYERS = ["conv1", "block2", "fc"]


def _inputs(directory: Path, n: int, poison: int | None = None) -> Path:
    directory.mkdir(parents=True)
    rng = np.random.default_rng(7)
    for i in range(n):
        x = rng.standard_normal((1, 28, 28)).astype(np.float32)
        if i == poison:
            x[0, 0, 0] = POISON
        np.save(directory / f"{i:05d}.npy", x)
    return directory


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _inputs(tmp_path_factory.mktemp("inputs") / "x", 2000)


def _spec(inputs: Path, batch_size: int) -> ExtractionSpec:
    return ExtractionSpec(
        model=MODEL, layers=tuple(LAYERS), inputs=(str(inputs),), batch_size=batch_size
    )


@pytest.fixture(scope="module")
def models() -> ModelCache:
    return ModelCache()


def _reference(store: Path, spec: ExtractionSpec, models: ModelCache) -> str:
    job = planned(str(store), spec, models.get(spec).info)
    run_job(str(store), job.job_id, models)
    return job.job_id


def _submit(cluster: Cluster, spec: ExtractionSpec, models: ModelCache, per_task: int = 1) -> Plan:
    job = planned(cluster.store, spec, models.get(spec).info)
    jobs = CeleryQueue(cluster.app())
    send_batches(jobs, cluster.store, job.job_id, range(job.n_batches), "extract", per_task)
    return job


def _drained(cluster: Cluster) -> bool:
    """Nothing waits in the queue and nothing taken is unacknowledged, twice in a row (kombu
    moves a message from the list to its unacked hash in two steps)."""
    client = cluster.redis.client()

    def idle() -> bool:
        return client.llen("extract") == 0 and client.hlen("unacked") == 0

    return idle() and idle()


def _done(cluster: Cluster, job_id: str) -> int:
    return status(cluster.store, job_id).batches_done


def test_a_2000_sample_job_across_two_workers_equals_an_in_process_run(
    cluster: Cluster, inputs: Path, models: ModelCache, tmp_path: Path
) -> None:
    spec = _spec(inputs, 32)
    ref = _reference(tmp_path / "ref", spec, models)
    cluster.start(workers=2)
    job = _submit(cluster, spec, models)
    result = cluster.wait(job.job_id)
    assert result.state == "succeeded"
    assert result.samples_done == 2000
    assert_same_job(cluster.store, job.job_id, str(tmp_path / "ref"), ref, LAYERS)


def test_tasks_out_of_time_hand_their_batches_on_and_the_job_completes(
    cluster: Cluster, inputs: Path, models: ModelCache, tmp_path: Path
) -> None:
    spec = _spec(inputs, 16)  # 125 batches
    ref = _reference(tmp_path / "ref", spec, models)
    cluster.env["ACTMAP_TASK_BUDGET_S"] = "0"  # each task runs one batch, sends the rest on
    cluster.start(workers=1)
    sent = cluster.redis.client().info("commandstats").get("cmdstat_lpush", {}).get("calls", 0)
    job = _submit(cluster, spec, models, per_task=125)  # one task for the whole job
    result = cluster.wait(job.job_id)
    assert result.state == "succeeded"
    assert result.n_failed == 0
    assert_same_job(cluster.store, job.job_id, str(tmp_path / "ref"), ref, LAYERS)
    # kombu publishes a task with one LPUSH: the job's task, then 124 handed on.
    stats = cluster.redis.client().info("commandstats")
    assert stats["cmdstat_lpush"]["calls"] - sent >= 125


@pytest.mark.parametrize("kill_at", [3, 25, 60])
def test_kill_9_of_a_worker_child_mid_job_loses_and_duplicates_nothing(
    cluster: Cluster, inputs: Path, models: ModelCache, tmp_path: Path, kill_at: int
) -> None:
    spec = _spec(inputs, 16)  # 125 batches
    ref = _reference(tmp_path / "ref", spec, models)
    cluster.start(workers=1)
    job = _submit(cluster, spec, models)
    until(lambda: _done(cluster, job.job_id) >= kill_at, 120, f"{kill_at} batches")
    killed = cluster.kill_a_child()
    until(lambda: any(c.pid != killed for c in cluster.children()), 60, "a new worker child")
    result = cluster.wait(job.job_id)
    assert result.state == "succeeded"
    assert result.n_failed == 0
    assert_same_job(cluster.store, job.job_id, str(tmp_path / "ref"), ref, LAYERS)


@pytest.mark.parametrize("per_task", [1, 4])
def test_a_poison_batch_stops_at_the_attempt_cap_and_the_rest_completes(
    cluster: Cluster, models: ModelCache, tmp_path: Path, per_task: int
) -> None:
    poisoned = _inputs(tmp_path / "poisoned", 200, poison=65)
    # The poison sits in batch 3; with 4 batches to a task, behind three good ones whose
    # last write may be in flight each time the poison kills the worker.
    spec = _spec(poisoned, 20)
    cluster.start(workers=1)
    job = _submit(cluster, spec, models, per_task)
    result = cluster.wait(job.job_id)
    assert result.state == "partial"
    group = open_job(cluster.store, job.job_id, mode="r")
    codes, messages = read(group, "error_code"), read(group, "error_message")
    assert (codes[60:80] == SampleCode.BATCH_FAILED).all()
    assert "given up after 3 attempts" in messages[65]
    assert (codes[:60] == 0).all()
    assert (codes[80:] == 0).all()
    assert read(group, "done").all()
    attempts = cluster.redis.client().hget(f"actmap:{job.job_id}:attempts", "3")
    assert int(attempts or 0) == 4  # three deaths, then the start that gives up


def test_redis_restarted_mid_job_loses_nothing(
    durable_cluster: Cluster, durable_redis: RedisServer, inputs: Path, models: ModelCache,
    tmp_path: Path,
) -> None:  # fmt: skip
    spec = _spec(inputs, 16)
    ref = _reference(tmp_path / "ref", spec, models)
    durable_cluster.start(workers=1)
    job = _submit(durable_cluster, spec, models)
    until(lambda: _done(durable_cluster, job.job_id) >= 10, 120, "10 batches")
    durable_redis.restart()
    # Queued messages survive in the append-only file; a batch in flight at the restart
    # is redelivered only after the visibility timeout, so resume re-enqueues what the
    # ledger lacks once the queue has drained. The batch in flight may have reached the
    # ledger but not the done-count (Redis was gone): resume squares the two, or the job
    # would never finalize.
    client = durable_redis.client()
    until(lambda: client.llen("extract") == 0, 180, "the queue to drain after the restart")
    missing = resume_batches(durable_cluster.store, job.job_id, durable_cluster.counters())
    jobs = CeleryQueue(durable_cluster.app())
    send_batches(jobs, durable_cluster.store, job.job_id, missing, "extract", 1)
    result = durable_cluster.wait(job.job_id)
    assert result.state == "succeeded"
    assert_same_job(durable_cluster.store, job.job_id, str(tmp_path / "ref"), ref, LAYERS)


def _chunk_times(store: str, job_id: str) -> dict[str, int]:
    root = Path(store) / "jobs" / job_id / "layers"
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("c/*") if p.is_file()}


def test_cancel_stops_at_a_batch_boundary_and_resume_runs_exactly_the_missing_batches(
    cluster: Cluster, inputs: Path, models: ModelCache, tmp_path: Path
) -> None:
    spec = _spec(inputs, 16)
    ref = _reference(tmp_path / "ref", spec, models)
    cluster.start(workers=1)
    job = _submit(cluster, spec, models)
    until(lambda: _done(cluster, job.job_id) >= 5, 120, "5 batches")
    done = subprocess.run(
        [sys.executable, "-m", "api.cli.main", "jobs", "cancel", job.job_id, "--json"],
        env=cluster.env, cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    until(lambda: _drained(cluster), 120, "every task to be taken and acknowledged")
    group = open_job(cluster.store, job.job_id, mode="r")
    ledger = read(group, "done")
    assert group.attrs["state"] == "cancelled"
    assert 5 <= ledger.sum() < job.n_batches
    acts = read(group, "layers/conv1/acts").reshape(2000, -1)
    rows_done = np.repeat(ledger, 16)[:2000]
    assert np.isfinite(acts[rows_done]).all()  # whole batches written...
    assert np.isnan(acts[~rows_done]).all()  # ...and nothing of the rest
    before = _chunk_times(cluster.store, job.job_id)

    missing = prepare_resume(cluster.store, job.job_id, cluster.counters())
    assert missing == [int(b) for b in np.flatnonzero(~ledger)]
    send_batches(CeleryQueue(cluster.app()), cluster.store, job.job_id, missing, "extract", 1)
    result = cluster.wait(job.job_id)
    assert result.state == "succeeded"
    after = _chunk_times(cluster.store, job.job_id)
    assert {k: after[k] for k in before} == before  # done batches were not run again
    assert_same_job(cluster.store, job.job_id, str(tmp_path / "ref"), ref, LAYERS)


def test_the_same_batch_delivered_twice_at_once_leaves_identical_bytes(
    cluster: Cluster, inputs: Path, models: ModelCache, tmp_path: Path
) -> None:
    spec = _spec(inputs, 500)  # 4 batches, each long enough for both workers to overlap
    ref = _reference(tmp_path / "ref", spec, models)
    cluster.start(workers=2)
    job = planned(cluster.store, spec, models.get(spec).info)
    jobs = CeleryQueue(cluster.app())
    for batch in range(job.n_batches):  # each batch twice, back to back: both workers take one
        send_batches(jobs, cluster.store, job.job_id, [batch, batch], "extract", 1)
    result = cluster.wait(job.job_id)
    assert result.state == "succeeded"
    until(lambda: _drained(cluster), 120, "every task to be taken and acknowledged")
    assert_same_job(cluster.store, job.job_id, str(tmp_path / "ref"), ref, LAYERS)
    assert read(open_job(cluster.store, job.job_id, mode="r"), "done").all()


def test_the_embedded_default_needs_no_redis_or_network(tmp_path: Path) -> None:
    """In a network namespace of its own, nothing but loopback exists, and it is down."""
    if os.geteuid() != 0 or subprocess.run(["unshare", "-n", "true"], check=False).returncode:
        pytest.skip("needs root to make a network namespace")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTMAP_")}
    samples = ROOT / "workers" / "demo" / "samples" / "4"
    done = subprocess.run(
        ["unshare", "-n", sys.executable, "-m", "api.cli.main", "scan", str(samples),
         "--model", "digits-cnn", "--layers", "conv1,fc", "--out", str(tmp_path / "s"), "--json"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert '"state": "succeeded"' in done.stdout.splitlines()[-1]
