"""Where extraction meets storage: a batch is `decode_batch` (threads) -> `compute_fitting`
(torch, the batch halved on CUDA out-of-memory) -> `store_batch` (Zarr, ledger last),
through a `WriteBehind` thread. The stages are separate so that delivery overlaps them;
`Extraction` hands them to `workers.lifecycle.delivery`, which stays torch-free.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

import numpy as np
import torch
import zarr

from workers.errors import InputError, SampleCode
from workers.extraction.cache import ModelCache
from workers.extraction.gradcam import Kept, grad_cam, keeping, targets
from workers.extraction.hooks import capture
from workers.extraction.inputs import decode
from workers.extraction.models import LoadedModel
from workers.extraction.reduce import MISSING, Reduced, Reduction
from workers.extraction.screen_inputs import batch_extras
from workers.jobs import ExtractionSpec, ModelInfo, gradcam_class, stored_shape
from workers.storage.layout import LABEL, SOURCE, read
from workers.storage.ledger import mark_done
from workers.storage.rows import (
    BatchRows,
    CopyRows,
    LayerRows,
    concat_rows,
    quantise_rows,
    write_rows,
)

__all__ = [
    "Decoded",
    "Extraction",
    "WriteBehind",
    "compute_batch",
    "compute_fitting",
    "decode_batch",
    "spec_of",
    "split_decoded",
    "store_batch",
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
    labels: np.ndarray | None = None  # read only for Grad-CAM on labels


def decode_batch(
    group: zarr.Group,
    spec: ExtractionSpec,
    info: ModelInfo,
    batch: int,
    pool: Executor | None = None,
) -> Decoded:
    """Decode rows [batch*B, (batch+1)*B); a bad sample gets its code, the rest go on."""
    start = batch * spec.batch_size
    paths = list(read(group, SOURCE, slice(start, start + spec.batch_size)))
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
    labels = None
    if spec.gradcam and spec.gradcam_target == "label":
        labels = np.asarray(read(group, LABEL, slice(start, start + spec.batch_size)))
    return Decoded(batch, start, x, codes, messages, labels)


def split_decoded(decoded: Decoded, k: int) -> tuple[Decoded, Decoded]:
    """The first k samples and the rest, as two runs of rows."""
    labels = decoded.labels
    first = Decoded(
        decoded.batch, decoded.start, decoded.x[:k], decoded.codes[:k], decoded.messages[:k],
        None if labels is None else labels[:k],
    )  # fmt: skip
    rest = Decoded(
        decoded.batch, decoded.start + k, decoded.x[k:], decoded.codes[k:],
        decoded.messages[k:], None if labels is None else labels[k:],
    )  # fmt: skip
    return first, rest


def _host(t: torch.Tensor) -> np.ndarray:
    if t.is_cuda:  # pinned buffer, asynchronous copy; the caller synchronises once
        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buf.copy_(t, non_blocking=True)
        t = buf
    return t.numpy()


def _grads(model: LoadedModel, spec: ExtractionSpec) -> AbstractContextManager[Kept | None]:
    """Grad-CAM's hooks and autograd when the job asks for it, else nothing."""
    return keeping(model.module, spec.gradcam) if spec.gradcam else nullcontext()


