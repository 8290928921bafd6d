"""Jobs as a user drives them: list, status with progress, wait, cancel, resume, and the
state every job ends in (`finalize`: succeeded, partial or failed). Every write of a job's
state is here, but its first (`queued`, by `workers.lifecycle.plan`).

Everything here reads the store (the truth) and, when given, the counters (cheap hints
for progress). It needs no torch.
"""

from __future__ import annotations

import pkgutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, cast

import numpy as np
from redis import RedisError

from workers.errors import Conflict, NotFound, SampleCode, UserError
from workers.jobs import JobState, now, poll
from workers.lifecycle.counters import Counters
from workers.storage.consolidate import publish
from workers.storage.index import page as index_page
from workers.storage.layout import ERROR_CODE, open_job, read
from workers.storage.layout import attrs as attrs_of
from workers.storage.ledger import done_batches

__all__ = [
    "INTERRUPTED",
    "Status",
    "can_progress",
    "cancel",
    "job_page",
    "finalize",
    "list_jobs",
    "mark_interrupted",
    "mark_started",
    "prepare_resume",
    "queue_of",
    "resume_batches",
    "status",
    "summary",
    "wait",
]


FINALIZE_GRACE_S = 30.0


# The reason of a job that Ctrl-C stopped: nothing runs it until it is resumed.
INTERRUPTED = "interrupted"
# Rate and time left are shown while a batch completed within this many mean batch
# intervals (and at least PROGRESS_MIN_S): a job whose batches stopped completing has none.
PROGRESS_INTERVALS = 10
# Jobs of a listed page whose status is read at once.
PAGE_READERS = 16
PROGRESS_MIN_S = 30.0

# The lifecycle's one edge into analysis, declared here: a screening job (its spec names a
# profile) is scored as it finalizes, writing screen/score and screen/flag. Named, and
# resolved when such a job finalizes, because importing it loads scipy and scikit-learn:
# seconds that the API and the CLI would spend at every start.
SCORE_SCREENING = "workers.analysis.profiles:score_job"


class Score(Protocol):
    """score_job's signature: store, job id, profile id; `finalizing` scores a job whose
    batches are all done but whose final state is not written yet."""

    def __call__(self, store: str, job_id: str, profile_id: str, *, finalizing: bool) -> Any: ...


def _clock(at: float | str) -> str:
    """A moment as the local time of day, as an operator reads it."""
    moment = datetime.fromisoformat(at) if isinstance(at, str) else datetime.fromtimestamp(at, UTC)
    return moment.astimezone().strftime("%H:%M:%S")


