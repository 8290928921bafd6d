"""The job counters' contract, held by both twins: MemoryCounters (the embedded default)
and RedisCounters (workers on a broker). Each test uses a job id of its own, so the Redis
twin shares one server across the module."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from workers.jobs import new_id
from workers.lifecycle.counters import Counters, MemoryCounters, RedisCounters, Roster, Stall


@dataclass
class Twin:
    counters: Counters
    check_in: Callable[[str], None]  # a worker on this queue says it is alive


@pytest.fixture(params=["memory", "redis"])
def twin(request: pytest.FixtureRequest) -> Twin:
    if request.param == "memory":
        # The embedded worker lives in the submitting process: it is always checked in.
        return Twin(MemoryCounters(), lambda _queue: None)
    url: str = request.getfixturevalue("redis_url")
    roster = Roster(url)
    return Twin(RedisCounters(url), lambda queue: roster.check_in(f"w-{new_id()}", [queue]))


@pytest.fixture
def counters(twin: Twin) -> Counters:
    return twin.counters


@pytest.fixture
def job() -> str:
    return new_id()


def test_a_job_never_seen_has_nothing_recorded(counters: Counters, job: str) -> None:
    assert counters.done_count(job) == 0
    assert counters.started(job) is None
    assert counters.progressed(job) is None
    assert counters.holds(job) == {}
    assert counters.stall(job) == Stall()


def test_attempts_count_per_batch_and_the_first_marks_the_start(
    counters: Counters, job: str
) -> None:
    before = time.time()
    assert [counters.attempt(job, 0) for _ in range(3)] == [1, 2, 3]
    assert counters.attempt(job, 1) == 1
    assert counters.attempt(new_id(), 0) == 1  # another job counts apart
    started = counters.started(job)
    assert started is not None
    assert before - 1 <= started <= time.time() + 1
    counters.attempt(job, 2)
    assert counters.started(job) == started


def test_done_is_idempotent_and_counts_distinct_batches(counters: Counters, job: str) -> None:
    assert counters.done(job, 0) == 1
    assert counters.done(job, 0) == 1  # a redelivered batch is counted once
    assert counters.done(job, 3) == 2
    assert counters.done_count(job) == 2
    assert counters.progressed(job) is not None


def test_exactly_one_of_many_concurrent_callers_claims_finalize(
    counters: Counters, job: str
) -> None:
    claims: list[bool] = []
    gate = threading.Barrier(8)

    def claim() -> None:
        gate.wait()
        claims.append(counters.claim_finalize(job))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claims) == [False] * 7 + [True]
    assert counters.claim_finalize(job) is False


def test_reset_forgets_the_attempts_and_the_claim_and_records_the_ledgers_done(
    counters: Counters, job: str
) -> None:
    for batch in (0, 1, 2):
        counters.attempt(job, batch)
    counters.attempt(job, 1)
    counters.done(job, 0)
    assert counters.claim_finalize(job)
    counters.reset(job, [1, 2], done=[0, 3])
    assert counters.attempt(job, 1) == 1
    assert counters.attempt(job, 0) == 2  # not in the reset: its count goes on
    assert counters.done_count(job) == 2  # 0 and 3, the ledger's batches
    assert counters.claim_finalize(job)


def test_an_announcement_wakes_a_listener_made_before_it(counters: Counters, job: str) -> None:
    with counters.listen(job) as listener:
        assert listener.wait(0.05) is False
        threading.Timer(0.1, counters.announce, [job]).start()
        assert listener.wait(10) is True


def test_a_listener_is_not_woken_by_another_jobs_announcement(counters: Counters, job: str) -> None:
    with counters.listen(job) as listener:
        counters.announce(new_id())
        assert listener.wait(0.2) is False


def test_leases_are_held_renewed_and_dropped(counters: Counters, job: str) -> None:
    counters.hold(job, [0, 1], until=100.0)
    counters.hold(job, [1], until=200.0)
    assert counters.holds(job) == {0: 100.0, 1: 200.0}
    counters.drop(job, [0])
    assert counters.holds(job) == {1: 200.0}
    counters.drop(job, [0, 1])
    assert counters.holds(job) == {}


def test_orphans_keep_when_first_found_and_a_resend_clears_them(
    counters: Counters, job: str
) -> None:
    assert counters.orphans(job, [0, 1], at=10.0) == {0: 10.0, 1: 10.0}
    assert counters.orphans(job, [1, 2], at=20.0) == {1: 10.0, 2: 20.0}  # 0 is gone
    counters.resent(job, [1], at=30.0)
    stall = counters.stall(job)
    assert stall.orphans == {2: 20.0}
    assert stall.resent == [1]
    assert stall.resent_at == 30.0


def test_a_worker_that_checked_in_is_seen_as_alive(twin: Twin) -> None:
    queue = f"q-{new_id()}"
    twin.check_in(queue)
    seen, gone_after = twin.counters.last_check_in(queue)
    assert seen is not None
    assert gone_after > 0
    assert time.time() - seen < gone_after
