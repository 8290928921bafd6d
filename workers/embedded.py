"""The embedded default: plan and run a job in this process, no broker needed."""

from __future__ import annotations

from typing import Any

from workers.extraction.cache import ModelCache
from workers.extraction.models import load_model
from workers.jobs import ExtractionSpec, ModelInfo, Preprocessing
from workers.pipeline import plan
from workers.runner import Progress, run_job
from workers.settings import Settings

__all__ = ["catalogue", "scan"]


def catalogue(
    model: str, weights: str | None, prep: Preprocessing | None, settings: Settings
) -> ModelInfo:
    return load_model(model, weights, prep, device=settings.device).info


def scan(
    spec: ExtractionSpec,
    store: str,
    settings: Settings,
    on_plan: Any = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Plan the job, then run it here. `on_plan(plan)` is called once the job exists."""
    models = ModelCache(settings.device)
    job = plan(store, spec, models.get(spec).info)
    if on_plan is not None:
        on_plan(job)
    return run_job(store, job.job_id, models, progress, settings.decode_threads)
