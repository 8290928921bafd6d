"""Run a whole job in this process, overlapping decode, compute and write.

Decoding runs one batch ahead in threads, writes go to a background thread through a
queue of two batches (their chunks encoded in the decode threads): memory stays bounded
by a few batches, whatever the job size, and the device never waits on disk.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from workers.errors import ActmapError
from workers.extraction.cache import ModelCache
from workers.extraction.inputs import list_inputs
from workers.jobs import ExtractionSpec, JobState, ModelInfo
from workers.lifecycle.plan import Plan, plan
from workers.lifecycle.state import finalize, mark_started
from workers.pipeline import (
    Decoded,
    WriteBehind,
    compute_batch,
    decode_batch,
    spec_of,
    store_batch,
)
from workers.storage.layout import open_job
from workers.storage.ledger import pending_batches
from workers.storage.rows import BatchRows

__all__ = ["planned", "run_job"]

Progress = Callable[[int], None]


def planned(store: str, spec: ExtractionSpec, info: ModelInfo, job_id: str | None = None) -> Plan:
    """The job planned as a submission plans it: inputs listed and labelled, then planned."""
    return plan(store, spec, info, list_inputs(spec, info), job_id)


def run_job(
    store: str,
    job_id: str,
    models: ModelCache,
    progress: Progress | None = None,
    decode_threads: int = 4,
) -> dict[str, Any]:
    """Run every batch the ledger lacks, then finalize. A job-level user error (a layer
    that returns a tuple, say) fails the job with its reason and is raised."""
    group = open_job(store, job_id)
    spec = spec_of(group)
    mark_started(store, job_id)
    try:
        model = models.get(spec)

        opened: dict[str, Any] = {}

        def write(batch: int, rows: BatchRows) -> None:
            store_batch(group, batch, rows, opened, pool)
            if progress:
                progress(len(rows.error_code))

        with (
            # The pool first: it encodes chunks too, so it must outlive the writer.
            ThreadPoolExecutor(decode_threads) as pool,
            WriteBehind(write) as writer,
            ThreadPoolExecutor(1) as ahead,
        ):
            ahead_of: deque[Future[Decoded]] = deque()
            pending = deque(pending_batches(group))

            def prefetch() -> None:
                if pending:
                    b = pending.popleft()
                    ahead_of.append(ahead.submit(decode_batch, group, spec, model.info, b, pool))

            prefetch()
            prefetch()
            while ahead_of:
                decoded = ahead_of.popleft().result()
                prefetch()
                writer.put(decoded.batch, compute_batch(model, spec, decoded))
    except ActmapError as exc:
        finalize(store, job_id, JobState.FAILED, str(exc))
        raise
    return finalize(store, job_id)
