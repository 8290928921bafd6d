"""What the API needs of the broker: send tasks by name, keep idempotency keys, report
queue depth, answer readiness. Redis on a cluster; an in-memory stand-in for the API's
unit tests (the integration tier runs the real one)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, Protocol

from workers.counters import Counters, RedisCounters
from workers.jobs import QUEUES
from workers.roster import Roster

__all__ = ["Broker", "MemoryBroker", "RedisBroker"]

_IDEMPOTENCY_TTL = 24 * 3600


class Broker(Protocol):
    def send(self, task: str, args: list[Any], queue: str) -> None: ...
    def claim(self, key: str, value: str) -> str | None:
        """Store value under key unless present; return the value already there, if any."""
        ...

    def release(self, key: str) -> None: ...
    def guard(self, name: str, timeout: float) -> Any:
        """A context holding the lease `name` for at most `timeout` s, waiting as long
        for it (`workers.submit.Keys`)."""
        ...

    def depth(self) -> dict[str, int]: ...
    def ping(self) -> bool: ...
    def counters(self) -> Counters | None:
        """The workers' batch counters, which resume squares with the ledger."""
        ...

    def workers(self, queue: str) -> int:
        """How many workers consume `queue` now (0: unknown); tasks are sized to them."""
        ...


class RedisBroker:
    """Tasks go through Celery (by name, no task code here); keys live in the same Redis."""

    def __init__(self, url: str, app: Any) -> None:
        import redis

        self._redis = redis.Redis.from_url(url, socket_timeout=5)
        self._app = app
        self._counters = RedisCounters(url)
        self._roster = Roster(url)

    def send(self, task: str, args: list[Any], queue: str) -> None:
        self._app.send_task(task, args=args, queue=queue)

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

        from workers.submit import Busy

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
        return self._roster.size(queue)


class MemoryBroker:
    """Records what was sent and hands each task to `run`, if given (the API's unit tests
    run the worker function in line)."""

    def __init__(
        self, run: Callable[[str, list[Any]], None] | None = None, counters: Counters | None = None
    ) -> None:
        self.sent: list[tuple[str, list[Any], str]] = []
        self._counters = counters
        self._keys: dict[str, str] = {}
        self._guards: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._run = run

    def send(self, task: str, args: list[Any], queue: str) -> None:
        self.sent.append((task, args, queue))
        if self._run is not None:
            self._run(task, args)

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
            from workers.submit import Busy

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

    def workers(self, queue: str) -> int:
        return 1  # the unit tests' inline runner
