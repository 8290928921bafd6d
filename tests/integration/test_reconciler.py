"""One reconciler pass at a time, against a real Redis and store, no workers: it resends
only batches that no queued message and no live hold covers, only after its bound, and
only one pass per period runs in the cluster."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import RedisServer
from tests.integration.test_cluster import _inputs, _spec
from workers.execution.celery_app import CeleryQueue, make_celery
from workers.extraction.cache import ModelCache
from workers.extraction.inputs import list_inputs
from workers.lifecycle.counters import RedisCounters
from workers.lifecycle.reconciler import LEASE, Reconciler
from workers.lifecycle.state import status
from workers.lifecycle.submit import send_batches, submit
from workers.settings import Settings

pytestmark = pytest.mark.integration


class _Lost:
    """A broker that loses every task it is sent (a restart before a worker took them)."""

    def send(self, task: str, args: list[Any], queue: str) -> None:
        pass

    def workers(self, queue: str) -> int:  # noqa: ARG002 (the signature the caller requires)
        return 1


def test_a_pass_resends_only_uncovered_batches_after_the_bound(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    store = str(tmp_path / "store")
    spec = _spec(_inputs(tmp_path / "x", 40), 4)  # 10 batches
    info = ModelCache().get(spec).info
    app = make_celery(Settings(broker_url=redis_server.url, store=store))  # type: ignore[arg-type]
    job = submit(store, spec, info, list_inputs(spec, info), _Lost(), cap=1)  # the broker lost them
    send_batches(CeleryQueue(app), store, job.job_id, [0, 1, 2], "extract", 1)  # queued after all
    counters = RedisCounters(redis_server.url, period=1)
    counters.hold(job.job_id, [3, 4], time.time() + 60)  # a live worker runs these
    counters.hold(job.job_id, [5], time.time() - 1)  # a dead one held this
    resent: list[tuple[str, list[int], str]] = []
    reconciler = Reconciler(
        store, redis_server.url, counters, lambda j, b, q: resent.append((j, b, q)),
        period=1, bound=30, lease_s=2,
    )  # fmt: skip
    client = redis_server.client()
    at = time.time()
    assert reconciler.run_once(at) == []  # orphans seen, not yet past the bound
    assert reconciler.run_once(at + 31) == []  # another pass within the period: none
    client.delete(LEASE)
    found = reconciler.run_once(at + 31)
    assert [(r.job_id, r.batches) for r in found] == [(job.job_id, [5, 6, 7, 8, 9])]
    assert resent == [(job.job_id, [5, 6, 7, 8, 9], "extract")]
    said = status(store, job.job_id, counters)
    assert said.state == "stalled"
    assert said.reason is not None
    assert said.reason.startswith("no worker has checked in")
    client.zadd("actmap:roster:extract", {"w:1": time.time()})
    said = status(store, job.job_id, counters)
    assert said.state == "stalled"
    assert said.reason is not None
    assert said.reason.startswith("batches 5-9 had no task, re-sent at"), said.reason
    assert said.eta_s is None
