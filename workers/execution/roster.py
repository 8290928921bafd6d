"""A worker child's side of the roster (`workers.lifecycle.counters.Roster`): it checks in
every period (a minute by default) and counts for three; one that died drops out on its
own, one that stops cleanly checks out. The same thread runs the child's other periodic
duties (`keep_checking_in`'s `also`)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from workers.lifecycle.counters import Roster

__all__ = ["keep_checking_in", "member"]

log = logging.getLogger("actmap")


def member() -> str:
    """This process's name on the roster: unique per worker child on a host."""
    return f"{socket.gethostname()}:{os.getpid()}"


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
