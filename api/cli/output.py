"""What the CLI prints: tables, the scan summary, progress bars. One-line errors go to
stderr; `--json` prints one JSON object on the last line of stdout."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
from rich.table import Table

from workers.extraction.inputs import skipped_line
from workers.jobs import InputKind, ModelInfo
from workers.lifecycle.state import Status
from workers.storage.summary import JobSummary

__all__ = [
    "catalogue",
    "err",
    "job_table",
    "out",
    "print_json",
    "progress",
    "results_in",
    "scan_report",
]

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


def scan_report(summary: JobSummary, s: Status) -> None:
    """What the job holds: the same lines wherever it ran and whoever reads the store."""
    out.print(status_line(s), highlight=False)
    if summary.labelled:
        correct, total = summary.correct, summary.labelled
        out.print(f"accuracy on labelled samples: {correct}/{total} ({correct / total:.1%})")
    for layer in summary.layers:
        acts, pooled = tuple(layer.acts), tuple(layer.pooled)
        out.print(f"  {layer.name}: acts {acts} {layer.dtype}, pooled {pooled}")
    if summary.skipped:
        kind = cast(InputKind, summary.input_kind)
        out.print(skipped_line(kind, summary.skipped), highlight=False)
    for failure in summary.failures:
        out.print(f"  [yellow]failed[/] {failure.sample}: {failure.message}", highlight=False)


def results_in(store: str, job_id: str) -> None:
    """Where a store this host reaches keeps the job, and how to open it."""
    where = str(Path(store).absolute()) if "://" not in store else store
    out.print(f"results in {where} (group jobs/{job_id}); open with", highlight=False)
    out.print(
        f"  xarray.open_datatree({where + '/jobs/' + job_id!r}, engine='zarr')",
        highlight=False,
    )