def compute_batch(model: LoadedModel, spec: ExtractionSpec, decoded: Decoded) -> BatchRows:
    """One forward pass with hooks on every requested layer, reduced on the device; with
    Grad-CAM, one backward of the batch's target logits in the same pass."""
    ok = decoded.codes == 0
    n = len(ok)
    reduce = Reduction.from_spec(spec)
    device = next(iter(model.module.parameters()), torch.empty(0)).device
    layers: dict[str, LayerRows] = {}
    logits = np.full((n, model.info.classes), np.nan, dtype=np.float32)
    pred = np.full(n, -1, dtype=np.int32)
    if not ok.any():
        layers = _empty_layers(model.info, spec, n)
        empty = BatchRows(decoded.start, decoded.codes, decoded.messages, logits, pred, layers)
        return _with_extras(empty, model, spec, None, None, ok)
    good = decoded.x if ok.all() else decoded.x[ok]  # a mask always copies
    x = torch.from_numpy(good).to(device, non_blocking=True)
    with ExitStack() as stack:
        # The backward needs autograd: only a batch without Grad-CAM runs in inference mode.
        kept = stack.enter_context(_grads(model, spec))
        if kept is None:
            stack.enter_context(torch.inference_mode())
        forward = stack.enter_context(capture(model.module, spec.layers))
        out, captured = model.run(forward, x)
        cams = _cams(model, spec, decoded, ok, out, kept)
        reduced = {name: reduce(name, t) for name, t in captured.items()}
        host = {name: _host_rows(r) for name, r in reduced.items()}
        cams_host = {name: (_host(m), _host(t)) for name, (m, t) in cams.items()}
        logits_ok = _host(out.detach().float())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    logits[ok] = logits_ok
    pred[ok] = logits_ok.argmax(axis=1)
    for name, (acts, pooled, top, scale, offset) in host.items():
        cam = cams_host.get(name)
        layers[name] = LayerRows(
            _fill(acts, ok, MISSING if acts.dtype == np.uint8 else np.nan),
            _fill(pooled, ok, np.nan),
            None if top is None else _fill(top, ok, -1),
            gradcam=None if cam is None else _fill(cam[0], ok, np.nan),
            gradcam_target=None if cam is None else _fill(cam[1], ok, -1),
            scale=scale,
            offset=offset,
        )
    rows = BatchRows(decoded.start, decoded.codes, decoded.messages, logits, pred, layers)
    return _with_extras(rows, model, spec, x, out.detach(), ok)


def _with_extras(
    rows: BatchRows,
    model: LoadedModel,
    spec: ExtractionSpec,
    x: torch.Tensor | None,
    logits: torch.Tensor | None,
    ok: np.ndarray,
) -> BatchRows:
    """The batch's squeezing distances and benign copies, when the job asks for them."""
    if not (spec.squeeze or spec.benign):
        return rows
    found = batch_extras(
        model, spec.layers, x, logits, ok, rows.start, squeeze=spec.squeeze, benign=spec.benign
    )
    copies = {name: CopyRows(*copy) for name, copy in found.benign.items()}
    return replace(rows, squeeze=found.squeeze, benign=copies)


def _cams(
    model: LoadedModel,
    spec: ExtractionSpec,
    decoded: Decoded,
    ok: np.ndarray,
    logits: torch.Tensor,
    kept: Kept | None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each Grad-CAM layer's maps (float16) and targets (int32) of the good samples."""
    if kept is None:
        return {}
    labels = None
    if decoded.labels is not None:
        labels = torch.from_numpy(np.asarray(decoded.labels)[ok].astype(np.int64))
    chosen = targets(logits, spec.gradcam_target, gradcam_class(spec, model.info), labels)
    maps = grad_cam(logits, kept, chosen)
    target = chosen.clamp(min=-1).to(torch.int32)
    return {name: (m.to(torch.float16), target) for name, m in maps.items()}


HostRows = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]


def _host_rows(r: Reduced) -> HostRows:
    """A layer's reduced tensors as host arrays (acts, pooled, top, scale, offset)."""
    top, scale, offset = (None if t is None else _host(t) for t in (r.top_index, r.scale, r.offset))
    return _host(r.acts), _host(r.pooled), top, scale, offset


def _fill(rows: np.ndarray, ok: np.ndarray, value: float) -> np.ndarray:
    """Spread the good samples' rows over the batch; failed samples get `value`."""
    if ok.all():
        return rows
    full = np.full((len(ok), *rows.shape[1:]), value, dtype=rows.dtype)
    full[ok] = rows
    return full


