"""A worker started as the Kubernetes Deployment and the compose file start it, against a
private Redis: SIGTERM mid-job, a stopped heartbeat, a lost broker."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.deploy.conftest import Started, start_worker, stop
from tests.deploy.manifests import Worker, compose_worker, k8s_worker, kubectl
from tests.integration.conftest import RedisServer, assert_same_job, until
from tests.oracle import planned, run_job
from workers.execution.celery_app import CeleryQueue, make_celery
from workers.extraction.cache import ModelCache
from workers.jobs import ExtractionSpec, JobState
from workers.lifecycle.counters import RedisCounters
from workers.lifecycle.plan import Plan
from workers.lifecycle.state import status
from workers.lifecycle.submit import send_batches
from workers.settings import Settings

pytestmark = pytest.mark.integration

MODEL = "tests.deploy.slow_model:slow_net"
LAYERS = ["conv1", "fc"]
BATCHES, PER_TASK = 24, 4


def _source(name: str) -> Worker:
    if name == "compose":
        return compose_worker()
    if kubectl() is None:
        pytest.skip("kubectl is not installed")
    return k8s_worker("dev-cpu")


def _inputs(directory: Path, n: int = BATCHES * 2) -> Path:
    import numpy as np

    directory.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i in range(n):
        np.save(directory / f"{i:04d}.npy", rng.standard_normal((1, 28, 28)).astype(np.float32))
    return directory


def _spec(inputs: Path) -> ExtractionSpec:
    return ExtractionSpec(model=MODEL, layers=tuple(LAYERS), inputs=(str(inputs),), batch_size=2)


def _submit(redis: RedisServer, store: Path, spec: ExtractionSpec) -> Plan:
    models = ModelCache()
    job = planned(str(store), spec, models.get(spec).info)
    settings = Settings(broker_url=redis.url, store=str(store))  # type: ignore[arg-type]
    jobs = CeleryQueue(make_celery(settings))
    send_batches(jobs, str(store), job.job_id, range(job.n_batches), "extract", PER_TASK)
    return job


def _done(store: Path, job_id: str) -> int:
    return status(str(store), job_id).batches_done


def test_sigterm_mid_job_exits_0_in_the_grace_period_and_the_job_loses_nothing(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The first worker runs as the Deployment says, the second as the compose file says."""
    first_worker, second_worker = _source("kubernetes"), _source("compose")
    store = tmp_path / "store"
    spec = _spec(_inputs(tmp_path / "inputs"))
    reference = planned(str(tmp_path / "ref"), spec, ModelCache().get(spec).info)
    run_job(str(tmp_path / "ref"), reference.job_id, ModelCache())
    job = _submit(redis_server, store, spec)
    assert job.n_batches == BATCHES

    first = start_worker(first_worker, redis_server, tmp_path / "first", store)
    try:
        until(lambda: _done(store, job.job_id) >= 1, 120, "a first batch done")
        # The platform signals the container's main process only (exec-form entry, no init
        # signalling the group): Celery's main process, with its pool child mid-batch.
        signalled = time.monotonic()
        first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(first_worker.grace_s) == 0, first.log.read_text()[-3000:]
        print(f"SIGTERM to exit 0 in {time.monotonic() - signalled:.1f} s")
    finally:
        stop(first)
    left = BATCHES - _done(store, job.job_id)
    assert left > 0, "the job ended before the signal: nothing was interrupted"
    assert "Warm shutdown" in first.log.read_text()

    second = start_worker(second_worker, redis_server, tmp_path / "second", store)
    try:
        counters = RedisCounters(redis_server.url)

        def finished() -> bool:
            return JobState(status(str(store), job.job_id, counters).state).finished

        until(finished, 240, "the job to finish on the second worker", every=0.2)
        print(f"{left} batches left, finished {time.monotonic() - signalled:.1f} s "
              "after the signal, on the second worker")  # fmt: skip
        second.proc.send_signal(signal.SIGTERM)  # idle: it stops at once
        assert second.proc.wait(second_worker.grace_s) == 0
    finally:
        stop(second)
    result = status(str(store), job.job_id)
    assert result.state == "succeeded"
    assert result.n_failed == 0
    assert_same_job(str(store), job.job_id, str(tmp_path / "ref"), reference.job_id, LAYERS)


def _probe_s(worker: Worker, name: str) -> float:
    probe = worker.probes[name]
    return float(probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3))


@pytest.mark.parametrize("source", ["kubernetes", "compose"])
def test_a_stopped_worker_fails_its_liveness_probe_and_readiness_follows_the_broker(
    source: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    worker = _source(source)
    started: Started = start_worker(worker, redis_server, tmp_path / "w", tmp_path / "store")
    liveness = worker.probes["livenessProbe"]["exec"]["command"]
    try:
        startup = worker.probes.get("startupProbe")
        until(lambda: started.probe(liveness) == 0, 120, "the liveness probe to pass")
        if source == "kubernetes":
            assert startup is not None
            assert started.probe(startup["exec"]["command"]) == 0
            ready = worker.probes["readinessProbe"]["exec"]["command"]
            until(lambda: started.probe(ready) == 0, 120, "the worker to be ready")
            redis_server.stop()  # the broker goes: not ready, but alive (Celery reconnects)
            until(lambda: started.probe(ready) != 0, 60, "readiness to drop with the broker")
            assert started.probe(liveness) == 0
            redis_server.start()
            until(lambda: started.probe(ready) == 0, 120, "readiness back with the broker")
        started.proc.send_signal(signal.SIGSTOP)  # a wedged main process: no more heartbeats
        # The probe must fail before the kubelet (or Docker) would have given up on it.
        staleness = 20.0  # seconds, in the probe command
        until(
            lambda: started.probe(liveness) != 0,
            staleness + _probe_s(worker, "livenessProbe"),
            "the liveness probe to fail",
            every=1.0,
        )
    finally:
        stop(started)
