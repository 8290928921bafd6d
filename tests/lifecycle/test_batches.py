"""A task's batches: the next one is decoded while the current one computes, and that
decode ahead changes nothing about what is stored, skipped or cancelled."""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

from tests.conftest import FACTORY
from tests.oracle import planned, run_job
from workers.errors import SampleCode
from workers.execution.tasks import register
from workers.extraction.cache import ModelCache
from workers.jobs import ExtractionSpec, TaskName
from workers.lifecycle.counters import MemoryCounters
from workers.lifecycle.delivery import OPEN_JOBS, Outcome, Runtime, execute_batches
from workers.lifecycle.state import cancel
from workers.pipeline import Decoded, Extraction
from workers.storage.layout import open_job, read
from workers.storage.ledger import done_batches
from workers.storage.rows import BatchRows

LAYERS = ("conv1", "block2.conv2", "fc")
DEADLINE_S = 30.0


def _spec(arrays: list[Path], weights: Path) -> ExtractionSpec:
    return ExtractionSpec(
        model=FACTORY,
        weights=str(weights),
        layers=LAYERS,
        inputs=tuple(str(p) for p in arrays),
        batch_size=5,  # 23 samples: 5 batches, the last one of 3
        dtype="float16",
    )


def _files(store: Path, job_id: str) -> dict[str, str]:
    """Every file of the job but its metadata (attrs hold the job's id and times)."""
    root = store / "jobs" / job_id
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "zarr.json"
    }


@pytest.fixture
def decoders() -> Any:
    with ThreadPoolExecutor(2) as pool:
        yield pool


Sent = list[tuple[str, list[Any], str]]


