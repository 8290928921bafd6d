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

from workers.pictures.atlas import atlas_sections
from workers.pictures.render import Scale
from workers.pictures.report import stored_comparisons, write_report
from workers.storage.filters import store_filters

__all__ = ["report"]

log = logging.getLogger("actmap")


def report(
    store: str,
    job_id: str,
    out: Path,
    factories: Collection[str] | None = None,
    scale: Scale = "layer",
) -> Path:
    """Write the report of `job_id` into `out` (index.html, img/) and return the page,
    with every stored comparison and atlas of the job."""
    from workers.execution.filter_weights import first_conv_weights

    found = first_conv_weights(store, job_id, factories)
    weights = None
    if found is not None:
        layer, weights = found
        try:
            store_filters(store, job_id, layer, weights)
        except OSError as exc:  # a read-only store: the page still gets them
            log.warning("could not keep the filter weights in the store: %s", exc)
    sections = [*stored_comparisons(store, job_id), *atlas_sections(store, job_id)]
    return write_report(store, job_id, Path(out), weights, sections=sections, scale=scale)
