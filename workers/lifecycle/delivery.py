"""One batch under at-least-once delivery: attempts, cancel, failure, completion.

Celery may deliver a batch twice, or again after its worker was killed; every path here is
idempotent, and the ledger decides what is done. The task that completes the last batch
finalizes the job; no chord is involved.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self

import zarr

from workers.errors import SampleCode, UserError
from workers.jobs import ExtractionSpec, JobState
from workers.lifecycle.counters import Counters
from workers.lifecycle.state import finalize
from workers.storage.layout import (
    ERROR_CODE,
    ERROR_MESSAGE,
    array,
    attrs,
    fresh_attrs,
    open_job,
    read,
)
from workers.storage.ledger import done_batches, is_done, mark_done

if TYPE_CHECKING:  # torch lives behind the extractor; delivery only names its types
    from workers.pipeline import Decoded
    from workers.storage.rows import BatchRows

__all__ = ["Extractor", "Outcome", "Runtime", "execute_batch", "execute_batches", "give_up"]

log = logging.getLogger("actmap")


class Outcome(StrEnum):
    RAN = "ran"
    SKIPPED = "skipped"  # the ledger had it
    CANCELLED = "cancelled"
    FAILED = "failed"  # marked failed: a user error, or past the attempt cap
    DEFERRED = "deferred"  # not started: the task's time was up; it sends these on
    STOPPED = "stopped"  # not started: this process is stopping; a resume runs them


OPEN_JOBS = 4  # jobs whose arrays a worker process keeps open between tasks
DECODE_AHEAD = 2  # batches a task decodes ahead of the one it computes


Opened = dict[str, Any]  # a job's arrays by name, opened once


@dataclass(frozen=True)
class OpenJob:
    """A job's group and arrays, opened for writing once per process, not once per task:
    their metadata is fixed at plan time, and opening each is a round trip to the store."""

    group: zarr.Group
    arrays: Opened
    n_batches: int


class Extractor(Protocol):
    """The stages of a batch, injected so that delivery needs no torch: a worker passes
    `workers.pipeline.Extraction`, a test its own."""

    def decode(self, group: zarr.Group, spec: ExtractionSpec, batch: int) -> Decoded:
        """The batch's inputs; a bad sample gets its code, the rest go on."""
        ...

    def compute(self, spec: ExtractionSpec, decoded: Decoded) -> BatchRows:
        """The forward pass; a `UserError` fails the batch, anything else is retried."""
        ...

    def store(self, group: zarr.Group, batch: int, rows: BatchRows, opened: Opened) -> None:
        """Write the rows, then mark the batch done in the ledger; `opened` keeps the job's
        arrays between batches."""
        ...

    def write_behind(self, write: Callable[[int, BatchRows], None], depth: int) -> WriteBehind: ...


class WriteBehind(Protocol):
    """Writes handed to a background thread (`workers.pipeline.WriteBehind`); leaving the
    block waits for them all and raises the first error."""

    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None: ...
    def put(self, batch: int, rows: BatchRows) -> None: ...
    def flush(self) -> None: ...


