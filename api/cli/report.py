"""`actmap report JOB --out DIR`: the job's HTML report (workers/pictures/report.py).

The API side never imports torch, but this command may: when the worker extra is
installed it loads the job's model, only inside `report`, to draw the first conv layer's
filter weights, and keeps them in the store so that the HTTP API can draw them too.
Without torch, or when the model cannot be loaded here, the report goes on without them.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from workers.errors import ActmapError
from workers.jobs import Preprocessing
from workers.pictures.report import Section, comparison_section, write_report
from workers.pictures.report_job import CONV_TYPES
from workers.storage.analyses import analysis_ids, open_analysis
from workers.storage.filters import store_filters
from workers.storage.layout import attrs, layer_path, open_job, read

__all__ = ["first_conv_weights", "report"]

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
    try:  # torch only here, never at import: `api` stays importable without it
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


def comparisons(store: str, job_id: str) -> list[Section]:
    """A section per layer of every stored comparison that has this job on either side."""
    from workers.analysis.compare import Comparison

    sections: list[Section] = []
    for analysis_id in analysis_ids(store):
        group = open_analysis(store, analysis_id)
        meta = attrs(group)
        inputs = meta.get("inputs", {})
        sides = [inputs.get(side, {}).get("job_id") for side in ("a", "b")]
        if meta.get("kind") != "compare" or job_id not in sides:
            continue
        for layer in meta.get("layers", {}):
            names = ("mean_a", "mean_b", "cohen_d", "t", "df", "p", "q", "auroc")
            v = {name: read(group, layer_path(layer, name)) for name in names}
            found = Comparison(int(inputs["n_a"]), int(inputs["n_b"]), **v)
            title = f"Comparison {analysis_id}: A {sides[0]} against B {sides[1]}"
            sections.append(comparison_section(found, layer, title))
    return sections


def report(store: str, job_id: str, out: Path, factories: Collection[str] | None = None) -> Path:
    """Write the report of `job_id` into `out` (index.html, img/) and return the page,
    with every stored comparison of the job."""
    found = first_conv_weights(store, job_id, factories)
    weights = None
    if found is not None:
        layer, weights = found
        try:
            store_filters(store, job_id, layer, weights)
        except OSError as exc:  # a read-only store: the page still gets them
            log.warning("could not keep the filter weights in the store: %s", exc)
    return write_report(store, job_id, Path(out), weights, sections=comparisons(store, job_id))
