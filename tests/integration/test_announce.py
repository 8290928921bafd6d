"""The finalize announcement through a real Redis: a waiter wakes on it, and a Redis that
is gone makes the listener wait out its timeout, not fail the wait."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from tests.integration.conftest import RedisServer, free_port
from workers.lifecycle.counters import RedisCounters

DEADLINE_S = 30.0


def test_a_listener_wakes_on_its_jobs_announcement_only(redis_server: RedisServer) -> None:
    counters = RedisCounters(redis_server.url)
    with counters.listen("j1") as listener, ThreadPoolExecutor(1) as pool:
        assert not listener.wait(0.05)
        listening = threading.Event()

        def woken() -> bool:
            listening.set()
            return listener.wait(DEADLINE_S)

        came = pool.submit(woken)
        assert listening.wait(DEADLINE_S)
        counters.announce("j2")  # another job's channel
        counters.announce("j1")
        assert came.result(DEADLINE_S + 5)
        assert not listener.wait(0.05)  # one announcement wakes one wait


def test_a_listener_without_redis_waits_out_its_timeout_and_recovers(
    redis_server: RedisServer,
) -> None:
    gone = RedisCounters(f"redis://127.0.0.1:{free_port()}/0")
    with gone.listen("j1") as listener:
        assert not listener.wait(0.05)

    counters = RedisCounters(redis_server.url)
    with counters.listen("j1") as listener:
        redis_server.restart()
        assert not listener.wait(0.05)  # the old connection is gone: no error
        came: list[bool] = []
        for _ in range(100):  # subscribes again on a later call
            counters.announce("j1")
            came.append(listener.wait(0.05))
            if came[-1]:
                break
        assert came[-1]