@dataclass
class Runtime:
    """What a worker process keeps between tasks; built lazily in the child."""

    extractor: Extractor
    counters: Counters
    attempt_cap: int = 3
    # Seconds after which a task starts no batch it does not expect to finish in time; the
    # rest go to a new task, so a big task never meets its time limit.
    budget_s: float | None = None
    # How long a task's hold on its batches lasts unless renewed (`renew`, each roster
    # period): a hold that ends tells the reconciler its worker is gone.
    lease_s: float = 120.0
    jobs: OrderedDict[tuple[str, str], OpenJob] = field(default_factory=OrderedDict)
    # Set to stop at the next batch boundary (Ctrl-C of the embedded default): the rest of
    # the task's batches are left, unrun, for a resume.
    stopping: threading.Event = field(default_factory=threading.Event)
    holding: dict[str, list[int]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def hold(self, job_id: str, batches: list[int]) -> None:
        """The running task's batches: leased, renewed until `let_go`."""
        with self._lock:
            self.holding[job_id] = list(batches)
        try:
            self.counters.hold(job_id, batches, time.time() + self.lease_s)
        except Exception:  # Redis away: the renewal retries; a resend meanwhile is harmless
            log.warning("job %s: could not hold batches %s", job_id, batches)

    def let_go(self, job_id: str, batches: list[int]) -> None:
        with self._lock:
            self.holding.pop(job_id, None)
        try:
            self.counters.drop(job_id, batches)
        except Exception:  # Redis away: the lease ends by itself
            log.warning("job %s: could not drop the hold on batches %s", job_id, batches)

    def renew(self) -> None:
        with self._lock:
            held = dict(self.holding)
        for job_id, batches in held.items():
            self.counters.hold(job_id, batches, time.time() + self.lease_s)

    def open(self, store: str, job_id: str) -> OpenJob:
        """The job, opened for writes, kept for the last few jobs this process ran."""
        key = (store, job_id)
        with self._lock:
            job = self.jobs.pop(key, None)
        if job is None:
            group = open_job(store, job_id)
            job = OpenJob(group, {}, int(attrs(group)["n_batches"]))
        with self._lock:
            self.jobs[key] = job
            while len(self.jobs) > OPEN_JOBS:
                self.jobs.popitem(last=False)
        return job


def _fail_batch(store: str, job_id: str, batch: int, reason: str) -> None:
    """Record every not-yet-failed sample of the batch as failed, then mark it done so the
    rest of the job can finish."""
    group = open_job(store, job_id)
    size, n = attrs(group)["batch_size"], attrs(group)["n_samples"]
    rows = slice(batch * size, min((batch + 1) * size, n))
    codes = read(group, ERROR_CODE, rows)
    messages = read(group, ERROR_MESSAGE, rows).astype(object)
    fresh = codes == 0
    codes[fresh] = SampleCode.BATCH_FAILED
    messages[fresh] = reason
    array(group, ERROR_CODE)[rows] = codes
    array(group, ERROR_MESSAGE)[rows] = messages
    mark_done(group, batch)


def give_up(store: str, job_id: str, batch: int, reason: str, runtime: Runtime) -> Outcome:
    """Mark the batch failed with `reason` and let the job go on without it. A batch the
    ledger already has keeps its samples: a task that fails part-way gives up all of its
    batches, the ones it wrote before the failure among them."""
    if is_done(open_job(store, job_id, mode="r"), batch):
        complete(store, job_id, batch, runtime, seen_before=True)
        return Outcome.SKIPPED
    log.error("job %s batch %d: %s", job_id, batch, reason)
    _fail_batch(store, job_id, batch, reason)
    complete(store, job_id, batch, runtime)
    return Outcome.FAILED


def complete(
    store: str,
    job_id: str,
    batch: int,
    runtime: Runtime,
    *,
    seen_before: bool = False,
    n_batches: int | None = None,
) -> None:
    """After batch `batch` is in the ledger: finalize if it was the last one. The count
    decides cheaply, except for a batch `seen_before` in the ledger (a redelivery, a resumed
    duplicate): that is when a worker may have died or lost Redis between its write and
    its count, leaving the count short, so the ledger decides. `n_batches`, when the caller
    knows it, saves opening the job."""
    if n_batches is None:
        n_batches = int(attrs(open_job(store, job_id, mode="r"))["n_batches"])
    if runtime.counters.done(job_id, batch) < n_batches and not seen_before:
        return
    # The counters say all are done; the ledger must agree before anyone finalizes.
    group = open_job(store, job_id, mode="r")
    if done_batches(group).all() and runtime.counters.claim_finalize(job_id):
        finalize(store, job_id)
        runtime.counters.announce(job_id)


def _start(store: str, job_id: str, batch: int, runtime: Runtime) -> tuple[Outcome | None, int]:
    """The checks before a batch runs: an outcome when it must not run, and which attempt
    at the batch this is."""
    job = runtime.open(store, job_id)
    if fresh_attrs(job.group)["state"] == JobState.CANCELLED:  # seen between batches
        return Outcome.CANCELLED, 0
    if is_done(job.group, batch, job.arrays):  # the flag is read fresh
        complete(store, job_id, batch, runtime, seen_before=True)
        return Outcome.SKIPPED, 0
    attempt = runtime.counters.attempt(job_id, batch)
    if attempt > runtime.attempt_cap:
        reason = (
            f"batch {batch} given up after {runtime.attempt_cap} attempts: its worker died "
            "or it kept failing"
        )
        return give_up(store, job_id, batch, reason, runtime), attempt
    return None, attempt


def _cut_short(group: zarr.Group, runtime: Runtime, projected: float) -> Outcome | None:
    """Why the batches left are not started now, if they are not: the worker is stopping, or
    the next batch would end past the task's budget (`projected`: elapsed plus the slowest
    batch so far; 0 before the first, which always runs)."""
    if runtime.stopping.is_set():
        return Outcome.STOPPED
    if runtime.budget_s is not None and projected and projected > runtime.budget_s:
        cancelled = fresh_attrs(group)["state"] == JobState.CANCELLED
        return Outcome.CANCELLED if cancelled else Outcome.DEFERRED
    return None


def execute_batches(store: str, job_id: str, batches: list[int], runtime: Runtime) -> list[Outcome]:
    """Run batches the way a task must: skip what the ledger has or a cancelled job, give
    up past the attempt cap, turn user errors into a failed batch, let transient errors
    propagate for a retry. The forward of one batch overlaps the decode of the next and
    the write of the previous one; each is marked done only once written, and this
    returns (so the task is acknowledged) only after every write. Batches that would
    start after `runtime.budget_s` (by the slowest batch so far) are left DEFERRED."""

    job = runtime.open(store, job_id)
    # Fixed at plan time, like the sources it decodes.
    spec = ExtractionSpec.model_validate(job.group.attrs["spec"])
    extractor = runtime.extractor

    def write(batch: int, rows: BatchRows) -> None:
        extractor.store(job.group, batch, rows, job.arrays)
        complete(store, job_id, batch, runtime, n_batches=job.n_batches)

    def decode(batch: int) -> Decoded:
        return extractor.decode(job.group, spec, batch)

    outcomes: list[Outcome] = []
    with (
        extractor.write_behind(write, 2) as writer,
        ThreadPoolExecutor(1, thread_name_prefix="actmap-ahead") as reader,
    ):
        # Batches are decoded ahead: the first while its checks run, the next DECODE_AHEAD
        # while this one computes (with one ahead the forward still waited on decode).
        # Decoding has no side effects, so a batch that then turns
        # out cancelled or done only wastes its decode; an error surfaces where it is used.
        ahead: dict[int, Future[Decoded]] = {}
        if batches:
            ahead[0] = reader.submit(decode, batches[0])
        began, slowest = time.monotonic(), 0.0
        for i, batch in enumerate(batches):
            now = time.monotonic()
            left = _cut_short(job.group, runtime, i and now - began + slowest)
            if left is not None:
                for future in ahead.values():
                    future.cancel()  # if its decode has not begun
                outcomes.extend([left] * (len(batches) - i))
                break
            stopped, attempt = _start(store, job_id, batch, runtime)
            early = ahead.pop(i, None)
            if stopped is not None:
                if early is not None:
                    early.cancel()  # a redelivery's done batches: no decode for each
                outcomes.append(stopped)
                continue
            if attempt > 1:
                # Started before: its worker may have died inside it (a poison input).
                # The batches before it land first, or they would die with it again,
                # unwritten, until the attempt cap failed them too.
                writer.flush()
            try:
                decoded = decode(batch) if early is None else early.result()
                for j in range(i + 1, min(i + 1 + DECODE_AHEAD, len(batches))):
                    if j not in ahead:
                        ahead[j] = reader.submit(decode, batches[j])
                rows = extractor.compute(spec, decoded)
            except UserError as exc:  # the same on every attempt: never retried
                outcomes.append(give_up(store, job_id, batch, str(exc), runtime))
                continue
            writer.put(batch, rows)
            outcomes.append(Outcome.RAN)
            slowest = max(slowest, time.monotonic() - now)
    return outcomes


def execute_batch(store: str, job_id: str, batch: int, runtime: Runtime) -> Outcome:
    """One batch: `execute_batches` of one."""
    return execute_batches(store, job_id, [batch], runtime)[0]
