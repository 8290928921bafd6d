"""What the API needs of the broker: send tasks by name, keep idempotency keys, report
queue depth, answer readiness. Redis on a cluster; an in-memory stand-in for the API's
unit tests (the integration tier runs the real one)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from typing import Any, Protocol

from workers.jobs import QUEUES
from workers.lifecycle.counters import Counters, RedisCounters

__all__ = ["Broker", "Busy", "MemoryBroker", "RedisBroker"]

_IDEMPOTENCY_TTL = 24 * 3600
# A tally left alone this long is dropped and counted again from its source, so that what
# an operator deletes by hand stops counting within the hour.
_TALLY_TTL = 3600
# Add ARGV[1] to the tally unless that passes the limit ARGV[2]; -1 when there is no tally.
_ADD_UNDER = """
local held = redis.call('GET', KEYS[1])
if not held then return -1 end
local amount = tonumber(ARGV[1])
local total = math.max(0, tonumber(held) + amount)
if amount > 0 and total > tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], total, 'EX', ARGV[3])
return 1
"""
log = logging.getLogger("actmap.api")


class Busy(Exception):
    """Raised when a tenant's lock stays held past the wait: too many requests at once."""


class Broker(Protocol):
    def send(self, task: str, args: list[Any], queue: str) -> None: ...
    def call(self, task: str, args: list[Any], queue: str, timeout: float) -> Any:
        """Send a task and wait up to `timeout` s for its result (the fast path of one
        screening). Raises Unavailable when no worker answers in time."""
        ...

    def claim(self, key: str, value: str) -> str | None:
        """Store value under key unless present; return the value already there, if any."""
        ...

    def release(self, key: str) -> None: ...
    def guard(self, name: str, timeout: float) -> Any:
        """A context holding the lease `name` for at most `timeout` s, waiting as long
        for it (`workers.lifecycle.submit.Keys`)."""
        ...

    def depth(self) -> dict[str, int]: ...
    def ping(self) -> bool: ...
    def counters(self) -> Counters | None:
        """The workers' batch counters, which resume squares with the ledger."""
        ...

    def workers(self, queue: str) -> int:
        """How many workers consume `queue` now (0: unknown); tasks are sized to them."""
        ...

    def lock(self, name: str, ttl_s: float) -> AbstractContextManager[None]:
        """Held by one holder at a time across API processes; it expires after `ttl_s`
        if its holder dies. Raises Busy when it stays taken for `ttl_s`."""
        ...

    def add(self, key: str, amount: int, limit: int, initial: Callable[[], int]) -> bool:
        """Add `amount` to the tally at `key` (counted by `initial()` when there is none)
        unless that takes it past `limit`; False when refused. A negative amount gives back."""
        ...


class Roster(Protocol):
    def size(self, queue: str) -> int:
        """How many workers consume `queue` now (0: unknown)."""
        ...


