"""`actmap`: the command line. Importing this module never loads torch; the embedded path
imports the worker side only when it runs."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zarr
from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
from rich.table import Table

from workers.errors import ActmapError, UserError
from workers.jobs import ExtractionSpec, ModelInfo, Preprocessing
from workers.settings import Settings
from workers.storage.layout import array, read

__all__ = ["main"]

err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


def _pair(text: str) -> tuple[int, int]:
    try:
        h, _, w = text.lower().partition("x")
        return int(h), int(w or h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, like 28x28, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help=".pt2 file, package.module:factory, or a registered name"
    )
    p.add_argument("--weights", help="safetensors or state dict, for a factory")
    p.add_argument(
        "--input-size", type=_pair, metavar="HxW", help="override the model's input size"
    )
    p.add_argument("--input-channels", type=int, choices=(1, 3), help="override: 1 or 3")
    p.add_argument("--mean", type=_floats, help="override: per-channel mean, comma-separated")
    p.add_argument("--std", type=_floats, help="override: per-channel std, comma-separated")
    p.add_argument("--scale", type=float, help="override: pixel scale (default 1/255)")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="actmap", description="What convolutional filters detect.")
    sub = root.add_subparsers(dest="command", required=True)
    scan = sub.add_parser("scan", help="extract activations of INPUTs into the store")
    scan.add_argument("inputs", nargs="+", metavar="INPUT", help="file, directory or @list.txt")
    _model_args(scan)
    scan.add_argument("--layers", required=True, help="comma-separated dotted layer names")
    scan.add_argument("--out", help="store: a directory or fsspec URL (default $ACTMAP_STORE)")
    scan.add_argument("--batch-size", type=int, default=32)
    scan.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    scan.add_argument("--channels", type=_ints, help="keep only these channel indices")
    scan.add_argument("--top-k", type=int, help="keep each sample's k strongest channels")
    scan.add_argument(
        "--max-size", type=_pair, metavar="HxW", help="downsample maps to at most HxW"
    )
    scan.add_argument("--labels", help="CSV of sample_id,label")
    scan.add_argument("--labels-from-dirs", action="store_true", help="label = parent directory")
    scan.add_argument("--no-wait", action="store_true", help="return once queued (broker or API)")
    scan.add_argument("--api", help="submit through this API (default $ACTMAP_API_URL)")
    layers = sub.add_parser("layers", help="the model's layer catalogue")
    _model_args(layers)
    return root


def _preprocessing(args: argparse.Namespace, settings: Settings) -> Preprocessing | None:
    given = {
        "size": args.input_size,
        "channels": args.input_channels,
        "mean": args.mean,
        "std": args.std,
        "scale": args.scale,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return None
    from workers import embedded  # the model's own declaration is the base

    base = embedded.catalogue(args.model, args.weights, None, settings).preprocessing
    return Preprocessing.model_validate({**base.model_dump(), **given})


def _layers(args: argparse.Namespace, settings: Settings) -> int:
    from workers import embedded

    info = embedded.catalogue(args.model, args.weights, _preprocessing(args, settings), settings)
    if args.json:
        out.print_json(info.model_dump_json())
        return 0
    _catalogue_table(info)
    return 0


def _catalogue_table(info: ModelInfo) -> None:
    prep = info.preprocessing
    out.print(
        f"[bold]{info.name}[/] ({info.format}, sha256 {info.sha256[:12]}), input "
        f"{'x'.join(map(str, prep.input_shape))}, {info.classes} outputs"
    )
    table = Table("layer", "type", "output", "params", "receptive field", "stride")
    for row in info.layers:
        rf = "x".join(map(str, row.receptive_field)) if row.receptive_field else "-"
        stride = "x".join(map(str, row.rf_stride)) if row.rf_stride else "-"
        table.add_row(
            row.name, row.type, "x".join(map(str, row.output_shape)), f"{row.params:,}", rf, stride
        )
    out.print(table)


def _scan(args: argparse.Namespace, settings: Settings) -> int:
    if args.api or settings.api_url:
        raise UserError("submitting through an API arrives with the API issue; run without --api")
    if settings.broker_url is not None:
        raise UserError(
            "submitting to a broker arrives with the distributed issue; unset ACTMAP_BROKER_URL"
        )
    if args.no_wait:
        raise UserError(
            "--no-wait needs a broker or an API; the embedded run finishes in this process"
        )
    try:
        spec = ExtractionSpec(
            model=args.model,
            weights=args.weights,
            layers=tuple(v.strip() for v in args.layers.split(",") if v.strip()),
            inputs=tuple(args.inputs),
            batch_size=args.batch_size,
            dtype=args.dtype,
            channels=args.channels,
            top_k=args.top_k,
            max_size=args.max_size,
            preprocessing=_preprocessing(args, settings),
            labels_csv=args.labels,
            labels_from_dirs=args.labels_from_dirs,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or "spec"
        raise UserError(f"invalid {where}: {first['msg']}") from None
    store = args.out or settings.store
    from workers import embedded

    show = not args.json and err.is_terminal
    bar = Progress(
        "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
        TimeRemainingColumn(), console=err, disable=not show,
    )  # fmt: skip
    with bar:
        task = bar.add_task("scanning", total=None)

        def planned(job: Any) -> None:
            bar.update(task, total=job.n_samples, description=f"job {job.job_id}")

        result = embedded.scan(spec, store, settings, planned, lambda n: bar.advance(task, n))
    if args.json:
        print(json.dumps(result))
    else:
        _report(result)
    return 0 if result["state"] in ("succeeded", "partial") else 1


def _report(result: dict[str, Any]) -> None:
    """Where the results are, and what they hold."""
    store, job_id = result["store"], result["job_id"]
    group = zarr.open_group(store, path=f"jobs/{job_id}", mode="r", use_consolidated=False)
    out.print(
        f"job [bold]{job_id}[/] {result['state']}: {result['n_samples']} samples, "
        f"{result['n_failed']} failed"
    )
    labels, preds = read(group, "label"), read(group, "pred")
    known = (labels >= 0) & (preds >= 0)
    if known.any():
        correct, total = int((labels[known] == preds[known]).sum()), int(known.sum())
        out.print(f"accuracy on labelled samples: {correct}/{total} ({correct / total:.1%})")
    layers = group["layers"]
    for name, layer in sorted(layers.groups()) if isinstance(layers, zarr.Group) else []:
        acts, pooled = array(layer, "acts"), array(layer, "pooled")
        out.print(f"  {name}: acts {acts.shape} {acts.dtype}, pooled {pooled.shape}")
    codes, messages = read(group, "error_code"), read(group, "error_message")
    samples = read(group, "sample")
    for i in codes.nonzero()[0][:5]:
        out.print(f"  [yellow]failed[/] {samples[i]}: {messages[i]}", highlight=False)
    where = str(Path(store).absolute()) if "://" not in store else store
    out.print(f"results in {where} (group jobs/{job_id}); open with")
    out.print(f"  xarray.open_datatree({where!r}, group='jobs/{job_id}', engine='zarr')")


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False)],
    )
    settings = Settings()
    try:
        if args.command == "layers":
            return _layers(args, settings)
        return _scan(args, settings)
    except UserError as exc:
        err.print(f"actmap: error: {exc}", markup=False, highlight=False)
        return 2
    except ActmapError as exc:
        err.print(f"actmap: {exc}", markup=False, highlight=False)
        return 1
    except KeyboardInterrupt:
        err.print("actmap: interrupted; the batches already stored are kept", highlight=False)
        return 130


if __name__ == "__main__":
    sys.exit(main())