def _task_app(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> tuple[Celery, Sent]:
    """The tasks registered over `runtime` on an app without a broker: what a task sends
    on is recorded, not published."""
    app = Celery("test", set_as_current=False)
    app.conf.task_soft_time_limit = 540
    register(app, lambda: runtime, lambda: runtime_models(runtime))
    sent: Sent = []
    monkeypatch.setattr(
        app, "send_task", lambda name, args, queue, **_: sent.append((name, args, queue))
    )
    return app, sent


def runtime_models(runtime: Runtime) -> ModelCache:
    assert isinstance(runtime.extractor, Extraction)
    return runtime.extractor.models


class DecodesAhead(Extraction):
    """Computes batch 0 only once batches 1 and 2 have started decoding: without the decode
    two ahead, batch 0 would wait out the deadline."""

    def __init__(self, models: ModelCache, n_batches: int, pool: Any) -> None:
        super().__init__(models, pool)
        self.decoding = {b: threading.Event() for b in range(n_batches)}

    def decode(self, group: Any, spec: ExtractionSpec, batch: int) -> Decoded:
        self.decoding[batch].set()
        return super().decode(group, spec, batch)

    def compute(self, spec: ExtractionSpec, decoded: Decoded) -> BatchRows:
        if decoded.batch == 0:
            assert self.decoding[1].wait(DEADLINE_S), "batch 1 was not decoded during batch 0"
            assert self.decoding[2].wait(DEADLINE_S), "batch 2 was not decoded during batch 0"
        return super().compute(spec, decoded)


class BreaksAtBatch2(Extraction):
    def compute(self, spec: ExtractionSpec, decoded: Decoded) -> BatchRows:
        if decoded.batch == 2:
            raise RuntimeError("a bug in a layer")  # not a user error: the task's catch-all
        return super().compute(spec, decoded)


class TooSlow(Extraction):
    def compute(self, spec: ExtractionSpec, decoded: Decoded) -> BatchRows:  # noqa: ARG002 (the signature the caller requires)
        raise SoftTimeLimitExceeded()  # what Celery raises in the task when the limit hits


def test_tasks_of_several_batches_store_what_the_in_process_runner_stores(
    tmp_path: Path, arrays: list[Path], random_weights: Path, decoders: ThreadPoolExecutor
) -> None:
    spec, models = _spec(arrays, random_weights), ModelCache()
    reference = planned(str(tmp_path / "ref"), spec, models.get(spec).info)
    run_job(str(tmp_path / "ref"), reference.job_id, models)
    job = planned(str(tmp_path / "task"), spec, models.get(spec).info)
    runtime = Runtime(Extraction(models, decoders), MemoryCounters())

    outcomes = [
        outcome
        for task in ([0, 1], [2, 3], [4])  # later tasks write through arrays opened earlier
        for outcome in execute_batches(str(tmp_path / "task"), job.job_id, task, runtime)
    ]

    assert outcomes == [Outcome.RAN] * 5
    assert _files(tmp_path / "task", job.job_id) == _files(tmp_path / "ref", reference.job_id)
    group = open_job(str(tmp_path / "task"), job.job_id)
    assert read(group, "done").all()
    assert group.attrs["state"] == "succeeded"


def test_a_process_keeps_the_arrays_of_its_last_few_jobs_open(
    tmp_path: Path, arrays: list[Path], random_weights: Path
) -> None:
    spec, models = _spec(arrays[:5], random_weights), ModelCache()
    runtime = Runtime(Extraction(models), MemoryCounters())
    jobs = [planned(str(tmp_path / "store"), spec, models.get(spec).info) for _ in range(6)]
    for job in jobs:
        execute_batches(str(tmp_path / "store"), job.job_id, [0], runtime)
    kept = [job_id for _, job_id in runtime.jobs]
    assert kept == [job.job_id for job in jobs[-OPEN_JOBS:]]
    assert runtime.open(str(tmp_path / "store"), jobs[-1].job_id).n_batches == 1


def test_the_next_two_batches_are_decoded_while_the_current_one_computes(
    tmp_path: Path,
    arrays: list[Path],
    random_weights: Path,
    decoders: ThreadPoolExecutor,
) -> None:
    spec, models = _spec(arrays, random_weights), ModelCache()
    job = planned(str(tmp_path / "store"), spec, models.get(spec).info)
    runtime = Runtime(DecodesAhead(models, job.n_batches, decoders), MemoryCounters())
    outcomes = execute_batches(str(tmp_path / "store"), job.job_id, [0, 1, 2], runtime)
    assert outcomes == [Outcome.RAN] * 3


class CancelsAtFirstStart(MemoryCounters):
    """Cancels the job when batch 0 starts: batch 1 is decoded ahead, then must not run."""

    def __init__(self, store: str) -> None:
        super().__init__()
        self.store = store

    def attempt(self, job_id: str, batch: int) -> int:
        if batch == 0:
            cancel(self.store, job_id)
        return super().attempt(job_id, batch)


def test_a_batch_decoded_ahead_is_not_run_once_its_job_is_cancelled(
    tmp_path: Path, arrays: list[Path], random_weights: Path, decoders: ThreadPoolExecutor
) -> None:
    spec, models, store = _spec(arrays, random_weights), ModelCache(), str(tmp_path / "store")
    job = planned(store, spec, models.get(spec).info)
    runtime = Runtime(Extraction(models, decoders), CancelsAtFirstStart(store))

    outcomes = execute_batches(store, job.job_id, [0, 1, 2], runtime)

    assert outcomes == [Outcome.RAN, Outcome.CANCELLED, Outcome.CANCELLED]
    assert list(done_batches(open_job(store, job.job_id))) == [True, False, False, False, False]


def test_a_batch_the_ledger_has_is_skipped_between_two_that_run(
    tmp_path: Path, arrays: list[Path], random_weights: Path, decoders: ThreadPoolExecutor
) -> None:
    spec, models, store = _spec(arrays, random_weights), ModelCache(), tmp_path / "store"
    job = planned(str(store), spec, models.get(spec).info)
    runtime = Runtime(Extraction(models, decoders), MemoryCounters())
    assert execute_batches(str(store), job.job_id, [1], runtime) == [Outcome.RAN]
    before = _files(store, job.job_id)

    outcomes = execute_batches(str(store), job.job_id, [0, 1, 2], runtime)

    assert outcomes == [Outcome.RAN, Outcome.SKIPPED, Outcome.RAN]
    after = _files(store, job.job_id)
    assert {k: v for k, v in after.items() if k in before} == before
    group = open_job(str(store), job.job_id)
    assert list(done_batches(group)) == [True, True, True, False, False]
    assert np.isfinite(read(group, "logits", slice(0, 15))).all()


def test_a_task_that_fails_part_way_keeps_the_batches_it_wrote(
    tmp_path: Path,
    arrays: list[Path],
    random_weights: Path,
    decoders: ThreadPoolExecutor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec, models = _spec(arrays, random_weights), ModelCache()
    store = str(tmp_path / "store")
    job = planned(store, spec, models.get(spec).info)
    runtime = Runtime(BreaksAtBatch2(models, decoders), MemoryCounters())
    app, _ = _task_app(runtime, monkeypatch)
    result = app.tasks[TaskName.RUN_BATCH].run(store, job.job_id, [0, 1, 2, 3])

    assert result["outcomes"] == ["skipped", "skipped", "failed", "failed"]
    codes = read(open_job(store, job.job_id, mode="r"), "error_code")
    assert (codes[:10] == 0).all()  # batches 0 and 1 were written before the failure
    assert (codes[10:20] == SampleCode.BATCH_FAILED).all()


def test_a_task_whose_time_is_up_sends_the_batches_it_did_not_start_on(
    tmp_path: Path,
    arrays: list[Path],
    random_weights: Path,
    decoders: ThreadPoolExecutor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec, models = _spec(arrays, random_weights), ModelCache()
    reference = planned(str(tmp_path / "ref"), spec, models.get(spec).info)
    run_job(str(tmp_path / "ref"), reference.job_id, models)
    store = str(tmp_path / "task")
    job = planned(store, spec, models.get(spec).info)
    # No time at all: each task runs one batch, then sends the rest to a new task.
    runtime = Runtime(Extraction(models, decoders), MemoryCounters(), budget_s=0.0)
    app, sent = _task_app(runtime, monkeypatch)

    result = app.tasks[TaskName.RUN_BATCH].run(store, job.job_id, [0, 1, 2, 3, 4])

    assert result["outcomes"] == ["ran"] + ["deferred"] * 4
    assert sent == [(TaskName.RUN_BATCH, [store, job.job_id, [1, 2, 3, 4]], "extract")]
    while sent:  # the new tasks, as a worker would take them
        name, args, _ = sent.pop()
        app.tasks[name].run(*args)
    assert _files(tmp_path / "task", job.job_id) == _files(tmp_path / "ref", reference.job_id)
    assert open_job(store, job.job_id, mode="r").attrs["state"] == "succeeded"


def test_a_batch_past_the_soft_time_limit_fails_with_what_to_do(
    tmp_path: Path,
    arrays: list[Path],
    random_weights: Path,
    decoders: ThreadPoolExecutor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec, models = _spec(arrays, random_weights), ModelCache()
    store = str(tmp_path / "store")
    job = planned(store, spec, models.get(spec).info)
    app, _ = _task_app(Runtime(TooSlow(models, decoders), MemoryCounters()), monkeypatch)
    result = app.tasks[TaskName.RUN_BATCH].run(store, job.job_id, [0, 1])

    assert result["outcomes"] == ["failed", "failed"]
    group = open_job(store, job.job_id, mode="r")
    message = str(read(group, "error_message")[0])
    assert "soft time limit of 540 s" in message
    assert "ACTMAP_TASK_SOFT_TIME_LIMIT" in message
    assert (read(group, "error_code")[:10] == SampleCode.BATCH_FAILED).all()


def test_a_cancelled_job_sends_no_batches_on_when_a_task_is_out_of_time(
    tmp_path: Path,
    arrays: list[Path],
    random_weights: Path,
    decoders: ThreadPoolExecutor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec, models = _spec(arrays, random_weights), ModelCache()
    store = str(tmp_path / "store")
    job = planned(store, spec, models.get(spec).info)
    cancel(store, job.job_id)
    runtime = Runtime(Extraction(models, decoders), MemoryCounters(), budget_s=0.0)
    app, sent = _task_app(runtime, monkeypatch)

    result = app.tasks[TaskName.RUN_BATCH].run(store, job.job_id, [0, 1, 2])

    assert result["outcomes"] == ["cancelled"] * 3
    assert sent == []
