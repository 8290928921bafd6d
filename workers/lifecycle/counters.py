"""Counters beside the ledger: attempts per batch, the set of batches done, who finalizes.

Redis holds them on a cluster; a dict holds them in the embedded default. They are hints
and guards; the ledger in the store stays the truth about what is done.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self

__all__ = [
    "CHECK_IN_S",
    "FRESH_S",
    "Counters",
    "Listener",
    "MemoryCounters",
    "RedisCounters",
    "Roster",
    "Stall",
]

_TTL = 7 * 24 * 3600
# A worker child checks in on the roster every CHECK_IN_S (its period) and counts for
# FRESH_S, three periods: one that died drops out on its own.
CHECK_IN_S = 60.0
FRESH_S = 180.0
_ROSTER_TTL = 24 * 3600


class Listener(Protocol):
    """Wakes a waiter when a job's finalize is announced, instead of it polling the store."""

    def wait(self, timeout: float) -> bool:
        """Block until an announcement or `timeout` seconds; True if one came."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


@dataclass(frozen=True)
class Stall:
    """What the reconciler last found of a job: batches with no task since when, and the
    batches it last sent again, when."""

    orphans: dict[int, float] = field(default_factory=dict)
    resent: list[int] = field(default_factory=list)
    resent_at: float | None = None


class Counters(Protocol):
    def attempt(self, job_id: str, batch: int) -> int:
        """Count one more start of this batch and return the count."""
        ...

    def done(self, job_id: str, batch: int) -> int:
        """Record the batch as done (idempotent) and return how many are done."""
        ...

    def claim_finalize(self, job_id: str) -> bool:
        """True for exactly one caller per job, until `reset`."""
        ...

    def done_count(self, job_id: str) -> int:
        """How many batches `done` has recorded (a hint; the ledger decides)."""
        ...

    def started(self, job_id: str) -> float | None:
        """When the first batch of the job started (set by the first `attempt`)."""
        ...

    def reset(self, job_id: str, batches: list[int], done: list[int]) -> None:
        """For resume: forget attempts of `batches` and the finalize claim, and record
        `done` (the ledger's batches). A worker that dies between its ledger write and its
        count, or loses Redis there, leaves the count short of the ledger; without this the
        last batch of the resumed job would never see the count reach the total."""
        ...

    def announce(self, job_id: str) -> None:
        """Tell every listener of the job that it reached its final state."""
        ...

    def listen(self, job_id: str) -> Listener:
        """A listener for the job's announcements. Made before the job's state is read, so
        that none falls between the read and the wait."""
        ...

    def progressed(self, job_id: str) -> float | None:
        """When a batch of the job was last recorded `done`."""
        ...

    def hold(self, job_id: str, batches: list[int], until: float) -> None:
        """A running task's lease on its batches, to renew before `until` (a Unix time)."""
        ...

    def drop(self, job_id: str, batches: list[int]) -> None:
        """The task is over: its batches are no longer held."""
        ...

    def holds(self, job_id: str) -> dict[int, float]:
        """Held batches and when their leases end; an ended lease is a dead holder's."""
        ...

    def orphans(self, job_id: str, batches: list[int], at: float) -> dict[int, float]:
        """The reconciler's finding: these batches have no task now. Keeps when each was
        first found (`at` for the new ones), forgets the others, returns the lot."""
        ...

    def resent(self, job_id: str, batches: list[int], at: float) -> None:
        """These batches were sent again at `at`; they are no longer orphans."""
        ...

    def stall(self, job_id: str) -> Stall:
        """The reconciler's last findings for status."""
        ...

    def last_check_in(self, queue: str) -> tuple[float | None, float]:
        """When a worker on `queue` last checked in, if ever, and how many seconds later
        it counts as gone."""
        ...


class MemoryCounters:
    """For the embedded default: one process, no Redis."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._attempts: dict[tuple[str, int], int] = {}
        self._done: dict[str, set[int]] = {}
        self._claimed: set[str] = set()
        self._started: dict[str, float] = {}
        self._announced = threading.Condition()
        self._announcements: dict[str, int] = {}
        self._progress: dict[str, float] = {}
        self._holds: dict[str, dict[int, float]] = {}
        self._stalls: dict[str, Stall] = {}

    def attempt(self, job_id: str, batch: int) -> int:
        with self._lock:
            self._started.setdefault(job_id, time.time())
            count = self._attempts.get((job_id, batch), 0) + 1
            self._attempts[(job_id, batch)] = count
            return count

    def done(self, job_id: str, batch: int) -> int:
        with self._lock:
            self._progress[job_id] = time.time()
            batches = self._done.setdefault(job_id, set())
            batches.add(batch)
            return len(batches)

    def progressed(self, job_id: str) -> float | None:
        return self._progress.get(job_id)

    def hold(self, job_id: str, batches: list[int], until: float) -> None:
        with self._lock:
            self._holds.setdefault(job_id, {}).update(dict.fromkeys(batches, until))

    def drop(self, job_id: str, batches: list[int]) -> None:
        with self._lock:
            for batch in batches:
                self._holds.get(job_id, {}).pop(batch, None)

    def holds(self, job_id: str) -> dict[int, float]:
        with self._lock:
            return dict(self._holds.get(job_id, {}))

    def orphans(self, job_id: str, batches: list[int], at: float) -> dict[int, float]:
        with self._lock:
            before = self._stalls.get(job_id, Stall())
            found = {b: before.orphans.get(b, at) for b in batches}
            self._stalls[job_id] = Stall(found, before.resent, before.resent_at)
            return found

    def resent(self, job_id: str, batches: list[int], at: float) -> None:
        with self._lock:
            before = self._stalls.get(job_id, Stall())
            left = {b: t for b, t in before.orphans.items() if b not in set(batches)}
            self._stalls[job_id] = Stall(left, list(batches), at)

    def stall(self, job_id: str) -> Stall:
        return self._stalls.get(job_id, Stall())

    def last_check_in(self, queue: str) -> tuple[float | None, float]:  # noqa: ARG002 (the signature the caller requires)
        return time.time(), float("inf")  # the embedded worker lives in this process

    def done_count(self, job_id: str) -> int:
        return len(self._done.get(job_id, ()))

    def claim_finalize(self, job_id: str) -> bool:
        with self._lock:
            if job_id in self._claimed:
                return False
            self._claimed.add(job_id)
            return True

    def started(self, job_id: str) -> float | None:
        return self._started.get(job_id)

    def reset(self, job_id: str, batches: list[int], done: list[int]) -> None:
        with self._lock:
            for batch in batches:
                self._attempts.pop((job_id, batch), None)
            self._claimed.discard(job_id)
            self._done.setdefault(job_id, set()).update(done)

    def announce(self, job_id: str) -> None:
        with self._announced:
            self._announcements[job_id] = self._announcements.get(job_id, 0) + 1
            self._announced.notify_all()

    def listen(self, job_id: str) -> Listener:
        return _MemoryListener(self._announced, self._announcements, job_id)


class _MemoryListener:
    def __init__(self, condition: threading.Condition, counts: dict[str, int], job_id: str):
        self._condition, self._counts, self._job_id = condition, counts, job_id
        with condition:
            self._seen = counts.get(job_id, 0)

    def wait(self, timeout: float) -> bool:
        with self._condition:
            came = self._condition.wait_for(
                lambda: self._counts.get(self._job_id, 0) != self._seen, timeout
            )
            self._seen = self._counts.get(self._job_id, 0)
            return came

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        pass


class Roster:
    """Who consumes each queue, so that a submitter sizes its tasks to the workers there
    are (`workers.lifecycle.submit.task_groups`) and status can say that none is there. A
    sorted set per queue, `actmap:roster:{queue}`: members scored by their last
    check-in, every `period` seconds; a member counts for three periods."""

    def __init__(self, url: str, period: float = CHECK_IN_S) -> None:
        import redis  # the worker and submitting side; the API passes its own URL

        self._redis = redis.Redis.from_url(url, socket_timeout=5)
        self.period = period
        self.fresh = period * FRESH_S / CHECK_IN_S

    @staticmethod
    def _key(queue: str) -> str:
        return f"actmap:roster:{queue}"

    def check_in(self, name: str, queues: Iterable[str], at: float | None = None) -> None:
        """Also records the period, so that readers with other settings judge freshness
        by the workers' own."""
        now = time.time() if at is None else at
        pipe = self._redis.pipeline(transaction=False)
        for queue in queues:
            pipe.zadd(self._key(queue), {name: now})
            pipe.expire(self._key(queue), _ROSTER_TTL)
            pipe.set(f"{self._key(queue)}:period", self.period, ex=_ROSTER_TTL)
        pipe.execute()

    def check_out(self, name: str, queues: Iterable[str]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for queue in queues:
            pipe.zrem(self._key(queue), name)
        pipe.execute()

    def size(self, queue: str) -> int:
        """The workers on `queue` that checked in within the last three periods."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.zremrangebyscore(self._key(queue), "-inf", time.time() - self.fresh)
        pipe.zcard(self._key(queue))
        return int(pipe.execute()[-1])

    def last_seen(self, queue: str) -> tuple[float | None, float]:
        """When a worker on `queue` last checked in (within the key's day), if ever, and
        how long after a check-in a worker counts as gone, by the workers' period."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.zrange(self._key(queue), -1, -1, withscores=True)
        pipe.get(f"{self._key(queue)}:period")
        found, period = pipe.execute()
        fresh = self.fresh if period is None else float(period) * FRESH_S / CHECK_IN_S
        return (float(found[0][1]) if found else None), fresh


class RedisCounters:
    """Keys `actmap:{job}:*`, expiring after a week. Each call is one round trip.
    `period` is the roster's check-in period, for `last_check_in`."""

    def __init__(self, url: str, period: float = CHECK_IN_S) -> None:
        import redis  # the worker side only; the API has its own client

        self._redis = redis.Redis.from_url(url)
        self._lost = (redis.ConnectionError, redis.TimeoutError)
        self._roster = Roster(url, period)

    def _key(self, job_id: str, name: str) -> str:
        return f"actmap:{job_id}:{name}"

    def attempt(self, job_id: str, batch: int) -> int:
        key = self._key(job_id, "attempts")
        # One round trip; each command is atomic alone, so no MULTI/EXEC is needed.
        pipe = self._redis.pipeline(transaction=False)
        pipe.hincrby(key, str(batch), 1)
        pipe.expire(key, _TTL)
        pipe.set(self._key(job_id, "started"), time.time(), nx=True, ex=_TTL)
        count, *_ = pipe.execute()
        return int(count)

    def done(self, job_id: str, batch: int) -> int:
        key = self._key(job_id, "done")
        pipe = self._redis.pipeline(transaction=False)
        pipe.sadd(key, batch)
        pipe.expire(key, _TTL)
        pipe.set(self._key(job_id, "progress"), time.time(), ex=_TTL)
        pipe.scard(key)
        *_, count = pipe.execute()
        return int(count)

    def progressed(self, job_id: str) -> float | None:
        value = self._redis.get(self._key(job_id, "progress"))
        return float(value) if value is not None else None

    def hold(self, job_id: str, batches: list[int], until: float) -> None:
        if batches:
            key = self._key(job_id, "held")
            pipe = self._redis.pipeline(transaction=False)
            pipe.hset(key, mapping=dict.fromkeys(map(str, batches), until))
            pipe.expire(key, _TTL)
            pipe.execute()

    def drop(self, job_id: str, batches: list[int]) -> None:
        if batches:
            self._redis.hdel(self._key(job_id, "held"), *map(str, batches))

    def holds(self, job_id: str) -> dict[int, float]:
        found = self._redis.hgetall(self._key(job_id, "held"))
        return {int(k): float(v) for k, v in found.items()}

    def orphans(self, job_id: str, batches: list[int], at: float) -> dict[int, float]:
        key = self._key(job_id, "orphans")
        before = {int(k): float(v) for k, v in self._redis.hgetall(key).items()}
        found = {b: before.get(b, at) for b in batches}
        pipe = self._redis.pipeline()
        pipe.delete(key)
        if found:
            pipe.hset(key, mapping={str(b): t for b, t in found.items()})
            pipe.expire(key, _TTL)
        pipe.execute()
        return found

    def resent(self, job_id: str, batches: list[int], at: float) -> None:
        pipe = self._redis.pipeline()
        if batches:
            pipe.hdel(self._key(job_id, "orphans"), *map(str, batches))
        record = json.dumps({"batches": batches, "at": at})
        pipe.set(self._key(job_id, "resent"), record, ex=_TTL)
        pipe.execute()

    def stall(self, job_id: str) -> Stall:
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(self._key(job_id, "orphans"))
        pipe.get(self._key(job_id, "resent"))
        orphans, resent = pipe.execute()
        last = json.loads(resent) if resent else {"batches": [], "at": None}
        found = {int(k): float(v) for k, v in orphans.items()}
        return Stall(found, [int(b) for b in last["batches"]], last["at"])

    def last_check_in(self, queue: str) -> tuple[float | None, float]:
        return self._roster.last_seen(queue)

    def done_count(self, job_id: str) -> int:
        return int(self._redis.scard(self._key(job_id, "done")))

    def claim_finalize(self, job_id: str) -> bool:
        return bool(self._redis.set(self._key(job_id, "finalizer"), 1, nx=True, ex=_TTL))

    def started(self, job_id: str) -> float | None:
        value = self._redis.get(self._key(job_id, "started"))
        return float(value) if value is not None else None

    def reset(self, job_id: str, batches: list[int], done: list[int]) -> None:
        pipe = self._redis.pipeline()
        if batches:
            pipe.hdel(self._key(job_id, "attempts"), *map(str, batches))
        if done:
            pipe.sadd(self._key(job_id, "done"), *done)
            pipe.expire(self._key(job_id, "done"), _TTL)
        pipe.delete(self._key(job_id, "finalizer"))
        pipe.execute()

    def announce(self, job_id: str) -> None:
        # Fire and forget: a listener that misses it still reads the store within a second.
        self._redis.publish(self._key(job_id, "announce"), 1)

    def listen(self, job_id: str) -> Listener:
        return _RedisListener(self._redis, self._key(job_id, "announce"), self._lost)


class _RedisListener:
    """One pub/sub subscription, made on entry. Redis going away is not the waiter's
    failure: the wait sleeps out its timeout and subscribes again on the next call."""

    def __init__(self, client: Any, channel: str, lost: tuple[type[Exception], ...]) -> None:
        self._client, self._channel, self._lost = client, channel, lost
        self._pubsub: Any = None

    def _subscribe(self) -> Any:
        if self._pubsub is None:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(self._channel)
            self._pubsub = pubsub
        return self._pubsub

    def wait(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        try:
            pubsub = self._subscribe()
            # The subscribe confirmation comes back as None before the timeout: loop.
            while (left := end - time.monotonic()) > 0:
                if pubsub.get_message(timeout=left) is not None:
                    return True
            return False
        except self._lost:
            self._close()
            time.sleep(max(0.0, end - time.monotonic()))
            return False

    def __enter__(self) -> Self:
        with suppress(*self._lost):  # the first wait tries again
            self._subscribe()
        return self

    def __exit__(self, *_: object) -> None:
        self._close()

    def _close(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            pubsub.close()
