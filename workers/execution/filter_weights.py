"""The first conv layer's filter weights of a stored job, read from its model: the one
picture of a report that needs torch, so the command line loads it only when asked."""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

import numpy as np

from workers.errors import ActmapError
from workers.jobs import CONV_TYPES, Preprocessing
from workers.storage.layout import attrs, open_job

__all__ = ["first_conv_weights"]

log = logging.getLogger("actmap")


def _first_conv(job: dict[str, Any]) -> str | None:
    rows = job.get("catalogue", {}).get("layers", [])
    return next((r["name"] for r in rows if r.get("type") in CONV_TYPES), None)


def first_conv_weights(
    store: str, job_id: str, factories: Collection[str] | None = None
) -> tuple[str, np.ndarray] | None:
    """(layer, weights) of the job's first conv layer, loaded from its model; None when
    the model has no conv layer, torch is missing or the model does not load here.
    `factories` is the allow-list of `package.module:factory` references (None: any)."""
    job = attrs(open_job(store, job_id, mode="r"))
    layer = _first_conv(job)
    if layer is None:
        return None
    try:  # torch only here, never at import: the command line stays importable without it
        from workers.extraction.models import conv_weights, load_model
    except ImportError:
        log.warning("no torch here: the report goes without filter weights")
        return None
    spec = job.get("spec", {})
    prep = spec.get("preprocessing")
    try:
        model = load_model(
            spec["model"],
            spec.get("weights"),
            Preprocessing.model_validate(prep) if prep else None,
            factories,
        )
        return layer, conv_weights(model, layer).numpy()
    except (ActmapError, OSError, KeyError) as exc:
        log.warning("the report goes without filter weights: %s", exc)
        return None
