"""`actmap explain`: which channels overlap each sample's Grad-CAM evidence (overlap.py),
and per class the channels most often among them, over a job stored with `--gradcam`.

Reads the layer's activations and maps a few whole chunks at a time, so memory stays near
`budget` bytes whatever the job's size; the result (per sample, k channels) is saved under
`analyses/{id}` with its arrays at the group's root, so `xr.open_zarr(store,
group="analyses/ID")` opens it with the `sample` coordinate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from workers.analysis.overlap import MEASURE, class_counts, overlap, top_channels
from workers.errors import SpecError
from workers.jobs import AnalysisKind
from workers.storage.analyses import Arrays, save
from workers.storage.layout import (
    ACTS,
    ERROR_CODE,
    GRADCAM,
    GRADCAM_TARGET,
    KEPT_CHANNEL,
    layer_path,
)
from workers.storage.stored_job import StoredJob

__all__ = ["EXPLAIN_BUDGET", "run_explain"]

# Bytes of activations read and compared at once (float32 copies and centred maps).
EXPLAIN_BUDGET = 64 << 20
_MAX_TOP = 64


def _checked(job: StoredJob, layer: str, top: int) -> tuple[Any, Any, np.ndarray]:
    """The layer's acts and maps, and the stored channels' ids; one line when it cannot."""
    job.layers([layer])
    if GRADCAM not in job.group[layer_path(layer)]:  # type: ignore[operator]
        raise SpecError(
            f"job {job.id} has no Grad-CAM maps for layer {layer!r}; scan again with "
            f"--gradcam {layer}"
        )
    acts = job.layer(layer, ACTS)
    names = [str(n) for n in (acts.metadata.dimension_names or ())]  # type: ignore[union-attr]
    if len(names) < 3 or names[1] == "rank":
        raise SpecError(
            f"layer {layer!r} of job {job.id} holds each sample's top-k channels only; "
            "explain needs every channel's map: extract it without --top-k"
        )
    if not 1 <= top <= min(_MAX_TOP, acts.shape[1]):
        raise SpecError(
            f"--top is between 1 and {min(_MAX_TOP, acts.shape[1])} (the layer's stored "
            f"channels), got {top}"
        )
    ids = np.arange(acts.shape[1])
    if names[1] == "kept_channel":
        ids = np.asarray(job.layer(layer, KEPT_CHANNEL)[:])
    return acts, job.layer(layer, GRADCAM), ids


def run_explain(
    store: str,
    job_id: str,
    layer: str,
    top: int = 5,
    *,
    budget: int = EXPLAIN_BUDGET,
    analysis_id: str | None = None,
) -> str:
    """Per sample, the `top` channels whose maps overlap its Grad-CAM map most (overlap.py
    states the measures); per class, how often each channel is among them. Returns the
    analysis id."""
    job = StoredJob.finished(store, job_id)
    acts, cams, ids = _checked(job, layer, top)
    n, channels = acts.shape[:2]
    targets = np.asarray(job.layer(layer, GRADCAM_TARGET)[:], dtype=np.int64)
    explained = (targets >= 0) & (job.column(ERROR_CODE) == 0)
    targets = np.where(explained, targets, -1)
    n_classes = int(job.logits.shape[1])
    picked = np.zeros((n, top), dtype=np.int64)  # channel positions, for explained rows
    correlation = np.full((n, top), np.nan, dtype=np.float32)
    iou = np.full((n, top), np.nan, dtype=np.float32)
    row_bytes = int(np.prod(acts.shape[1:])) * 16
    chunk = int(acts.chunks[0])
    step = chunk * max(1, budget // max(1, row_bytes * chunk))
    for start in range(0, n, step):
        stop = min(n, start + step)
        rows = np.flatnonzero(explained[start:stop])
        if rows.size == 0:
            continue
        block = np.asarray(acts[start:stop])[rows]  # whole chunks, each decoded once
        found = overlap(block, np.asarray(cams[start:stop])[rows])
        best = top_channels(found.correlation, top)
        at = start + rows
        picked[at] = best
        correlation[at] = np.take_along_axis(found.correlation, best, axis=1)
        iou[at] = np.take_along_axis(found.iou, best, axis=1)
    chosen = np.where(explained[:, None], ids[picked], -1).astype(np.int32)
    counts = class_counts(targets, picked, n_classes, channels)
    per_class = np.bincount(targets[explained], minlength=n_classes).astype(np.int32)
    results: Arrays = {
        "sample": (job.samples, ["sample"]),
        "channel": (ids.astype(np.int32), ["channel"]),
        "target": (targets.astype(np.int32), ["sample"]),
        "top_channel": (chosen, ["sample", "rank"]),
        "correlation": (correlation, ["sample", "rank"]),
        "iou": (iou, ["sample", "rank"]),
        "class_count": (counts.astype(np.int32), ["class", "channel"]),
        "class_samples": (per_class, ["class"]),
    }
    headline = {
        "layer": layer,
        "top": top,
        "measure": MEASURE,
        "n_explained": int(explained.sum()),
        "classes": _per_class(counts, ids, job),
    }
    inputs = {"job_id": job_id, "layer": layer, "top": top, "n_samples": n}
    return save(store, AnalysisKind.EXPLAIN, job, inputs, headline, results, analysis_id)


def _per_class(counts: np.ndarray, ids: np.ndarray, job: StoredJob) -> dict[str, Any]:
    """Per explained class (by name where the model names them): the channels most often
    in its samples' top-k, with the count, the most frequent first, up to 10."""
    names = job.attrs.get("catalogue", {}).get("preprocessing", {}).get("classes")
    found: dict[str, Any] = {}
    for c in np.flatnonzero(counts.sum(axis=1)):
        order = np.argsort(-counts[c], kind="stable")[:10]
        order = order[counts[c][order] > 0]
        key = str(names[c]) if names and c < len(names) else str(int(c))
        found[key] = [[int(ids[i]), int(counts[c][i])] for i in order]
    return found
