"""Who consumes each queue, kept in Redis by the worker children, so that a submitter can
size its tasks to the workers there are (`control.task_groups`), and status can say that
no worker is there. A child checks in every period (a minute by default) and counts for
three; one that died drops out on its own, one that stops cleanly checks out. The same
thread runs the child's other periodic duties (`keep_checking_in`'s `also`)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable

__all__ = ["CHECK_IN_S", "FRESH_S", "Roster", "keep_checking_in", "member"]

CHECK_IN_S = 60.0
FRESH_S = 180.0
_TTL = 24 * 3600

log = logging.getLogger("actmap")


def member() -> str:
    """This process's name on the roster: unique per worker child on a host."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Roster:
    """A sorted set per queue, `actmap:roster:{queue}`: members scored by their last
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
            pipe.expire(self._key(queue), _TTL)
            pipe.set(f"{self._key(queue)}:period", self.period, ex=_TTL)
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


def keep_checking_in(
    roster: Roster, name: str, queues: list[str], also: Callable[[], None] | None = None
) -> threading.Thread:
    """A daemon thread that checks `name` in every period, then runs `also`. A Redis that
    is away is logged, never raised: the worker's tasks fail over to Celery's own
    reconnects."""
    import redis

    def loop() -> None:
        while True:
            try:
                roster.check_in(name, queues)
                if also is not None:
                    also()
            except (redis.RedisError, OSError) as exc:
                log.warning("roster check-in failed (%s); retrying in %.0f s", exc, roster.period)
            except Exception:  # a bug in a duty must not end the check-ins
                log.exception("a periodic duty of this worker failed")
            time.sleep(roster.period)

    thread = threading.Thread(target=loop, name="actmap-roster", daemon=True)
    thread.start()
    return thread
