"""Real services for the integration tier: a private redis-server on a free port, and real
`actmap worker` processes (the launcher, Celery's prefork parents and their children).

Nothing here touches the machine's own Redis on 6379. Waits poll with a deadline.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
import redis

from workers.execution.celery_app import make_celery
from workers.jobs import JobState
from workers.lifecycle.counters import RedisCounters
from workers.lifecycle.state import Status, status
from workers.settings import Settings
from workers.storage.layout import open_job, read

ROOT = Path(__file__).parents[2]

pytestmark = pytest.mark.integration

if shutil.which("redis-server") is None:  # .ci/run installs it; say so clearly elsewhere
    pytest.skip("redis-server is not installed", allow_module_level=True)


def until(check: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    """Poll `check` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def start_api(
    env: dict[str, str], port: int | None = None, log: Path | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """A real `actmap serve` with `env` on `port` (a free one by default), returned with its
    URL once it answers /readyz; its output goes to `log` when given, else nowhere."""
    port = port or free_port()
    with log.open("wb") if log is not None else nullcontext(subprocess.DEVNULL) as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "api.cli.main", "serve", "--port", str(port)],
            env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        until(lambda: _ready(url), 60, "the API to be ready", every=0.1)
    except BaseException:
        proc.kill()
        proc.wait(30)
        raise
    return proc, url


@contextmanager
def serving(env: dict[str, str]) -> Iterator[str]:
    """`start_api` for the length of a block; the server is stopped after it."""
    proc, url = start_api(env)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


@dataclass
class RedisServer:
    directory: Path
    appendonly: bool = False
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)

    def start(self) -> None:
        args = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.directory), "--save", "",
            "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)

        def up() -> bool:
            try:
                return bool(self.client().ping())
            except redis.ConnectionError:
                return False

        until(up, 10, f"redis-server on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis flushes its append-only file, then exits
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.directory.mkdir()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """Append-only, fsync always: what it acknowledged survives a restart."""
    server = RedisServer(tmp_path / "redis", appendonly=True)
    server.directory.mkdir()
    server.start()
    yield server
    server.stop()


@dataclass
class Cluster:
    """`actmap worker --cpu N` against a private Redis, and a client app for submitting."""

    redis: RedisServer
    store: str
    env: dict[str, str]
    launcher: subprocess.Popen[bytes] | None = None

    @property
    def settings(self) -> Settings:
        return Settings(broker_url=self.redis.url, store=self.store)  # type: ignore[arg-type]

    def app(self) -> Any:
        return make_celery(self.settings)

    def counters(self) -> RedisCounters:
        return RedisCounters(self.redis.url)

    def start(self, workers: int, alive: int = 0, queues: str = "extract") -> None:
        """Start `workers` CPU workers of `queues`; `alive` others already answer on the
        same Redis."""
        argv = ["worker", "--cpu", str(workers), "--queues", queues]
        self.launcher = subprocess.Popen(
            [sys.executable, "-m", "api.cli.main", *argv],
            env=self.env, cwd=ROOT, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        app = self.app()
        until(
            lambda: len(app.control.ping(timeout=0.5)) >= workers + alive, 60, f"{workers} workers"
        )

    def children(self) -> list[psutil.Process]:
        """The pool children doing the work: grandchildren of the launcher."""
        assert self.launcher is not None
        mains = psutil.Process(self.launcher.pid).children()
        return [c for m in mains for c in m.children()]

    def kill_a_child(self) -> int:
        victim = until(self.children, 30, "a worker child")[0]
        victim.send_signal(signal.SIGKILL)
        return int(victim.pid)

    def kill(self) -> None:
        """kill -9 of the whole worker: the launcher, the Celery parents and their children,
        as when its host dies."""
        assert self.launcher is not None
        os.killpg(self.launcher.pid, signal.SIGKILL)
        self.launcher.wait(10)
        self.launcher = None

    def cli(self, *argv: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """`actmap ARGV` with this cluster's environment."""
        return subprocess.run(
            [sys.executable, "-m", "api.cli.main", *argv], env=self.env, cwd=ROOT,
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def stop(self) -> None:
        if self.launcher is None:
            return
        try:
            os.killpg(self.launcher.pid, signal.SIGTERM)
            self.launcher.wait(60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.launcher.pid, signal.SIGKILL)
            self.launcher.wait(10)
        self.launcher = None

    def wait(self, job_id: str, timeout: float = 240) -> Status:
        counters = self.counters()

        def finished() -> Status | None:
            current = status(self.store, job_id, counters)
            return current if JobState(current.state).finished else None

        result: Status = until(finished, timeout, f"job {job_id} to finish", every=0.2)
        return result


def _cluster(server: RedisServer, tmp_path: Path) -> Cluster:
    store = str(tmp_path / "store")
    env = {**os.environ, "ACTMAP_BROKER_URL": server.url, "ACTMAP_STORE": store}
    return Cluster(server, store, {**env, "PYTHONPATH": str(ROOT)})


@pytest.fixture
def cluster(redis_server: RedisServer, tmp_path: Path) -> Iterator[Cluster]:
    found = _cluster(redis_server, tmp_path)
    yield found
    found.stop()


@pytest.fixture
def durable_cluster(durable_redis: RedisServer, tmp_path: Path) -> Iterator[Cluster]:
    found = _cluster(durable_redis, tmp_path)
    yield found
    found.stop()


ARRAYS = ("sample", "label", "logits", "pred", "error_code", "error_message", "done")


def assert_same_job(
    store: str, job_id: str, ref_store: str, ref_id: str, layers: list[str]
) -> None:
    """Every array of the job equals the reference run's, bit for bit (NaN equal to NaN)."""
    got, want = open_job(store, job_id, mode="r"), open_job(ref_store, ref_id, mode="r")
    names = list(ARRAYS) + [f"layers/{n}/{a}" for n in layers for a in ("acts", "pooled")]
    for name in names:
        np.testing.assert_array_equal(read(got, name), read(want, name), err_msg=name)
    ids = list(read(got, "sample"))
    assert len(ids) == len(set(ids))
