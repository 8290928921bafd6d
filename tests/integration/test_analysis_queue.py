"""`actmap health` with a broker URL: the analysis is a task on the `analysis` queue of a real
Redis, run by a real `actmap worker --queues analysis` process, not by the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.integration.conftest import ROOT, Cluster, until
from tests.oracle import planned, run_job
from workers.analysis.requests import describe
from workers.extraction.cache import ModelCache
from workers.jobs import ExtractionSpec
from workers.storage.analyses import analysis_ids

SAMPLES = ROOT / "workers" / "demo" / "samples"


def _finished_job(store: str) -> str:
    spec = ExtractionSpec(
        model="digits-cnn", layers=("conv3", "fc"), inputs=(str(SAMPLES),), labels_from_dirs=True
    )
    models = ModelCache()
    job = planned(store, spec, models.get(spec).info)
    run_job(store, job.job_id, models)
    return job.job_id


def _start_analysis_worker(cluster: Cluster) -> None:
    """`actmap worker --cpu 1 --queues analysis`; the cluster fixture stops it."""
    cluster.launcher = subprocess.Popen(
        [sys.executable, "-m", "api.cli.main", "worker", "--cpu", "1", "--queues", "analysis"],
        env=cluster.env, cwd=ROOT, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    app = cluster.app()
    until(lambda: len(app.control.ping(timeout=0.5)) >= 1, 60, "the analysis worker")


def test_health_with_a_broker_url_waits_on_the_analysis_queue_for_a_worker_to_run_it(
    cluster: Cluster,
) -> None:
    job_id = _finished_job(cluster.store)
    redis = cluster.redis.client()
    cli = subprocess.Popen(
        [sys.executable, "-m", "api.cli.main", "health", job_id, "--json"],
        env=cluster.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # No worker yet: the request waits on the queue, and the CLI waits for it.
        until(lambda: redis.llen("analysis") == 1, 60, "the task on the analysis queue")
        (analysis_id,) = analysis_ids(cluster.store)
        assert describe(cluster.store, analysis_id).state == "queued"
        assert cli.poll() is None
        _start_analysis_worker(cluster)
        out, err = cli.communicate(timeout=240)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert cli.returncode == 0, err
    printed = json.loads(out.strip().splitlines()[-1])
    assert printed["analysis_id"] == analysis_id
    assert printed["kind"] == "health"
    assert printed["state"] == "succeeded"
    assert set(printed["layers"]) == {"conv3", "fc"}
    assert describe(cluster.store, analysis_id).state == "succeeded"
    assert redis.llen("analysis") == 0
