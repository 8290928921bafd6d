"""The `actmap worker` launcher and `actmap scan` straight to a broker, as operators and
trusted cluster scripts use them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import psutil

from tests.integration.conftest import ROOT, Cluster, until

SAMPLES = ROOT / "workers" / "demo" / "samples"


def _cli(cluster: Cluster, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api.cli.main", *argv],
        env=cluster.env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_scan_with_a_broker_url_plans_enqueues_and_waits_for_the_workers(cluster: Cluster) -> None:
    cluster.start(workers=2)
    done = _cli(cluster, "scan", str(SAMPLES), "--model", "digits-cnn", "--layers", "conv1,fc",
                "--labels-from-dirs", "--batch-size", "8", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["state"] == "succeeded"
    assert result["n_samples"] == 40
    assert result["store"] == cluster.store


def test_no_wait_returns_at_once_and_jobs_wait_follows_to_the_end(cluster: Cluster) -> None:
    submitted = _cli(cluster, "scan", str(SAMPLES), "--model", "digits-cnn", "--layers", "fc",
                     "--no-wait", "--json")  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout.splitlines()[-1])["job_id"]
    waiting = json.loads(_cli(cluster, "jobs", "status", job_id, "--json").stdout)
    # no worker yet: nothing has run, and status says why it cannot progress
    assert waiting["batches_done"] == 0
    assert waiting["state"] == "stalled"
    assert "no worker has checked in on queue extract" in waiting["reason"]
    cluster.start(workers=1)
    waited = _cli(cluster, "jobs", "wait", job_id, "--json")
    assert waited.returncode == 0, waited.stderr
    assert json.loads(waited.stdout)["state"] == "succeeded"


def test_the_launcher_restarts_a_worker_that_dies(cluster: Cluster) -> None:
    cluster.start(workers=2)
    assert cluster.launcher is not None
    launcher = psutil.Process(cluster.launcher.pid)
    mains = launcher.children()
    assert len(mains) == 2
    assert all("CUDA_VISIBLE_DEVICES" in p.environ() for p in mains)
    mains[0].send_signal(signal.SIGKILL)

    def replaced() -> bool:
        pids = {p.pid for p in launcher.children()}
        return len(pids) == 2 and mains[0].pid not in pids

    until(replaced, 60, "a replacement worker")
    app = cluster.app()
    until(lambda: len(app.control.ping(timeout=0.5)) >= 2, 60, "both workers answering")


def test_sigterm_to_the_launcher_stops_every_worker_softly(cluster: Cluster) -> None:
    cluster.start(workers=2)
    assert cluster.launcher is not None
    tree = psutil.Process(cluster.launcher.pid).children(recursive=True)
    assert len(tree) >= 4  # two Celery parents, each with its pool child
    cluster.launcher.send_signal(signal.SIGTERM)
    assert cluster.launcher.wait(60) == 0
    _gone, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive
    cluster.launcher = None
