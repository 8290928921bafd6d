"""How many batches go to a task: as many as the cap allows for one worker, fewer as
workers join, so that each gets several tasks of a job."""

from __future__ import annotations

import pytest

from workers.control import TASKS_PER_WORKER, per_task, task_batches


@pytest.mark.parametrize(
    ("n_batches", "workers", "expected"),
    [
        (64, 1, 16),  # one worker: nothing to balance, the cap
        (10_000, 1, 16),  # the cap
        (1280, 64, 4),  # 320 tasks: five for each of 64 workers
        (200, 4, 10),  # 20 tasks, not 17 with one worker left a fifth alone
        (40, 16, 1),  # a small job on a big cluster: one batch to a task
        (3, 2, 1),
        (64, 0, 4),  # nobody checked in: the cautious size
    ],
)
def test_tasks_shrink_as_workers_join_and_never_exceed_the_cap(
    n_batches: int, workers: int, expected: int
) -> None:
    assert per_task(n_batches, workers, cap=16) == expected


@pytest.mark.parametrize("workers", [2, 4, 16, 64])
def test_every_worker_gets_several_tasks_when_the_job_allows(workers: int) -> None:
    n_batches = workers * TASKS_PER_WORKER * 3
    tasks = task_batches(range(n_batches), per_task(n_batches, workers, cap=16))
    assert len(tasks) == workers * TASKS_PER_WORKER  # the same number for each
    assert sorted(b for task in tasks for b in task) == list(range(n_batches))
