"""Plan a job, run one batch, finalize: the three calls a task (or the embedded runner) makes.

`run_batch` = `decode_batch` (threads) -> `compute_batch` (torch) -> `store_batch` (Zarr,
ledger last). The stages are separate so that the runner can overlap them.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr

from workers.errors import InputError
from workers.extraction.cache import ModelCache
from workers.extraction.hooks import capture
from workers.extraction.inputs import decode
from workers.extraction.models import LoadedModel
from workers.extraction.reduce import Reduction
from workers.jobs import ExtractionSpec, ModelInfo
from workers.lifecycle.plan import Plan, layouts, new_job_id, plan
from workers.lifecycle.state import finalize, summary
from workers.storage.layout import open_job, read
from workers.storage.ledger import is_done, mark_done
from workers.storage.rows import BatchRows, LayerRows, write_rows

__all__ = [
    "Decoded",
    "Plan",
    "compute_batch",
    "decode_batch",
    "finalize",
    "new_job_id",
    "plan",
    "run_batch",
    "spec_of",
    "split_decoded",
    "store_batch",
    "summary",
]


def spec_of(group: zarr.Group) -> ExtractionSpec:
    return ExtractionSpec.model_validate(group.attrs["spec"])


@dataclass(frozen=True)
class Decoded:
    """A batch's inputs: the stacked array, and per sample its code and message."""

    batch: int
    start: int
    x: np.ndarray
    codes: np.ndarray
    messages: list[str]


def decode_batch(
    group: zarr.Group,
    spec: ExtractionSpec,
    info: ModelInfo,
    batch: int,
    pool: Executor | None = None,
) -> Decoded:
    """Decode rows [batch*B, (batch+1)*B); a bad sample gets its code, the rest go on."""
    start = batch * spec.batch_size
    paths = list(read(group, "source", slice(start, start + spec.batch_size)))
    prep = info.preprocessing
    kind = spec.input_kind or prep.input_kind
    x = np.zeros((len(paths), *prep.input_shape), dtype=np.float32)
    codes = np.zeros(len(paths), dtype=np.int16)
    messages = [""] * len(paths)

    def one(i: int) -> None:
        try:
            x[i] = decode(str(paths[i]), prep, roots=spec.roots, kind=kind)
        except InputError as exc:
            codes[i], messages[i] = exc.code, str(exc)

    if pool is None:
        for i in range(len(paths)):
            one(i)
    else:
        list(pool.map(one, range(len(paths))))
    return Decoded(batch, start, x, codes, messages)


def split_decoded(decoded: Decoded, k: int) -> tuple[Decoded, Decoded]:
    """The first k samples and the rest, as two runs of rows."""
    first = Decoded(
        decoded.batch, decoded.start, decoded.x[:k], decoded.codes[:k], decoded.messages[:k]
    )
    rest = Decoded(
        decoded.batch, decoded.start + k, decoded.x[k:], decoded.codes[k:], decoded.messages[k:]
    )
    return first, rest


def _host(t: torch.Tensor) -> np.ndarray:
    if t.is_cuda:  # pinned buffer, asynchronous copy; the caller synchronises once
        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buf.copy_(t, non_blocking=True)
        t = buf
    return t.numpy()


def compute_batch(model: LoadedModel, spec: ExtractionSpec, decoded: Decoded) -> BatchRows:
    """One forward pass with hooks on every requested layer, reduced on the device."""
    ok = decoded.codes == 0
    n = len(ok)
    reduce = Reduction.from_spec(spec)
    device = next(iter(model.module.parameters()), torch.empty(0)).device
    layers: dict[str, LayerRows] = {}
    logits = np.full((n, model.info.classes), np.nan, dtype=np.float32)
    pred = np.full(n, -1, dtype=np.int32)
    if ok.any():
        good = decoded.x if ok.all() else decoded.x[ok]  # a mask always copies
        x = torch.from_numpy(good).to(device, non_blocking=True)
        with torch.inference_mode(), capture(model.module, spec.layers) as forward:
            out, captured = model.run(forward, x)
            reduced = {name: reduce(name, t) for name, t in captured.items()}
            host = {
                name: (
                    _host(r.acts),
                    _host(r.pooled),
                    None if r.top_index is None else _host(r.top_index),
                )
                for name, r in reduced.items()
            }
            logits_ok = _host(out.float())
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        logits[ok] = logits_ok
        pred[ok] = logits_ok.argmax(axis=1)
        for name, (acts, pooled, top) in host.items():
            layers[name] = LayerRows(
                _fill(acts, ok, np.nan),
                _fill(pooled, ok, np.nan),
                None if top is None else _fill(top, ok, -1),
            )
    else:
        layers = _empty_layers(model.info, spec, n)
    return BatchRows(decoded.start, decoded.codes, decoded.messages, logits, pred, layers)


def _fill(rows: np.ndarray, ok: np.ndarray, value: float) -> np.ndarray:
    """Spread the good samples' rows over the batch; failed samples get `value`."""
    if ok.all():
        return rows
    full = np.full((len(ok), *rows.shape[1:]), value, dtype=rows.dtype)
    full[ok] = rows
    return full


def _empty_layers(info: ModelInfo, spec: ExtractionSpec, n: int) -> dict[str, LayerRows]:
    rows = {}
    for layout in layouts(spec, info):
        top = np.full((n, layout.shape[0]), -1, np.int32) if spec.top_k else None
        rows[layout.name] = LayerRows(
            np.full((n, *layout.shape), np.nan, dtype=spec.dtype),
            np.full((n, layout.channels), np.nan, dtype=np.float32),
            top,
        )
    return rows


def store_batch(
    group: zarr.Group,
    batch: int,
    rows: BatchRows,
    opened: dict[str, Any] | None = None,
    pool: Executor | None = None,
) -> None:
    """Write the batch's chunks, then mark it done in the ledger: last, so a crash in
    between leaves it pending and a rerun rewrites identical bytes. `opened` caches the
    job's arrays between batches (opening one reads its metadata); `pool` encodes the
    chunks in parallel."""
    write_rows(group, rows, opened, pool)
    mark_done(group, batch, opened)


def run_batch(store: str, job_id: str, batch: int, models: ModelCache) -> bool:
    """Run batch `batch` of the job unless the ledger has it. Returns whether it ran."""
    group = open_job(store, job_id)
    if is_done(group, batch):
        return False
    spec = spec_of(group)
    model = models.get(spec)
    decoded = decode_batch(group, spec, model.info, batch)
    store_batch(group, batch, compute_batch(model, spec, decoded))
    return True
