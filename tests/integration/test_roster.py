"""The roster through a real Redis and real `actmap worker` children: each child checks in
on its queues and checks out when stopped; an entry not renewed drops out."""

from __future__ import annotations

import time

from tests.integration.conftest import Cluster, RedisServer, until
from workers.lifecycle.counters import FRESH_S, Roster


def test_worker_children_check_in_on_their_queues_and_out_when_stopped(
    cluster: Cluster,
) -> None:
    roster = Roster(cluster.redis.url)
    cluster.start(workers=2)
    until(lambda: roster.size("extract") == 2, 60, "two workers on the roster")
    assert roster.size("screen") == 0  # started with --queues extract
    cluster.stop()
    until(lambda: roster.size("extract") == 0, 60, "the roster to empty")


def test_only_recent_check_ins_count(redis_server: RedisServer) -> None:
    roster = Roster(redis_server.url)
    roster.check_in("gone:1", ["extract"], at=time.time() - FRESH_S - 1)
    roster.check_in("here:1", ["extract", "screen"])
    roster.check_in("here:1", ["extract"])  # again: still one worker
    assert roster.size("extract") == 1
    assert roster.size("screen") == 1
    roster.check_out("here:1", ["extract", "screen"])
    assert roster.size("extract") == roster.size("screen") == 0
