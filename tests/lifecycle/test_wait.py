"""Waiting for a job: it ends with the finalize of the last task, whoever finalizes."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FACTORY
from tests.oracle import planned
from workers.extraction.cache import ModelCache
from workers.jobs import ExtractionSpec
from workers.lifecycle.counters import MemoryCounters
from workers.lifecycle.delivery import Runtime, execute_batches
from workers.lifecycle.state import Status, finalize, mark_started, wait
from workers.pipeline import Extraction

DEADLINE_S = 30.0


class NeverFinalizes(MemoryCounters):
    """Counts like Redis would, but no task may claim the finalize: it is the test's. Whoever
    finalizes after a claim announces it, which is recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.announced: list[str] = []

    def claim_finalize(self, job_id: str) -> bool:
        super().claim_finalize(job_id)
        return False

    def announce(self, job_id: str) -> None:
        self.announced.append(job_id)
        super().announce(job_id)


@pytest.fixture
def written(tmp_path: Path, arrays: list[Path], random_weights: Path) -> tuple[str, str, Any]:
    """A job whose every batch is written and counted, not yet finalized."""
    spec = ExtractionSpec(
        model=FACTORY,
        weights=str(random_weights),
        layers=("conv1",),
        inputs=tuple(str(p) for p in arrays),
        batch_size=10,
    )
    models, store = ModelCache(), str(tmp_path / "store")
    job = planned(store, spec, models.get(spec).info)
    mark_started(store, job.job_id)
    counters = NeverFinalizes()
    execute_batches(
        store, job.job_id, list(range(job.n_batches)), Runtime(Extraction(models), counters)
    )
    return store, job.job_id, counters


def test_wait_ends_with_the_finalize_of_the_task_that_claimed_it(
    written: tuple[str, str, Any],
) -> None:
    store, job_id, counters = written
    seen: list[Status] = []
    first = threading.Event()

    def progress(status: Status) -> None:
        seen.append(status)
        first.set()

    with ThreadPoolExecutor(1) as waiter:
        result = waiter.submit(wait, store, job_id, counters, progress, DEADLINE_S)
        assert first.wait(DEADLINE_S)
        assert seen[0].batches_done == seen[0].n_batches
        assert seen[0].state == "running"
        finalize(store, job_id)  # the task that claimed it, late
        final = result.result(DEADLINE_S)

    assert final.state == "succeeded"
    assert final.finished is not None
    assert counters.announced == []  # the claim was taken: the waiter left the finalize


def test_wait_finalizes_itself_when_nobody_claimed_it(written: tuple[str, str, Any]) -> None:
    store, job_id, _ = written
    counters = MemoryCounters()  # Redis lost its counters: no count, no claim
    assert wait(store, job_id, counters, timeout=DEADLINE_S).state == "succeeded"


def test_the_finalizing_tasks_announcement_ends_the_wait_before_any_poll(
    written: tuple[str, str, Any],
) -> None:
    store, job_id, counters = written
    first, ended = threading.Event(), threading.Event()
    final: list[Status] = []

    def waiting() -> None:
        # No deadline and an hour between reads: only the announcement can end this wait.
        final.append(wait(store, job_id, counters, lambda _s: first.set(), None, 3600.0))
        ended.set()

    # A daemon thread: should the announcement be lost, the test fails instead of hanging.
    threading.Thread(target=waiting, daemon=True).start()
    assert first.wait(DEADLINE_S)
    finalize(store, job_id)
    counters.announce(job_id)
    assert ended.wait(DEADLINE_S), "the wait did not wake on the announcement"
    assert final[0].state == "succeeded"


def test_an_announcement_before_the_listener_was_made_is_not_taken_for_a_new_one() -> None:
    counters = MemoryCounters()
    counters.announce("j1")
    with counters.listen("j1") as listener:
        assert not listener.wait(0.01)
        counters.announce("j2")  # another job's
        assert not listener.wait(0.01)
        counters.announce("j1")
        assert listener.wait(DEADLINE_S)
