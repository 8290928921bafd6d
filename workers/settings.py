"""Typed settings from the environment (prefix ACTMAP_), built once at an entry point."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Read once by each process at its entry point and passed in; never a global."""

    model_config = SettingsConfigDict(env_prefix="ACTMAP_", frozen=True, extra="ignore")

    store: str = "./actmap-store"
    broker_url: SecretStr | None = None
    api_url: str | None = None
    token: SecretStr | None = None
    auth_file: str | None = None
    device: str = "cpu"
    decode_threads: int = 4
    # Celery: a task is sized to run seconds to minutes; the hard limit stops a stuck one.
    task_soft_time_limit: int = 540
    task_time_limit: int = 600
    attempt_cap: int = 3  # starts of one batch before it is marked failed
    # A task's first decode and last write are not overlapped, so a task holds enough
    # batches to hide them: 64 matched in-process speed where 16 did not (figures:
    # tests/bench/README.md).
    # A task hands back what it cannot finish in `budget_s`, so size costs no time limit.
    batches_per_task: int = 64
    task_budget_s: float | None = Field(default=None, ge=0)  # None: half the soft limit
    factories: tuple[str, ...] | None = None  # allow-list of package.module:factory
    # The API's guards. A request body over `max_body_bytes` is refused as it streams
    # (None: 1 MiB above the largest upload quota of the auth file's tenants).
    # `/metrics`: "off" (404), "open", or "token" (Bearer `metrics_token`); unset, it is
    # "token" when a metrics token is set, else "off" with an auth file and "open" without.
    # `quota_lock_s`: how long a tenant's quota lock lives if its API process dies.
    max_body_bytes: int | None = Field(default=None, ge=1)
    metrics: Literal["off", "open", "token"] | None = None
    metrics_token: SecretStr | None = None
    quota_lock_s: float = Field(default=30.0, gt=0)
    # How long the API waits for a `screen` worker's answer to one sample (the first
    # request of a profile loads its model there).
    screen_timeout_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _metrics_token_given(self) -> Self:
        if self.metrics == "token" and self.metrics_token is None:
            raise ValueError("ACTMAP_METRICS=token needs ACTMAP_METRICS_TOKEN")
        return self

    @property
    def metrics_access(self) -> Literal["off", "open", "token"]:
        """Who may read `/metrics`: the setting, or its default by what else is set."""
        if self.metrics is not None:
            return self.metrics
        if self.metrics_token is not None:
            return "token"
        return "open" if self.auth_file is None else "off"

    # A registration, and a worker's first load of model bytes it has not seen, run in a
    # child interpreter with this address-space cap and deadline (under the soft limit: a
    # task's first load waits on it). None: 120 s, or half the soft limit where that is less.
    model_check_memory_mb: int = Field(default=8192, ge=256)
    model_check_timeout_s: float | None = Field(default=None, gt=0)

    # Reliability: every worker child checks in on the roster, and renews the lease on the
    # batches its task holds, each `roster_period_s`; one child of the cluster at a time
    # then reconciles. A batch of an unfinished job that no queued message and no live lease
    # has covered for `reconcile_after_s` is sent again (a Redis restart lost it, or its
    # worker's host died), so a loss is noticed in about two periods plus this bound.
    roster_period_s: float = Field(default=60.0, gt=0)
    reconcile_after_s: float = Field(default=60.0, ge=0)

    # Under a platform (Kubernetes, compose, Slurm): on SIGTERM a worker finishes its task,
    # which its hard limit bounds, so the soft-shutdown wait must outlast that limit, and the
    # platform's grace period this wait (deploy/README.md has the table). None: limit + 30 s.
    soft_shutdown_s: int | None = Field(default=None, ge=1)
    # A directory for the liveness heartbeat and readiness files (workers/execution/heartbeat.py);
    # None: no files, as on a laptop.
    health_dir: str | None = None
    heartbeat_s: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _shutdown_between_limit_and_redelivery(self) -> Self:
        if not self.task_time_limit < self.shutdown_s < self.visibility_timeout:
            raise ValueError(
                f"ACTMAP_SOFT_SHUTDOWN_S ({self.shutdown_s}) must lie between "
                f"ACTMAP_TASK_TIME_LIMIT ({self.task_time_limit}) and the Redis visibility "
                f"timeout ({self.visibility_timeout} = 2 x the time limit + 60)"
            )
        return self

    @property
    def model_check_deadline_s(self) -> float:
        """The model check's deadline: the setting, else 120 s or half the soft limit."""
        if self.model_check_timeout_s is not None:
            return self.model_check_timeout_s
        return min(120.0, self.task_soft_time_limit / 2)

    @property
    def shutdown_s(self) -> int:
        """How long a worker may take to stop on SIGTERM: past the task hard limit, so the
        batch running is finished or handed back, never cut by the platform's kill."""
        if self.soft_shutdown_s is not None:
            return self.soft_shutdown_s
        return self.task_time_limit + 30

    @model_validator(mode="after")
    def _budget_inside_the_limit(self) -> Self:
        if self.task_budget_s is not None and self.task_budget_s >= self.task_soft_time_limit:
            raise ValueError(
                f"ACTMAP_TASK_BUDGET_S ({self.task_budget_s:g}) must be below "
                f"ACTMAP_TASK_SOFT_TIME_LIMIT ({self.task_soft_time_limit})"
            )
        if (
            self.model_check_timeout_s is not None
            and self.model_check_timeout_s >= self.task_soft_time_limit
        ):
            raise ValueError(
                f"ACTMAP_MODEL_CHECK_TIMEOUT_S ({self.model_check_timeout_s:g}) must be below "
                f"ACTMAP_TASK_SOFT_TIME_LIMIT ({self.task_soft_time_limit})"
            )
        return self

    @property
    def budget_s(self) -> float:
        """A task starts no batch it expects to end past this: `task_budget_s`, or half
        the soft limit, since the batch after the slowest so far may take longer still."""
        if self.task_budget_s is not None:
            return self.task_budget_s
        return self.task_soft_time_limit / 2

    @property
    def visibility_timeout(self) -> int:
        """Redis redelivers an unacked task after this; it must outlast the hard limit or a
        long batch would run twice at once."""
        return self.task_time_limit * 2 + 60
