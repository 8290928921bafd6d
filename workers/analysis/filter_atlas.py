"""The filter atlas of one stored layer: for each channel, the samples and positions of its
strongest responses, and the input box (and, for binaries, the bytes) each one sees.

Owns `run_atlas`: one pass over `layers/{L}/acts`, a chunk of rows at a time (atlas.py
keeps the running top-n), mapped back to the input through the layer catalogue's receptive
field, and saved under `analyses/{id}` (storage/analyses.py) with dimensions
(channel, rank[, edge|span]).
"""

from __future__ import annotations

import os
import stat
from typing import Any

import numpy as np

from workers.analysis.atlas import EDGES, SPAN, Responses, TopResponses, byte_spans, field_boxes
from workers.errors import SpecError
from workers.jobs import AnalysisKind, kind_of
from workers.storage.analyses import Arrays, save
from workers.storage.layout import KEPT_CHANNEL, SAMPLE, SOURCE, array, layer_path, read
from workers.storage.stored_job import Picked, StoredJob

__all__ = ["DEFAULT_TOP", "MAX_TOP", "run_atlas"]

DEFAULT_TOP = 9
MAX_TOP = 256
# Rank-0 rows kept in the summary (what the CLI prints through the API); the arrays hold all.
_SUMMARY_CHANNELS = 1024


def _field(job: StoredJob, layer: str) -> dict[str, Any]:
    """The catalogue row of `layer`, refused in one line when it gives no field to map."""
    row = next((r for r in job.catalogue if r.get("name") == layer), None)
    if row is None or not row.get("receptive_field"):
        raise SpecError(
            f"layer {layer!r} has no receptive field in the catalogue (its output no longer "
            "follows a conv/pool chain); choose a conv, pool or activation layer before it"
        )
    if not row.get("rf_offset"):
        raise SpecError(
            f"job {job.id} was catalogued before receptive field offsets were recorded; "
            "scan it again to draw its atlas"
        )
    if len(row["receptive_field"]) != 2:
        raise SpecError(f"layer {layer!r} has 1-d maps; the atlas maps 2-d maps to image crops")
    return row


def _file_size(path: str, roots: list[str] | None) -> int:
    """The size of a regular file, -1 when gone, not regular, or (a tenant's job) not
    beneath its roots by real path. Only its size is read, never its bytes."""
    try:
        if roots is not None:
            real = os.path.realpath(path)
            inside = any(
                os.path.commonpath([real, os.path.realpath(r)]) == os.path.realpath(r)
                for r in roots
            )
            if not inside or real != os.path.abspath(path):  # outside, or through a link
                return -1
        info = os.stat(path, follow_symlinks=roots is None)
    except (OSError, ValueError):
        return -1
    return int(info.st_size) if stat.S_ISREG(info.st_mode) else -1


