"""The worker's soft-shutdown wait lies between the task hard limit and the Redis
visibility timeout, as the app is configured, whatever the limits."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from workers.execution.celery_app import make_celery
from workers.settings import Settings

BROKER = "redis://127.0.0.1:1/0"  # never connected to: only the configuration is read


@pytest.mark.parametrize("limits", [{}, {"task_soft_time_limit": 10, "task_time_limit": 20}])
def test_the_soft_shutdown_outlasts_the_hard_limit_and_ends_before_redelivery(
    limits: dict[str, int],
) -> None:
    settings = Settings(broker_url=BROKER, **limits)  # type: ignore[arg-type]
    conf = make_celery(settings).conf
    assert conf.task_time_limit < conf.worker_soft_shutdown_timeout
    assert conf.worker_soft_shutdown_timeout < conf.broker_transport_options["visibility_timeout"]


def test_a_soft_shutdown_below_the_hard_limit_is_refused_with_what_to_set() -> None:
    with pytest.raises(ValidationError, match="ACTMAP_SOFT_SHUTDOWN_S .* must lie between"):
        Settings(broker_url=BROKER, soft_shutdown_s=60)  # type: ignore[arg-type]
