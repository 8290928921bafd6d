"""A job's screening extras in the store: the feature-squeezing distances (its `squeeze`
option) and the benign copies (its `benign` option), planned with the job like every other
array and read back by screening profiles. Never imports torch.

    jobs/{job_id}/squeeze                  (N, 2) float32 [sample, squeezer]
    jobs/{job_id}/benign/{copy}/logits     (N, K) float32 [sample, class]
    jobs/{job_id}/benign/{copy}/squeeze    (N, 2) float32 [sample, squeezer], with `squeeze`
    jobs/{job_id}/benign/{copy}/layers/{layer}/pooled  (N, C) float32 [sample, channel]

Rows are the job's samples, NaN where a sample failed; {copy} is one of BENIGN_COPIES and
{layer} one of the job's layers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from workers.jobs import BENIGN_COPIES, SQUEEZERS
from workers.storage.layout import LAYERS, LOGITS, POOLED, array, layer_path
from workers.storage.stored_job import subgroup

__all__ = ["BENIGN", "SQUEEZE", "benign_path", "read_rows", "screen_extras", "stored_copies"]

SQUEEZE = "squeeze"
BENIGN = "benign"

Arrays = list[tuple[str, dict[str, Any]]]


def benign_path(copy: str, name: str | None = None, layer: str | None = None) -> str:
    """Copy `copy`'s group, its array `name` (LOGITS, SQUEEZE), or `layer`'s array `name`."""
    base = f"{BENIGN}/{copy}"
    if layer is not None:
        return f"{base}/{layer_path(layer, name)}"
    return base if name is None else f"{base}/{name}"


def screen_extras(squeeze: bool, benign: bool, n_classes: int, channels: dict[str, int]) -> Any:
    """create_job's `more` for a job with these options: `channels` the width of each
    layer's pooled activations."""

    def more(new: Any, n: int, b: int) -> tuple[list[str], Arrays]:
        groups: list[str] = []
        arrays: Arrays = []
        width = len(SQUEEZERS)
        dims = ["sample", "squeezer"]
        if squeeze:
            arrays.append(new(SQUEEZE, (n, width), (b, width), "float32", dims, np.nan))
        for copy in BENIGN_COPIES if benign else ():
            path = benign_path(copy)
            groups += [BENIGN, path, f"{path}/{LAYERS}"]
            logits = (n, n_classes)
            arrays.append(
                new(f"{path}/{LOGITS}", logits, (b, n_classes), "float32",
                    ["sample", "class"], np.nan)
            )  # fmt: skip
            if squeeze:
                arrays.append(new(f"{path}/{SQUEEZE}", (n, width), (b, width), "float32",
                                  dims, np.nan))  # fmt: skip
            for layer, c in channels.items():
                groups.append(benign_path(copy, layer=layer))
                arrays.append(new(benign_path(copy, POOLED, layer), (n, c), (b, c), "float32",
                                  ["sample", "channel"], np.nan))  # fmt: skip
        return list(dict.fromkeys(groups)), arrays

    return more


def stored_copies(job: zarr.Group) -> list[str]:
    """The benign copies the job stores, in BENIGN_COPIES' order; none without `benign`."""
    if BENIGN not in job:
        return []
    held = {name for name, _ in subgroup(job, BENIGN).groups()}
    return [copy for copy in BENIGN_COPIES if copy in held]


def read_rows(job: zarr.Group, path: str, rows: np.ndarray) -> np.ndarray:
    """Rows `rows` of the job's array at `path`, as float64."""
    values = np.asarray(array(job, path)[:], dtype=np.float64)
    found: np.ndarray = values[rows]
    return found
