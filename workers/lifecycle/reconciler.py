"""The reconciler: the ledger is the truth, and the broker may lose messages (a Redis
restart takes the task in flight with it; a dead host's task waits out the visibility
timeout). A batch of an unfinished job that is not done, not in a queue, and not held by a
live task (a lease its worker renews every roster period) is an orphan; one that stays an
orphan for `bound` seconds is sent again. Sending twice is harmless: the ledger skips done
batches and a batch's chunks are written whole, so a duplicate writes the same bytes.

Where it runs: in the check-in thread of every worker child (`worker_main`), once a roster
period, under a cluster-wide Redis lease so that one pass runs per period however many
workers there are (no flood of duplicate sends). The workers are what must be alive for a
job to progress at all, and they already read the store and talk to Redis; the API need
not run (scripts submit straight to the broker), and the launcher must not open the store.
With no worker alive a pass would have nobody to run what it sends; status says so.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.errors import NotFound
from workers.jobs import QUEUES, JobState, TaskName
from workers.lifecycle.counters import Counters
from workers.lifecycle.state import finalize, ranges
from workers.storage.index import unfinished
from workers.storage.layout import attrs, open_job
from workers.storage.ledger import done_batches

__all__ = ["LEASE", "Reconciler", "Resend"]

LEASE = "actmap:reconciler"
# kombu keeps a queue's prioritised messages in lists named with this separator.
_PRIORITY_LISTS = ("", "\x06\x163", "\x06\x166", "\x06\x169")

log = logging.getLogger("actmap")

Send = Callable[[str, list[int], str], None]  # job id, batches, queue


@dataclass(frozen=True)
class Resend:
    job_id: str
    batches: list[int]


def _batches_of(message: bytes | str) -> tuple[str, list[int]] | None:
    """The job and batches of a queued `run_batch` message (kombu's JSON envelope)."""
    try:
        envelope = json.loads(message)
        if envelope.get("headers", {}).get("task") != TaskName.RUN_BATCH:
            return None
        args = json.loads(base64.b64decode(envelope["body"]))[0]
        return str(args[1]), [int(b) for b in args[2]]
    except (ValueError, KeyError, IndexError, TypeError):
        return None  # not ours, or a format we do not read: it only costs a resend


class Reconciler:
    """One pass with `run_once`; `lease_s` is how long a task's hold lasts unrenewed, and
    a delivered message counts as live for as long (a worker took it and is starting)."""

    def __init__(
        self, store: str, url: str, counters: Counters, send: Send,
        period: float, bound: float, lease_s: float,
    ) -> None:  # fmt: skip
        import redis

        self.store = store
        self._redis = redis.Redis.from_url(url, socket_timeout=5)
        self.counters = counters
        self.send = send
        self.period = period
        self.bound = bound
        self.lease_s = lease_s

    def _live_messages(self, now: float) -> dict[str, set[int]]:
        """Batches in a queue, or delivered within the lease (a worker is starting them)."""
        found: dict[str, set[int]] = {}
        pipe = self._redis.pipeline(transaction=False)
        for queue in QUEUES:
            for suffix in _PRIORITY_LISTS:
                pipe.lrange(f"{queue}{suffix}", 0, -1)
        messages: list[Any] = [m for listed in pipe.execute() for m in listed]
        recent: list[bytes] = list(
            self._redis.zrangebyscore("unacked_index", now - self.lease_s, "+inf")  # type: ignore[arg-type]
        )
        if recent:
            for entry in self._redis.hmget("unacked", recent):
                if entry is not None:
                    messages.append(json.dumps(json.loads(entry)[0]))
        for message in messages:
            parsed = _batches_of(message)
            if parsed is not None:
                found.setdefault(parsed[0], set()).update(parsed[1])
        return found

    def run_once(self, now: float | None = None) -> list[Resend]:
        """A pass, if no other worker ran one within the period."""
        now = time.time() if now is None else now
        if not self._redis.set(LEASE, 1, nx=True, px=max(1, int(self.period * 900))):
            return []
        live = self._live_messages(now)
        sent: list[Resend] = []
        # Only jobs planned whole are indexed; a plan cut short is its retry's to finish.
        for job_id in unfinished(self.store):
            found = self._job(job_id, live.get(job_id, set()), now)
            if found is not None:
                sent.append(found)
        return sent

    def _job(self, job_id: str, queued: set[int], now: float) -> Resend | None:
        try:
            group = open_job(self.store, job_id, mode="r")
        except NotFound:
            return None
        found = attrs(group)
        state = JobState(found["state"])
        if state.finished or found.get("interrupted") or found.get("kind") != "extraction":
            return None
        done = done_batches(group)
        held = {b for b, until in self.counters.holds(job_id).items() if until > now}
        missing = [int(b) for b in np.flatnonzero(~done)]
        if missing:
            orphans = [b for b in missing if b not in held and b not in queued]
        else:  # every batch is written but nobody finalized: its finalizer died
            orphans = [0] if done.size and not held and not queued else []
        seen = self.counters.orphans(job_id, orphans, now)
        due = sorted(b for b, first in seen.items() if now - first >= self.bound)
        if not due:
            return None
        if not missing:
            log.warning("job %s: complete but never finalized; finalizing", job_id)
            finalize(self.store, job_id)
            self.counters.announce(job_id)
            self.counters.orphans(job_id, [], now)
            return None
        queue = str(found["spec"].get("queue", "extract"))
        log.warning(
            "job %s: batches %s have had no task for %.0f s; sending them again",
            job_id, ranges(due), self.bound,
        )  # fmt: skip
        self.send(job_id, due, queue)
        self.counters.resent(job_id, due, now)
        return Resend(job_id, due)
