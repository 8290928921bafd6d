"""Settings that depend on each other stay consistent when only one is set."""

from __future__ import annotations

from workers.settings import Settings


def test_a_small_soft_limit_gets_a_model_check_deadline_under_it() -> None:
    settings = Settings(task_soft_time_limit=10, task_time_limit=20)
    assert settings.model_check_deadline_s < settings.task_soft_time_limit


def test_the_model_check_deadline_is_two_minutes_by_default_and_as_set() -> None:
    assert Settings().model_check_deadline_s == 120
    assert Settings(model_check_timeout_s=30).model_check_deadline_s == 30
