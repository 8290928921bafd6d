"""How a job's batches are cut into tasks: as many to a task as the cap allows for one
worker, fewer as workers join, and cut so that equal workers finish together."""

from __future__ import annotations

import heapq

import pytest

from workers.lifecycle.submit import TASKS_PER_WORKER, task_groups


def _sizes(n_batches: int, workers: int, cap: int = 16) -> list[int]:
    return [len(g) for g in task_groups(range(n_batches), workers, cap)]


def _busiest(sizes: list[int], workers: int) -> int:
    """Batches run by the busiest of `workers` equal workers that each take the next task
    off the queue when they finish one (prefetch 1), as Celery hands them out."""
    free_at = [0] * workers
    for size in sizes:
        heapq.heappush(free_at, heapq.heappop(free_at) + size)
    return max(free_at)


@pytest.mark.parametrize(
    ("n_batches", "workers", "expected"),
    [
        (64, 1, [16] * 4),  # one worker: nothing to balance, the cap
        (40, 1, [14, 13, 13]),  # never over the cap, sizes within one of each other
        (1280, 64, [4] * 320),  # five tasks for each of 64 workers
        (200, 4, [10] * 20),  # 20 tasks, not 17 with one worker left a fifth alone
        (40, 16, [1] * 40),  # a small job on a big cluster: one batch to a task
        (3, 2, [1, 1, 1]),
        (64, 0, [4] * 16),  # nobody checked in: the cautious size
        (0, 4, []),
    ],
)
def test_tasks_shrink_as_workers_join_and_never_exceed_the_cap(
    n_batches: int, workers: int, expected: list[int]
) -> None:
    assert _sizes(n_batches, workers) == expected


@pytest.mark.parametrize("workers", [2, 4, 16, 64])
@pytest.mark.parametrize("n_batches", [100, 1000, 1600, 6400, 10_007])
def test_equal_workers_finish_within_one_batch_of_each_other(n_batches: int, workers: int) -> None:
    # 1600 batches in tasks of 16 on 16 workers (the cut before) made 6.25 rounds: four
    # workers ran a seventh task, 112 batches against an even share of 100.
    groups = task_groups(range(n_batches), workers, cap=16)
    sizes = [len(g) for g in groups]
    assert max(sizes) <= 16
    assert max(sizes) - min(sizes) <= 1
    assert [b for g in groups for b in g] == list(range(n_batches))  # each once, in order
    assert _busiest(sizes, workers) <= -(-n_batches // workers) + 1
    if n_batches >= workers * TASKS_PER_WORKER:
        assert len(groups) % workers == 0
        assert len(groups) >= workers * TASKS_PER_WORKER


def test_resumed_batches_keep_their_numbers() -> None:
    missing = [3, 4, 9, 17, 18, 30]
    assert task_groups(missing, 2, cap=16) == [[3], [4], [9], [17], [18], [30]]
    assert task_groups(missing, 1, cap=4) == [[3, 4, 9], [17, 18, 30]]
