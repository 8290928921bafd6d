"""Completion when the done-count is short of the ledger: a worker that died, or lost Redis,
between writing its batch and counting it. The job must still finish."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import FACTORY
from tests.oracle import planned
from workers.extraction.cache import ModelCache
from workers.jobs import ExtractionSpec
from workers.lifecycle.counters import MemoryCounters
from workers.lifecycle.delivery import Runtime, execute_batches
from workers.lifecycle.plan import Plan
from workers.lifecycle.state import prepare_resume, resume_batches, status
from workers.pipeline import Extraction


class LosesOneCount(MemoryCounters):
    """Counts every batch but `lost`: its worker wrote the ledger, then died before counting."""

    def __init__(self, lost: int) -> None:
        super().__init__()
        self.lost = lost

    def done(self, job_id: str, batch: int) -> int:
        if batch == self.lost:
            self.lost = -1  # only the first time: a later delivery counts as usual
            return self.done_count(job_id)
        return super().done(job_id, batch)


@pytest.fixture
def job(tmp_path: Path, arrays: list[Path], random_weights: Path) -> tuple[str, Plan, Runtime]:
    spec = ExtractionSpec(
        model=FACTORY,
        weights=str(random_weights),
        layers=("conv1", "fc"),
        inputs=tuple(str(p) for p in arrays),
        batch_size=5,  # 23 samples: 5 batches
    )
    models = ModelCache()
    store = str(tmp_path / "store")
    job = planned(store, spec, models.get(spec).info)
    return store, job, Runtime(Extraction(models), LosesOneCount(lost=1))


def test_resume_finishes_a_job_whose_count_fell_short_of_the_ledger(
    job: tuple[str, Plan, Runtime],
) -> None:
    store, planned, runtime = job
    execute_batches(store, planned.job_id, [0, 1, 2, 3], runtime)  # batch 4 never ran
    assert status(store, planned.job_id).state == "running"

    missing = prepare_resume(store, planned.job_id, runtime.counters)
    assert missing == [4]
    execute_batches(store, planned.job_id, missing, runtime)
    assert status(store, planned.job_id).state == "succeeded"


def test_a_redelivered_batch_finishes_the_job_from_the_ledger(
    job: tuple[str, Plan, Runtime],
) -> None:
    store, planned, runtime = job
    execute_batches(store, planned.job_id, [0, 1, 2, 3, 4], runtime)
    # Every batch is written, but the count says 4 of 5, so no task finalized.
    assert status(store, planned.job_id).state == "running"

    outcomes = execute_batches(store, planned.job_id, [3], runtime)  # a late redelivery
    assert [str(o) for o in outcomes] == ["skipped"]
    assert status(store, planned.job_id).state == "succeeded"


def test_resume_of_a_written_but_unfinalized_job_sends_one_batch_that_finalizes(
    job: tuple[str, Plan, Runtime],
) -> None:
    store, planned, runtime = job
    execute_batches(store, planned.job_id, [0, 1, 2, 3, 4], runtime)
    assert status(store, planned.job_id).state == "running"

    batches = resume_batches(store, planned.job_id, runtime.counters)
    assert batches == [0]  # nothing is missing; one written batch, to finalize
    execute_batches(store, planned.job_id, batches, runtime)
    assert status(store, planned.job_id).state == "succeeded"
    assert resume_batches(store, planned.job_id, runtime.counters) == []
