"""The broker's quota primitives, the same suite against the Redis broker (a private
redis-server) and the in-memory one: a tally that refuses past its limit and gives back,
and a lock that is one holder's at a time and outlives no dead holder on Redis."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from api.broker import Broker, Busy, MemoryBroker, RedisBroker
from tests.integration.conftest import ROOT, RedisServer, until


@pytest.fixture(params=["memory", "redis"])
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    if request.param == "memory":
        yield MemoryBroker()
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        found = RedisBroker(server.url, app=None)
        yield found
        found.close()


def test_a_tally_starts_from_its_count_refuses_past_the_limit_and_gives_back(
    broker: Broker,
) -> None:
    counted: list[int] = []

    def initial() -> int:
        counted.append(1)
        return 600

    assert broker.add("tally:acme", 300, 1000, initial)
    assert not broker.add("tally:acme", 200, 1000, initial)  # 900 + 200
    assert broker.add("tally:acme", -300, 1000, initial)
    assert broker.add("tally:acme", 400, 1000, initial)  # 600 + 400
    assert counted == [1]  # counted from its source once, then kept


def test_a_lock_is_one_holders_at_a_time(broker: Broker) -> None:
    with broker.lock("lock:acme", 0.5), pytest.raises(Busy):
        broker.lock("lock:acme", 0.5).__enter__()
    with broker.lock("lock:acme", 0.5):
        pass


_HOLDER = """
import sys, time
from api.broker import RedisBroker
lock = RedisBroker(sys.argv[1], app=None).lock("lock:acme", 2.0)
lock.__enter__()
print("held", flush=True)
time.sleep(600)
"""


def test_a_lock_whose_holder_dies_is_free_after_its_lifetime(redis_server: RedisServer) -> None:
    broker = RedisBroker(redis_server.url, app=None)

    def taken() -> Any:
        try:
            with broker.lock("lock:acme", 0.1):
                return True
        except Busy:
            return False

    with subprocess.Popen(
        [sys.executable, "-c", _HOLDER, redis_server.url], cwd=ROOT, stdout=subprocess.PIPE,
        text=True,
    ) as holder:  # fmt: skip
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "held"
            assert not taken()
        finally:
            holder.kill()
    until(taken, 30, "the dead holder's lock to expire")
    broker.close()
