"""`workers.jobs.poll`, the one polling loop: read until done or out of time, pausing
between reads, the pause growing when asked to."""

from __future__ import annotations

from collections.abc import Iterator

from workers.jobs import poll


def _reads(values: list[int]) -> Iterator[int]:
    yield from values


def test_poll_reads_until_done_and_pauses_between_reads_growing_to_the_most() -> None:
    values, pauses = _reads([1, 2, 3, 4, 5]), list[float]()
    found = poll(lambda: next(values), lambda v: v == 4, 0.01, grow=2.0, most=0.03,
                 pause=pauses.append)  # fmt: skip
    assert found == 4
    assert pauses == [0.01, 0.02, 0.03]


def test_poll_returns_the_last_read_once_its_time_is_up() -> None:
    pauses: list[float] = []
    assert poll(lambda: 7, lambda _: False, 0.5, timeout=0.0, pause=pauses.append) == 7
    assert pauses == []