def _for(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


@dataclass(frozen=True)
class Status:
    job_id: str
    state: str
    tenant: str
    n_samples: int
    n_batches: int
    batches_done: int
    samples_done: int
    n_failed: int
    samples_per_s: float | None
    eta_s: float | None
    created: str
    finished: str | None
    reason: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _seconds(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def ranges(batches: list[int]) -> str:
    """`[12, 13, 14, 20]` as `12-14, 20`."""
    runs: list[list[int]] = []
    for b in sorted(batches):
        if runs and b == runs[-1][-1] + 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def _stalled(counters: Counters, job_id: str, queue: str) -> str | None:
    """Why the job is not progressing, from the roster and the reconciler, if it is not."""
    at = time.time()
    last, fresh = counters.last_check_in(queue)
    if last is None:
        # (the roster forgets entries three periods old, so "never" cannot be told apart)
        return f"no worker has checked in on queue {queue} lately: start `actmap worker`"
    if at - last > fresh:
        return f"no worker has checked in on queue {queue} for {_for(at - last)}"
    stall = counters.stall(job_id)
    if stall.orphans:
        since = min(stall.orphans.values())
        return (
            f"batches {ranges(list(stall.orphans))} have no task since {_clock(since)}; "
            "they are sent again if none appears"
        )
    progressed = counters.progressed(job_id)
    if stall.resent and stall.resent_at and (progressed or 0) < stall.resent_at:
        return f"batches {ranges(stall.resent)} had no task, re-sent at {_clock(stall.resent_at)}"
    return None


def status(store: str, job_id: str, counters: Counters | None = None) -> Status:
    """State and progress. A job not yet finished is `running` once any batch is done or
    a worker has started it, else `queued`; either is `stalled`, with the reason, when it
    cannot progress now (interrupted, no worker, batches with no task). Rate and time left
    only while batches complete."""
    group = open_job(store, job_id, mode="r")
    attrs = attrs_of(group)
    n, size = int(attrs["n_samples"]), int(attrs["batch_size"])
    done = done_batches(group)
    samples_done = _written(n, size, done)
    state = JobState(attrs["state"])
    reason = attrs.get("reason") or None
    started = progressed = None
    stalled: str | None = None
    if not state.finished and attrs.get("interrupted"):
        stalled = (
            f"{INTERRUPTED} at {_clock(str(attrs['interrupted']))}; "
            f"`actmap jobs resume {job_id}` runs what is left"
        )
    elif counters is not None and not state.finished:
        queue = str(attrs["spec"].get("queue", "extract"))
        try:
            started = counters.started(job_id)
            progressed = counters.progressed(job_id)
            stalled = _stalled(counters, job_id, queue)
        except RedisError as exc:
            stalled = f"the broker is unreachable ({type(exc).__name__}): progress unknown"
    if attrs.get("started"):
        started = started or _seconds(str(attrs["started"]))
    if state is JobState.QUEUED and (done.any() or started):
        state = JobState.RUNNING
    rate = eta = None
    if state.finished:
        rate = float(attrs["samples_per_s"]) if attrs.get("samples_per_s") else None
    elif samples_done and stalled is None:
        elapsed = max(time.time() - (started or _seconds(str(attrs["created"]))), 1e-3)
        recent = progressed is None or time.time() - progressed <= max(
            PROGRESS_MIN_S, PROGRESS_INTERVALS * elapsed / max(int(done.sum()), 1)
        )
        if recent or counters is None:
            rate, eta = throughput(attrs, samples_done, time.time())
    if stalled is not None:
        state, reason = JobState.STALLED, stalled
    n_failed = _failed(read(group, ERROR_CODE))
    return Status(
        job_id, state.value, str(attrs.get("tenant", "local")), n, len(done), int(done.sum()),
        samples_done, n_failed, rate, eta, str(attrs["created"]),
        attrs.get("finished"), reason,
    )  # fmt: skip


def _written(n: int, size: int, done: np.ndarray) -> int:
    """Samples in the batches the ledger has done."""
    return int(np.minimum(size, n - np.arange(len(done)) * size)[done].sum())


def throughput(attrs: dict[str, Any], samples_done: int, at: float) -> tuple[float, float]:
    """The one rate and time left of a job, wherever it is shown: samples written divided
    by the seconds from the job's submission (`created`) to `at` (now while it runs, its
    finish once finished), and the samples still to write at that rate."""
    rate = samples_done / max(at - _seconds(str(attrs["created"])), 1e-3)
    return rate, (int(attrs["n_samples"]) - samples_done) / rate if rate else 0.0


def can_progress(s: Status) -> bool:
    """Whether the job may still end by itself: not finished, not interrupted. A job with
    no worker may: one that starts takes its tasks from the queue."""
    interrupted = s.state == JobState.STALLED and (s.reason or "").startswith(INTERRUPTED)
    return not JobState(s.state).finished and not interrupted


def list_jobs(store: str, state: str | None = None) -> list[Status]:
    found, cursor = job_page(store, 1000, None, state)
    while cursor is not None:
        more, cursor = job_page(store, 1000, cursor, state)
        found.extend(more)
    return found


def job_page(
    store: str,
    limit: int,
    cursor: str | None = None,
    state: str | None = None,
    tenant: str | None = None,
    counters: Counters | None = None,
) -> tuple[list[Status], str | None]:
    """A page of jobs from the job index, newest first, with the next page's cursor (None
    after the last). The index holds each job's stored state, and a stored `queued` may be
    running by its ledger: a filter on either reads both and keeps the jobs whose status
    matches, so such a page may hold fewer than `limit`."""
    live = state in (JobState.QUEUED, JobState.RUNNING)
    states = [JobState.QUEUED.value, JobState.RUNNING.value] if live else state and [state]
    entries, after = index_page(store, limit, cursor, tenant, states or None)

    def read(job_id: str) -> Status | None:
        try:
            return status(store, job_id, counters)
        except NotFound:
            return None  # deleted since it was indexed

    # Each status is a few small reads; on an object store their latency, not their work,
    # is the cost, so the page's jobs are read side by side.
    with ThreadPoolExecutor(max(1, min(PAGE_READERS, len(entries)))) as pool:
        found = [s for s in pool.map(read, [e.job_id for e in entries]) if s is not None]
    return [s for s in found if state is None or s.state == state], after


def cancel(store: str, job_id: str) -> Status:
    """Cooperative: running batches finish, queued ones are skipped by the workers."""
    current = status(store, job_id)
    if JobState(current.state).finished:
        raise Conflict(f"job {job_id} is already {current.state}; nothing to cancel")
    open_job(store, job_id).update_attributes({"state": JobState.CANCELLED.value})
    publish(store, job_id)
    return status(store, job_id)


def _failed(codes: np.ndarray) -> int:
    """Samples that failed; files skipped as not the model's kind of input are not."""
    return int(np.count_nonzero((codes != SampleCode.OK) & (codes != SampleCode.WRONG_KIND)))


def prepare_resume(store: str, job_id: str, counters: Counters | None = None) -> list[int]:
    """The batches the ledger lacks, with the job set back to queued and the counts squared
    with the ledger; empty when the ledger is complete (see `resume_batches`)."""
    group = open_job(store, job_id)
    state = JobState(attrs_of(group)["state"])
    if state in (JobState.SUCCEEDED, JobState.PARTIAL):
        return []
    ledger = done_batches(group)
    missing = [int(b) for b in np.flatnonzero(~ledger)]
    group.update_attributes({"state": JobState.QUEUED.value, "reason": "", "interrupted": ""})
    publish(store, job_id)
    if counters is not None:
        counters.reset(job_id, missing, [int(b) for b in np.flatnonzero(ledger)])
    return missing


def resume_batches(store: str, job_id: str, counters: Counters | None = None) -> list[int]:
    """What resume sends: the batches the ledger lacks. When it lacks none but the job never
    finalized (its last batch's count was lost with Redis or a worker), one written batch:
    its task finds the ledger complete and finalizes on a worker."""
    missing = prepare_resume(store, job_id, counters)
    if missing:
        return missing
    group = open_job(store, job_id, mode="r")
    unfinished = attrs_of(group)["state"] == JobState.QUEUED
    return [0] if unfinished and int(attrs_of(group)["n_batches"]) else []


def queue_of(store: str, job_id: str) -> str:
    """The queue the job was submitted to; resume sends its batches there too."""
    spec: dict[str, Any] = attrs_of(open_job(store, job_id, mode="r"))["spec"]
    return str(spec.get("queue", "extract"))


def wait(
    store: str,
    job_id: str,
    counters: Counters | None = None,
    progress: Callable[[Status], None] | None = None,
    timeout: float | None = None,
    poll_s: float = 1.0,
) -> Status:
    """Wait until the job is finished, cancelled or interrupted (`can_progress`), reading
    the store (the truth) every `poll_s` seconds for progress. With counters, the task that
    finalizes announces it, so the wait ends right after the finalize, not a poll later,
    and spends no CPU between reads. If the ledger is complete but nobody finalized (a
    finalizer died, Redis lost its counters), finalize here, after claiming it like a task
    would."""
    complete_since: float | None = None

    def read() -> Status:
        nonlocal complete_since
        current = status(store, job_id, counters)
        if progress:
            progress(current)
        if can_progress(current) and current.batches_done == current.n_batches:
            complete_since = complete_since or time.monotonic()
            # The last task normally finalizes; take over if it has not within a grace
            # period (it died after claiming), or claim it ourselves when nobody did.
            late = time.monotonic() - complete_since > FINALIZE_GRACE_S
            if counters is None or late or counters.claim_finalize(job_id):
                finalize(store, job_id)
                if counters is not None:
                    counters.announce(job_id)
                return read()
        return current

    with counters.listen(job_id) if counters is not None else nullcontext() as listener:
        pause = time.sleep if listener is None else listener.wait
        return poll(read, lambda s: not can_progress(s), poll_s, timeout, pause=pause)


def finalize(
    store: str, job_id: str, state: JobState | None = None, reason: str = ""
) -> dict[str, Any]:
    """Set the final state from the ledger and the per-sample codes, record timings, and
    publish the metadata. Returns the job's summary."""
    group = open_job(store, job_id)
    attrs = attrs_of(group)
    done = done_batches(group)
    codes = read(group, ERROR_CODE)
    n = int(attrs["n_samples"])
    n_failed = _failed(codes)
    if state is None:
        if not done.all():
            state = JobState.FAILED
            reason = reason or f"{int((~done).sum())} of {len(done)} batches did not complete"
        elif n and np.count_nonzero(codes) == n:
            state = JobState.FAILED
            reason = reason or "every sample failed; see error_message"
        else:
            state = JobState.PARTIAL if n_failed else JobState.SUCCEEDED
    finished = now()
    update: dict[str, Any] = {"state": state.value, "finished": finished, "n_failed": n_failed}
    if reason:
        update["reason"] = reason
    written = _written(n, int(attrs["batch_size"]), done)
    update["elapsed_s"] = round(_seconds(finished) - _seconds(str(attrs["created"])), 3)
    update["samples_per_s"] = round(throughput(attrs, written, _seconds(finished))[0], 2)
    profile = attrs.get("spec", {}).get("profile_id")
    if profile and state in (JobState.SUCCEEDED, JobState.PARTIAL):
        # Scored before the state is written: a client that sees the job finished finds
        # its scores there.
        score = cast(Score, pkgutil.resolve_name(SCORE_SCREENING))
        try:
            score(store, job_id, profile, finalizing=True)
        except UserError as exc:
            update.update({"state": JobState.FAILED.value, "reason": str(exc)})
    group.update_attributes(update)
    publish(store, job_id)
    return summary(store, job_id, group)


def mark_interrupted(store: str, job_id: str) -> None:
    """Ctrl-C stopped the job's run at a batch boundary: resumable, and said so."""
    open_job(store, job_id).update_attributes({"interrupted": now()})
    publish(store, job_id)  # an attrs write drops the group's consolidated map


def mark_started(store: str, job_id: str) -> None:
    group = open_job(store, job_id)
    group.update_attributes({"state": JobState.RUNNING.value, "started": now()})
    publish(store, job_id)


def summary(store: str, job_id: str, group: Any = None) -> dict[str, Any]:
    """The one JSON object `actmap scan --json` prints."""
    attrs = attrs_of(group or open_job(store, job_id, mode="r"))
    return {
        "job_id": job_id,
        "store": store,
        "state": attrs["state"],
        "n_samples": attrs["n_samples"],
        "n_failed": attrs.get("n_failed", 0),
    }
