"""Fixtures of the deployment tests: a private Redis (the integration tier's), and a worker
started exactly as a deployment file says, with its paths moved into a temp directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.manifests import ROOT, Worker
from tests.integration.conftest import RedisServer


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.directory.mkdir()
    server.start()
    yield server
    server.stop()


@dataclass
class Started:
    """A worker process and the host paths its container paths were moved to."""

    proc: subprocess.Popen[bytes]
    scratch: Path
    store: Path
    log: Path

    def probe(self, command: list[str]) -> int:
        """Run a probe command as the manifest writes it, on the moved paths."""
        moved = [arg.replace("/scratch", str(self.scratch)) for arg in command]
        return subprocess.run(moved, capture_output=True, timeout=30, check=False).returncode


def start_worker(worker: Worker, redis: RedisServer, root: Path, store: Path) -> Started:
    """Start `worker.argv` with its environment: the broker secret is the private Redis,
    /store and /scratch are directories under `root`, `celery` is this venv's."""
    scratch = root / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    env = {k: v.replace("/scratch", str(scratch)) for k, v in worker.env.items()}
    env["ACTMAP_BROKER_URL"] = redis.url
    env["ACTMAP_STORE"] = str(store)
    assert all(not v.startswith("secret:") for v in env.values()), env
    venv_bin = str(Path(sys.executable).parent)
    full = {
        **os.environ, **env, "PYTHONPATH": str(ROOT),
        "PATH": f"{venv_bin}:{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": "",
    }  # fmt: skip
    log = root / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(worker.argv, env=full, cwd=root, stdout=out, stderr=out)
    return Started(proc, scratch, store, log)


def stop(started: Started) -> None:
    if started.proc.poll() is None:
        started.proc.send_signal(signal.SIGCONT)
        started.proc.send_signal(signal.SIGQUIT)
        try:
            started.proc.wait(30)
        except subprocess.TimeoutExpired:
            started.proc.kill()
            started.proc.wait(10)
