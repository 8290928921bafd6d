"""One batch under at-least-once delivery: attempts, cancel, failure, completion.

Celery may deliver a batch twice, or again after its worker was killed; every path here is
idempotent, and the ledger decides what is done. The task that completes the last batch
finalizes the job; no chord is involved.
"""

from __future__ import annotations

import logging
from concurrent.futures import Executor
from dataclasses import dataclass
from enum import StrEnum

from workers.counters import Counters
from workers.errors import SampleCode, UserError
from workers.extraction.cache import ModelCache
from workers.gpu import compute_fitting
from workers.jobs import JobState
from workers.pipeline import decode_batch, finalize, spec_of, store_batch
from workers.storage.layout import array, attrs, open_job, read
from workers.storage.ledger import done_batches, is_done, mark_done

__all__ = ["Outcome", "Runtime", "execute_batch", "give_up"]

log = logging.getLogger("actmap")


class Outcome(StrEnum):
    RAN = "ran"
    SKIPPED = "skipped"  # the ledger had it
    CANCELLED = "cancelled"
    FAILED = "failed"  # marked failed: a user error, or past the attempt cap


@dataclass
class Runtime:
    """What a worker process keeps between tasks; built lazily in the child."""

    models: ModelCache
    counters: Counters
    attempt_cap: int = 3
    decoders: Executor | None = None  # threads decoding one batch's samples


def _fail_batch(store: str, job_id: str, batch: int, reason: str) -> None:
    """Record every not-yet-failed sample of the batch as failed, then mark it done so the
    rest of the job can finish."""
    group = open_job(store, job_id)
    size, n = attrs(group)["batch_size"], attrs(group)["n_samples"]
    rows = slice(batch * size, min((batch + 1) * size, n))
    codes = read(group, "error_code", rows)
    messages = read(group, "error_message", rows).astype(object)
    fresh = codes == 0
    codes[fresh] = SampleCode.BATCH_FAILED
    messages[fresh] = reason
    array(group, "error_code")[rows] = codes
    array(group, "error_message")[rows] = messages
    mark_done(group, batch)


def give_up(store: str, job_id: str, batch: int, reason: str, runtime: Runtime) -> Outcome:
    """Mark the batch failed with `reason` and let the job go on without it."""
    log.error("job %s batch %d: %s", job_id, batch, reason)
    _fail_batch(store, job_id, batch, reason)
    complete(store, job_id, batch, runtime)
    return Outcome.FAILED


def complete(store: str, job_id: str, batch: int, runtime: Runtime) -> None:
    """After batch `batch` is in the ledger: finalize if it was the last one."""
    group = open_job(store, job_id, mode="r")
    n_batches = attrs(group)["n_batches"]
    if runtime.counters.done(job_id, batch) < n_batches:
        return
    # The counters say all are done; the ledger must agree before anyone finalizes.
    if done_batches(group).all() and runtime.counters.claim_finalize(job_id):
        finalize(store, job_id)


def execute_batch(store: str, job_id: str, batch: int, runtime: Runtime) -> Outcome:
    """Run one batch the way a task must: skip what the ledger has or a cancelled job,
    give up past the attempt cap, turn user errors into a failed batch, let transient
    errors propagate for a retry."""
    group = open_job(store, job_id)
    if attrs(group)["state"] == JobState.CANCELLED:
        return Outcome.CANCELLED
    if is_done(group, batch):
        complete(store, job_id, batch, runtime)
        return Outcome.SKIPPED
    attempt = runtime.counters.attempt(job_id, batch)
    if attempt > runtime.attempt_cap:
        reason = (
            f"batch {batch} given up after {runtime.attempt_cap} attempts: its worker died "
            "or it kept failing"
        )
        return give_up(store, job_id, batch, reason, runtime)
    spec = spec_of(group)
    try:
        model = runtime.models.get(spec)
        decoded = decode_batch(group, spec, model.info, batch, runtime.decoders)
        rows = compute_fitting(model, spec, decoded)
    except UserError as exc:  # the same on every attempt: never retried
        return give_up(store, job_id, batch, str(exc), runtime)
    store_batch(group, batch, rows)
    complete(store, job_id, batch, runtime)
    return Outcome.RAN
