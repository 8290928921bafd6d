"""What the CLI prints: tables, the scan summary, progress bars. One-line errors go to
stderr; `--json` prints one JSON object on the last line of stdout."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
from rich.table import Table

from workers.errors import SampleCode
from workers.extraction.inputs import skipped_line
from workers.jobs import InputKind, ModelInfo
from workers.lifecycle.state import Status
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
    open_job,
    read,
)
from workers.storage.quantised import SCALE

__all__ = ["catalogue", "err", "job_table", "out", "print_json", "progress", "scan_report"]

# soft_wrap: a long path or message stays on one line, whatever the terminal width.
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


def print_json(obj: Any) -> None:
    print(json.dumps(obj))


def _dims(values: tuple[int, ...] | None) -> str:
    return "x".join(map(str, values)) if values else "-"


def catalogue(info: ModelInfo) -> None:
    prep = info.preprocessing
    out.print(
        f"[bold]{info.name}[/] ({info.format}, sha256 {info.sha256[:12]}), input "
        f"{_dims(prep.input_shape)}, {info.classes} outputs"
    )
    table = Table("layer", "type", "output", "params", "receptive field", "stride", "calls")
    for row in info.layers:
        table.add_row(
            row.name, row.type, _dims(row.output_shape), f"{row.params:,}",
            _dims(row.receptive_field), _dims(row.rf_stride), str(row.calls),
        )  # fmt: skip
    out.print(table)
    if any(row.calls > 1 for row in info.layers):
        out.print("layers with calls > 1 run more than once per forward and cannot be scanned")


def job_table(jobs: list[Status]) -> None:
    table = Table("job", "state", "samples", "done", "failed", "samples/s", "created")
    table.columns[0].no_wrap, table.columns[0].min_width = (
        True,
        max(map(len, (s.job_id for s in jobs)), default=3),
    )  # an id cut to fit is no id
    for s in jobs:
        rate = f"{s.samples_per_s:.1f}" if s.samples_per_s else "-"
        table.add_row(
            s.job_id, s.state, str(s.n_samples), str(s.samples_done), str(s.n_failed), rate,
            s.created,
        )  # fmt: skip
    out.print(table)


def status_line(s: Status) -> str:
    rate = f", {s.samples_per_s:.1f} samples/s" if s.samples_per_s else ""
    eta = f", about {s.eta_s:.0f} s left" if s.eta_s else ""
    reason = f" ({s.reason})" if s.reason else ""
    return (
        f"job {s.job_id} {s.state}{reason}: {s.samples_done}/{s.n_samples} samples in "
        f"{s.batches_done}/{s.n_batches} batches, {s.n_failed} failed{rate}{eta}"
    )


@contextmanager
def progress(show: bool) -> Iterator[Any]:
    """A bar on a terminal; yields (on_plan, on_status) callbacks."""
    bar = Progress(
        "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
        TimeRemainingColumn(), console=err, disable=not show,
    )  # fmt: skip
    with bar:
        task = bar.add_task("scanning", total=None)

        def on_plan(job: Any) -> None:
            bar.update(task, total=job.n_samples, description=f"job {job.job_id}")

        def on_status(s: Status) -> None:
            bar.update(
                task, total=s.n_samples, completed=s.samples_done, description=f"job {s.job_id}"
            )

        yield on_plan, on_status


def _input_kind(group: zarr.Group) -> InputKind:
    """The kind of input the job read: its override, else the model's declaration."""
    found = attrs(group)
    kind: InputKind = found["spec"].get("input_kind") or found["catalogue"]["preprocessing"].get(
        "input_kind", "binary"
    )
    return kind


def scan_report(store: str, s: Status) -> None:
    """Where the results are, and what they hold."""
    group = open_job(store, s.job_id, mode="r")
    out.print(status_line(s), highlight=False)
    labels, preds = read(group, LABEL), read(group, PRED)
    known = (labels >= 0) & (preds >= 0)
    if known.any():
        correct, total = int((labels[known] == preds[known]).sum()), int(known.sum())
        out.print(f"accuracy on labelled samples: {correct}/{total} ({correct / total:.1%})")
    layers = group[LAYERS]
    for name, layer in sorted(layers.groups()) if isinstance(layers, zarr.Group) else []:
        acts, pooled = array(layer, ACTS), array(layer, POOLED)
        kind = f"{acts.dtype} (8-bit, scale and offset per batch)" if SCALE in layer else acts.dtype
        out.print(f"  {name}: acts {acts.shape} {kind}, pooled {pooled.shape}")
    codes, messages = read(group, ERROR_CODE), read(group, ERROR_MESSAGE)
    samples = read(group, SAMPLE)
    stray = int(np.count_nonzero(codes == SampleCode.WRONG_KIND))
    if stray:
        out.print(skipped_line(_input_kind(group), stray), highlight=False)
    for i in np.flatnonzero((codes != 0) & (codes != SampleCode.WRONG_KIND))[:5]:
        out.print(f"  [yellow]failed[/] {samples[i]}: {messages[i]}", highlight=False)
    where = str(Path(store).absolute()) if "://" not in store else store
    out.print(f"results in {where} (group jobs/{s.job_id}); open with", highlight=False)
    out.print(
        f"  xarray.open_datatree({where + '/jobs/' + s.job_id!r}, engine='zarr')",
        highlight=False,
    )
