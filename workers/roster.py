"""Who consumes each queue, kept in Redis by the worker children, so that a submitter can
size its tasks to the workers there are (`control.task_groups`). A child checks in every
minute and counts for three; one that died drops out on its own, one that stops cleanly
checks out."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterable

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
    check-in."""

    def __init__(self, url: str) -> None:
        import redis  # the worker and submitting side; the API passes its own URL

        self._redis = redis.Redis.from_url(url, socket_timeout=5)

    @staticmethod
    def _key(queue: str) -> str:
        return f"actmap:roster:{queue}"

    def check_in(self, name: str, queues: Iterable[str], at: float | None = None) -> None:
        now = time.time() if at is None else at
        pipe = self._redis.pipeline(transaction=False)
        for queue in queues:
            pipe.zadd(self._key(queue), {name: now})
            pipe.expire(self._key(queue), _TTL)
        pipe.execute()

    def check_out(self, name: str, queues: Iterable[str]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for queue in queues:
            pipe.zrem(self._key(queue), name)
        pipe.execute()

    def size(self, queue: str) -> int:
        """The workers on `queue` that checked in within FRESH_S seconds."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.zremrangebyscore(self._key(queue), "-inf", time.time() - FRESH_S)
        pipe.zcard(self._key(queue))
        return int(pipe.execute()[-1])


def keep_checking_in(roster: Roster, name: str, queues: list[str]) -> threading.Thread:
    """A daemon thread that checks `name` in every CHECK_IN_S seconds. A Redis that is away
    is logged, never raised: the worker's tasks fail over to Celery's own reconnects."""
    import redis

    def loop() -> None:
        while True:
            try:
                roster.check_in(name, queues)
            except (redis.RedisError, OSError) as exc:
                log.warning("roster check-in failed (%s); retrying in %.0f s", exc, CHECK_IN_S)
            time.sleep(CHECK_IN_S)

    thread = threading.Thread(target=loop, name="actmap-roster", daemon=True)
    thread.start()
    return thread