class RedisBroker:
    """Tasks go through Celery (by name, no task code here); keys live in the same Redis.
    The Celery app and the roster of workers are the caller's (the command line's), so that
    the API itself loads no part of the workers' execution."""

    def __init__(self, url: str, app: Any, roster: Roster | None = None) -> None:
        import redis

        self._redis = redis.Redis.from_url(url, socket_timeout=5)
        self._app = app
        self._counters = RedisCounters(url)
        self._roster = roster
        self._add_under = self._redis.register_script(_ADD_UNDER)

    def send(self, task: str, args: list[Any], queue: str) -> None:
        self._app.send_task(task, args=args, queue=queue)

    def call(self, task: str, args: list[Any], queue: str, timeout: float) -> Any:
        from celery.exceptions import TimeoutError as NoAnswer

        from workers.lifecycle.submit import Unavailable

        # Expires with the wait: a worker that takes it up later drops it unrun.
        result = self._app.send_task(task, args=args, queue=queue, expires=timeout)
        try:
            return result.get(timeout=timeout)
        except NoAnswer:
            raise Unavailable(
                f"no worker of the {queue!r} queue answered within {timeout:g} s; retry, or "
                f"ask the operator to start one (actmap worker --queues {queue})"
            ) from None
        finally:
            result.forget()  # the answer is read once: keep no copy in Redis

    def claim(self, key: str, value: str) -> str | None:
        if self._redis.set(key, value, nx=True, ex=_IDEMPOTENCY_TTL):
            return None
        found = self._redis.get(key)
        return found.decode() if isinstance(found, bytes) else None

    def release(self, key: str) -> None:
        self._redis.delete(key)

    @contextmanager
    def guard(self, name: str, timeout: float) -> Iterator[None]:
        from redis.exceptions import LockError

        from workers.lifecycle.submit import Busy

        lock = self._redis.lock(name, timeout=timeout, blocking_timeout=timeout)
        if not lock.acquire():
            raise Busy("another request with this idempotency key is still submitting; retry")
        try:
            yield
        finally:
            with suppress(LockError):  # held past its timeout: another took it over
                lock.release()

    def depth(self) -> dict[str, int]:
        pipe = self._redis.pipeline()
        for name in QUEUES:
            pipe.llen(name)
        return dict(zip(QUEUES, map(int, pipe.execute()), strict=True))

    def ping(self) -> bool:
        try:
            return bool(self._redis.ping())
        except Exception:  # any failure means not ready; the probe reports, never raises
            return False

    def counters(self) -> Counters:
        return self._counters

    def workers(self, queue: str) -> int:
        return self._roster.size(queue) if self._roster is not None else 0

    def close(self) -> None:
        """Close this broker's own Redis connections (the quota keys and locks)."""
        self._redis.close()

    @contextmanager
    def lock(self, name: str, ttl_s: float) -> Iterator[None]:
        from redis.exceptions import LockError

        held = self._redis.lock(name, timeout=ttl_s, blocking_timeout=ttl_s)
        if not held.acquire():
            raise Busy(name)
        try:
            yield
        finally:
            try:
                held.release()
            except LockError:  # it expired while held: say so, the work is done
                log.warning("lock %s expired while held (raise ACTMAP_QUOTA_LOCK_S)", name)

    def add(self, key: str, amount: int, limit: int, initial: Callable[[], int]) -> bool:
        for _ in range(2):
            done = int(self._add_under(keys=[key], args=[amount, limit, _TALLY_TTL]))
            if done >= 0:
                return done == 1
            self._redis.set(key, initial(), nx=True, ex=_TALLY_TTL)
        return False


class MemoryBroker:
    """Records what was sent and hands each task to `run`, if given (the API's unit tests
    run the worker function in line)."""

    def __init__(
        self, run: Callable[[str, list[Any]], Any] | None = None, counters: Counters | None = None
    ) -> None:
        self.sent: list[tuple[str, list[Any], str]] = []
        self._counters = counters
        self._keys: dict[str, str] = {}
        self._guards: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._tallies: dict[str, int] = {}
        self._run = run

    def send(self, task: str, args: list[Any], queue: str) -> None:
        self.sent.append((task, args, queue))
        if self._run is not None:
            self._run(task, args)

    def call(self, task: str, args: list[Any], queue: str, timeout: float) -> Any:  # noqa: ARG002
        self.sent.append((task, args, queue))
        if self._run is None:
            from workers.lifecycle.submit import Unavailable

            raise Unavailable(f"no worker of the {queue!r} queue")
        return self._run(task, args)

    def claim(self, key: str, value: str) -> str | None:
        with self._lock:
            if key in self._keys:
                return self._keys[key]
            self._keys[key] = value
            return None

    def release(self, key: str) -> None:
        with self._lock:
            self._keys.pop(key, None)

    @contextmanager
    def guard(self, name: str, timeout: float) -> Iterator[None]:
        with self._lock:
            lock = self._guards.setdefault(name, threading.Lock())
        if not lock.acquire(timeout=timeout):
            from workers.lifecycle.submit import Busy

            raise Busy("another request with this idempotency key is still submitting; retry")
        try:
            yield
        finally:
            lock.release()

    def depth(self) -> dict[str, int]:
        return dict.fromkeys(QUEUES, 0)

    def ping(self) -> bool:
        return True

    def counters(self) -> Counters | None:
        return self._counters

    def workers(self, queue: str) -> int:  # noqa: ARG002 (the signature the caller requires)
        return 1  # the unit tests' inline runner

    @contextmanager
    def lock(self, name: str, ttl_s: float) -> Iterator[None]:
        with self._lock:
            held = self._locks.setdefault(name, threading.Lock())
        if not held.acquire(timeout=ttl_s):
            raise Busy(name)
        try:
            yield
        finally:
            held.release()

    def add(self, key: str, amount: int, limit: int, initial: Callable[[], int]) -> bool:
        with self._lock:
            total = self._tallies[key] if key in self._tallies else initial()
            if amount > 0 and total + amount > limit:
                self._tallies[key] = total
                return False
            self._tallies[key] = max(0, total + amount)
            return True
