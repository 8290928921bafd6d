"""A finished job in brief: what a scan prints at its end (accuracy on the labelled samples,
each layer's stored shapes, the files skipped and the first failures). Read from the store
in one place, so that a scan prints the same summary embedded, on a broker and through the
API, whether or not the client reaches the store."""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr
from pydantic import BaseModel, ConfigDict

from workers.errors import SampleCode
from workers.storage.layout import (
    ACTS,
    ERROR_CODE,
    ERROR_MESSAGE,
    LABEL,
    LAYERS,
    POOLED,
    PRED,
    SAMPLE,
    array,
    attrs,
    read,
)
from workers.storage.quantised import SCALE

__all__ = ["Failure", "JobSummary", "LayerShapes", "job_summary"]

FAILURES_SHOWN = 5


class LayerShapes(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    acts: list[int]
    dtype: str
    pooled: list[int]


class Failure(BaseModel):
    model_config = ConfigDict(frozen=True)

    sample: str
    message: str


class JobSummary(BaseModel):
    """`correct` of `labelled` samples predicted right (samples with a label and a
    prediction); `skipped` files were not of `input_kind`; `failures` lists the first few
    other failed samples."""

    model_config = ConfigDict(frozen=True)

    correct: int
    labelled: int
    layers: list[LayerShapes]
    input_kind: str
    skipped: int
    failures: list[Failure]


def _input_kind(found: dict[str, Any]) -> str:
    """The kind of input the job read: its override, else the model's declaration."""
    kind = found["spec"].get("input_kind") or found["catalogue"]["preprocessing"].get(
        "input_kind", "binary"
    )
    return str(kind)


def _stored(layer: zarr.Group) -> str:
    """How a layer's maps are stored: their dtype, saying so for 8-bit ones."""
    dtype = str(array(layer, ACTS).dtype)
    return f"{dtype} (8-bit, scale and offset per batch)" if SCALE in layer else dtype


def job_summary(group: zarr.Group) -> JobSummary:
    labels, preds = read(group, LABEL), read(group, PRED)
    known = (labels >= 0) & (preds >= 0)
    layers = group[LAYERS]
    shapes = [
        LayerShapes(
            name=name,
            acts=list(array(layer, ACTS).shape),
            dtype=_stored(layer),
            pooled=list(array(layer, POOLED).shape),
        )  # fmt: skip
        for name, layer in (sorted(layers.groups()) if isinstance(layers, zarr.Group) else [])
    ]
    codes, messages = read(group, ERROR_CODE), read(group, ERROR_MESSAGE)
    samples = read(group, SAMPLE)
    failed = np.flatnonzero((codes != 0) & (codes != SampleCode.WRONG_KIND))[:FAILURES_SHOWN]
    return JobSummary(
        correct=int((labels[known] == preds[known]).sum()),
        labelled=int(known.sum()),
        layers=shapes,
        input_kind=_input_kind(attrs(group)),
        skipped=int(np.count_nonzero(codes == SampleCode.WRONG_KIND)),
        failures=[Failure(sample=str(samples[i]), message=str(messages[i])) for i in failed],
    )