def _spans(job: StoredJob, rows: np.ndarray, boxes: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Byte spans (channel, rank, 4) of the boxes of a binary job's samples; -1 for a
    sample that is not a binary file, or whose file is no longer readable here."""
    out = np.full((*boxes.shape[:-1], len(SPAN)), -1, dtype=np.int64)
    sources = array(job.group, SOURCE)
    roots = job.attrs.get("spec", {}).get("roots")
    for row in np.unique(rows):
        path = str(sources[int(row)])
        size = _file_size(path, roots) if kind_of(path) == "binary" else -1
        if size > 0:
            hit = rows == row
            out[hit] = byte_spans(boxes[hit], hw, size)
    return out


def _binary(job: StoredJob) -> bool:
    spec, catalogue = job.attrs.get("spec", {}), job.attrs.get("catalogue", {})
    prep = spec.get("preprocessing") or catalogue.get("preprocessing") or {}
    return (spec.get("input_kind") or prep.get("input_kind")) == "binary"


def _stream(source: Picked, top: TopResponses, block: int | None) -> None:
    """Every selected row once, whole chunks at a time."""
    step = max(1, block or source.chunk_rows)
    for start in range(0, source.shape[0], step):
        top.add(source[start : start + step])


def _summary(
    ids: np.ndarray, found: Responses, samples: np.ndarray, boxes: np.ndarray
) -> list[list[Any]]:
    """Each channel's strongest response: [channel, sample, y, x, value, top, left,
    bottom, right]."""
    return [
        [int(ids[c]), str(samples[c, 0]), int(found.y[c, 0]), int(found.x[c, 0]),
         float(found.values[c, 0]), *(int(v) for v in boxes[c, 0])]
        for c in range(min(ids.size, _SUMMARY_CHANNELS))
    ]  # fmt: skip


def run_atlas(
    store: str,
    job_id: str,
    layer: str,
    top: int = DEFAULT_TOP,
    *,
    block: int | None = None,
    analysis_id: str | None = None,
) -> str:
    """Each channel's `top` strongest responses at `layer` over the job's samples that
    ran, in one streaming pass of whole chunks (`block` rows at a time when given). A
    layer stored as a channel subset keeps its channel ids; a downsampled one maps each
    stored position to the fields of the positions it averages. Returns the analysis id."""
    if not 1 <= top <= MAX_TOP:
        raise SpecError(f"top is 1 to {MAX_TOP} responses per channel, got {top}")
    job = StoredJob.finished(store, job_id)
    (name,) = job.layers([layer])
    acts = job.acts(name)  # 8-bit maps decoded
    dims = list(getattr(acts.metadata, "dimension_names", None) or ())
    if "rank" in dims:
        raise SpecError(
            f"layer {name!r} of job {job_id} holds each sample's top-k channels only; the "
            "atlas ranks every channel: extract it without top_k"
        )
    if acts.ndim != 4:
        raise SpecError(f"layer {name!r} has no 2-d maps (shape {acts.shape}); choose a conv layer")
    row = _field(job, name)
    rows = job.rows()
    stored, full = tuple(acts.shape[2:]), tuple(row["output_shape"][1:])
    n = min(top, int(rows.size))  # each sample once
    running = TopResponses(int(acts.shape[1]), n, stored)
    _stream(Picked(acts, rows), running, block)
    found = running.result()
    job_rows = rows[found.sample]
    wanted = np.unique(job_rows)
    names = np.array([str(v) for v in np.asarray(array(job.group, SAMPLE).oindex[wanted])])
    samples = names[np.searchsorted(wanted, job_rows)]
    size, jump, offset = row["receptive_field"], row["rf_stride"], row["rf_offset"]
    boxes = field_boxes(found.y, found.x, size, jump, offset, stored, full)  # type: ignore[arg-type]
    ids = (
        read(job.group, layer_path(name, KEPT_CHANNEL)).astype(np.int32)
        if KEPT_CHANNEL in dims
        else np.arange(acts.shape[1], dtype=np.int32)
    )
    prep = job.attrs.get("spec", {}).get("preprocessing") or job.attrs["catalogue"]["preprocessing"]
    input_hw = (int(prep["size"][0]), int(prep["size"][1]))
    results: Arrays = {
        "rank": (np.arange(n, dtype=np.int32), ["rank"]),
        "edge": (np.asarray(EDGES, dtype=object), ["edge"]),
        layer_path(name, "channel"): (ids, ["channel"]),
        layer_path(name, "value"): (found.values.astype(np.float32), ["channel", "rank"]),
        layer_path(name, "sample_id"): (samples.astype(str), ["channel", "rank"]),
        layer_path(name, "row"): (job_rows.astype(np.int64), ["channel", "rank"]),
        layer_path(name, "y"): (found.y.astype(np.int32), ["channel", "rank"]),
        layer_path(name, "x"): (found.x.astype(np.int32), ["channel", "rank"]),
        layer_path(name, "crop"): (boxes, ["channel", "rank", "edge"]),
    }
    binary = _binary(job)
    if binary:
        results["span"] = (np.asarray(SPAN, dtype=object), ["span"])
        spans = _spans(job, job_rows, boxes, input_hw)
        results[layer_path(name, "bytes")] = (spans, ["channel", "rank", "span"])
    summary = {
        "channels": int(ids.size),
        "top": n,
        "stored_shape": list(stored),
        "layer_shape": list(full),
        "input_size": list(input_hw),
        "receptive_field": list(size),
        "rf_stride": list(jump),
        "rf_offset": list(offset),
        "binary": binary,
        "best": _summary(ids, found, samples, boxes),
    }
    inputs = {"job_id": job_id, "layer": name, "top": top, "n_samples": int(rows.size)}
    headline = {"layers": {name: summary}}
    return save(store, AnalysisKind.ATLAS, job, inputs, headline, results, analysis_id)