def _empty_layers(info: ModelInfo, spec: ExtractionSpec, n: int) -> dict[str, LayerRows]:
    rows = {}
    for name in spec.layers:
        out = info.layer(name).output_shape  # checked against the catalogue at plan time
        shape = stored_shape(out, spec)
        top = np.full((n, shape[0]), -1, np.int32) if spec.top_k else None
        cam = name in spec.gradcam
        cams = {
            "gradcam": np.full((n, *out[1:]), np.nan, dtype=np.float16) if cam else None,
            "gradcam_target": np.full(n, -1, dtype=np.int32) if cam else None,
        }
        pooled = np.full((n, out[0]), np.nan, dtype=np.float32)
        if spec.dtype == "uint8":  # nothing ran: every level missing, no scale or offset
            unknown = np.full(shape[0], np.nan, dtype=np.float32)
            acts = np.full((n, *shape), MISSING, dtype=np.uint8)
            rows[name] = LayerRows(acts, pooled, top, scale=unknown, offset=unknown, **cams)
        else:
            acts = np.full((n, *shape), np.nan, dtype=spec.dtype)
            rows[name] = LayerRows(acts, pooled, top, **cams)
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


def compute_fitting(model: LoadedModel, spec: ExtractionSpec, decoded: Decoded) -> BatchRows:
    """compute_batch, halving the batch on CUDA out-of-memory down to one sample; a sample
    that alone does not fit becomes a sample error. The halves of an 8-bit batch are
    computed as floats and quantised once joined: the batch keeps one scale, and every
    value stays within half a step of it."""
    try:
        return compute_batch(model, spec, decoded)
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if spec.dtype != "uint8":
        return _halved(model, spec, decoded)
    return quantise_rows(_halved(model, spec.model_copy(update={"dtype": "float32"}), decoded))


def _halved(model: LoadedModel, spec: ExtractionSpec, decoded: Decoded) -> BatchRows:
    n = len(decoded.codes)
    if n == 1:  # recorded as a sample error; compute_batch skips the forward for it
        alone = replace(
            decoded,
            codes=np.full(1, SampleCode.COMPUTE, np.int16),
            messages=["out of GPU memory even alone; lower --batch-size or --max-size"],
        )
        return compute_batch(model, spec, alone)
    first, second = split_decoded(decoded, n // 2)
    return concat_rows(compute_fitting(model, spec, first), compute_fitting(model, spec, second))


class WriteBehind:
    """`put` hands a batch to the writer thread, blocking while `depth` wait. Leaving the
    block waits for every write and re-raises the first error the writer met."""

    def __init__(self, write: Callable[[int, BatchRows], None], depth: int = 2) -> None:
        self._write = write
        self._queue: queue.Queue[tuple[int, BatchRows] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="actmap-writer", daemon=True)

    def __enter__(self) -> WriteBehind:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if self._error is None:  # after a failure, drain without writing
                    self._write(*item)
            except BaseException as exc:  # re-raised in the caller's thread
                self._error = exc
            finally:
                self._queue.task_done()

    def put(self, batch: int, rows: BatchRows) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((batch, rows))

    def flush(self) -> None:
        """Wait until every batch put so far is written."""
        self._queue.join()
        if self._error is not None:
            raise self._error

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._queue.put(None)
        try:
            self._thread.join()
        except BaseException:
            # Raised into this thread while it waits (Celery's soft time limit): the caller
            # may give up these batches next, so no write may still be going on behind it.
            self._thread.join()
            raise
        if self._error is not None and error is None:
            raise self._error


@dataclass
class Extraction:
    """The extractor that `workers.lifecycle.delivery.Runtime` is given in a worker: models
    from `models`, loaded once per process; samples decoded and chunks encoded in `pool`'s
    threads. Tests override a stage in a subclass."""

    models: ModelCache
    pool: Executor | None = None

    def decode(self, group: zarr.Group, spec: ExtractionSpec, batch: int) -> Decoded:
        return decode_batch(group, spec, self.models.get(spec).info, batch, self.pool)

    def compute(self, spec: ExtractionSpec, decoded: Decoded) -> BatchRows:
        return compute_fitting(self.models.get(spec), spec, decoded)

    def store(self, group: zarr.Group, batch: int, rows: BatchRows, opened: dict[str, Any]) -> None:
        store_batch(group, batch, rows, opened, self.pool)

    def write_behind(self, write: Callable[[int, BatchRows], None], depth: int) -> WriteBehind:
        return WriteBehind(write, depth)
