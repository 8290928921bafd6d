"""`actmap health`, `compare`, `explain`, `atlas`, `screen fit|run`: the
analysis commands.

Health, comparisons and profiles are analysis jobs on the `analysis` queue, sent like a
scan: with `--api` (or $ACTMAP_API_URL) through the API, else with $ACTMAP_BROKER_URL to
the cluster's workers, else to a worker thread of this process (the embedded default).
The command waits for the result and prints it; the same output and exit codes in all
three. `screen run` (screen_jobs.py) is an extraction job on the `screen` queue, scored with
the profile when it finalizes.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.table import Table

from api.cli import output
from api.cli.backends import ApiBackend
from workers.analysis.requests import Analysis
from workers.errors import ActmapError, UserError
from workers.jobs import AnalysisKind
from workers.settings import Settings

__all__ = ["add_parsers", "run"]


def add_parsers(sub: Any) -> None:
    health = sub.add_parser("health", help="filter health of a job: dead, saturated, sparse")
    health.add_argument("job_id", metavar="JOB")
    health.add_argument("--layers", help="comma-separated (default: every stored layer)")
    compare = sub.add_parser("compare", help="compare two populations channel by channel")
    compare.add_argument("job_a", metavar="JOB_A")
    compare.add_argument("job_b", metavar="JOB_B", nargs="?", help="default: JOB_A again")
    compare.add_argument("--a", dest="select_a", default="", help="e.g. label=3 or correct=true")
    compare.add_argument("--b", dest="select_b", default="", help="e.g. correct=false")
    compare.add_argument("--layers", help="comma-separated (default: every stored layer)")
    compare.add_argument("--paired", action="store_true", help="match samples by id")
    explain = sub.add_parser(
        "explain", help="per sample, the channels that overlap its Grad-CAM map most"
    )
    explain.add_argument("job_id", metavar="JOB")
    explain.add_argument("--layer", required=True, help="a layer scanned with --gradcam")
    explain.add_argument("--top", type=int, default=5, help="channels per sample (default: 5)")
    screen = sub.add_parser("screen", help="adversarial screening: fit a profile, run it")
    action = screen.add_subparsers(dest="screen_action", required=True)
    fit = action.add_parser("fit", help="fit a profile on a clean, labelled reference job")
    fit.add_argument("--reference", required=True, metavar="JOB")
    fit.add_argument("--layers", help="comma-separated (default: every stored layer)")
    fit.add_argument(
        "--fpr", type=float, default=0.05, help="target false-positive rate (default: 0.05)"
    )
    fit.add_argument(
        "--held-out",
        type=float,
        default=0.25,
        metavar="SHARE",
        help="share of each class held out to learn the combination and place the threshold, "
        "the rest fits the detectors; more narrows the realised rate's spread between fits "
        "(default: 0.25, more on a reference too small for --fpr)",
    )
    fit.add_argument("--adversarial", metavar="JOB", help="known attacks, to tune the combination")
    fit.add_argument(
        "--detectors",
        help="comma-separated, of mahalanobis,knn,lid (per layer), msp,energy,margin (logits), "
        "squeeze (default: mahalanobis,knn,lid,margin, and squeeze on a reference scanned "
        "with --squeeze)",
    )
    fit.add_argument(
        "--combine",
        choices=("fisher", "weighted", "max", "mean"),
        default="fisher",
        help="fisher: Fisher's method over the columns' p-values against held-out clean "
        "samples, within layers and outputs, then across; weighted: the maximum of scaled "
        "z-scores; max, mean: of the z-scores (default: fisher)",
    )
    runs = action.add_parser("run", help="a screening job: extract and score INPUTs")
    runs.add_argument("inputs", nargs="+", metavar="INPUT")
    runs.add_argument("--profile", required=True)
    now = action.add_parser(
        "sample",
        help="screen FILEs now, one at a time, without a job: each answered by a warm "
        "`screen` worker (through an API or a broker) or in this process; nothing stored",
    )
    now.add_argument("files", nargs="+", metavar="FILE", help="local files, sent as bytes")
    now.add_argument("--profile", required=True)
    atlas = sub.add_parser("atlas", help="each channel's strongest responses and input crops")
    atlas.add_argument("job_id", metavar="JOB")
    atlas.add_argument("--layer", required=True, help="a stored layer with 2-d maps")
    atlas.add_argument(
        "--top", type=int, default=9, help="responses kept per channel, 1 to 256 (default: 9)"
    )
    for parser in (health, compare, explain, fit, runs, now, atlas):
        parser.add_argument("--store", help="store (default $ACTMAP_STORE)")
        parser.add_argument("--json", action="store_true", help="print one JSON object")
    for parser in (health, compare, explain, fit, runs, now, atlas):
        parser.add_argument("--api", help="through this API (default $ACTMAP_API_URL)")
        parser.add_argument("--token", help="the API's bearer token (default $ACTMAP_TOKEN)")


def _layers(text: str | None) -> list[str] | None:
    return [v.strip() for v in text.split(",") if v.strip()] if text else None


# `--a`/`--b` keys and the API's selection fields they fill.
_FIELDS = {"label": "labels", "pred": "predictions", "correct": "correct", "ids": "samples"}


def _selection(job_id: str, text: str) -> dict[str, Any]:
    """A selection as the API takes it: `label=3;correct=false` gives
    {"job_id": ..., "labels": [3], "correct": false}."""
    found: dict[str, Any] = {"job_id": job_id}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, _, value = part.partition("=")
        try:
            if key in ("label", "pred"):
                found[_FIELDS[key]] = [int(v) for v in value.split(",")]
            elif key == "correct" and value in ("true", "false"):
                found[_FIELDS[key]] = value == "true"
            elif key == "ids" and value:
                found[_FIELDS[key]] = value.split(",")
            else:
                raise ValueError(part)
        except ValueError:
            raise UserError(
                f"cannot read selection {part!r}; use label=3, pred=1,2, correct=false or ids=a,b"
            ) from None
    return found


def _request(args: argparse.Namespace) -> tuple[AnalysisKind, dict[str, Any]]:
    """The analysis kind and its parameters: the body of the API's route for it."""
    if args.command == "explain":
        return AnalysisKind.EXPLAIN, {"job_id": args.job_id, "layer": args.layer, "top": args.top}
    if args.command == "atlas":
        if not 1 <= args.top <= 256:
            raise UserError(f"--top is 1 to 256 responses per channel, got {args.top}")
        return AnalysisKind.ATLAS, {"job_id": args.job_id, "layer": args.layer, "top": args.top}
    layers = _layers(args.layers)
    if args.command == "health":
        return AnalysisKind.HEALTH, {"job_id": args.job_id, "layers": layers}
    if args.command == "compare":
        if (args.job_b in (None, args.job_a)) and args.select_a == args.select_b:
            raise UserError(
                "compare needs two populations: give JOB_B, or selections that differ, "
                "like --a correct=true --b correct=false"
            )
        a = _selection(args.job_a, args.select_a)
        b = _selection(args.job_b or args.job_a, args.select_b)
        return AnalysisKind.COMPARE, {"a": a, "b": b, "layers": layers, "paired": args.paired}
    if not 0.0 < args.held_out < 1.0:
        raise UserError(f"--held-out is a share in (0, 1), got {args.held_out}")
    fit = {"reference_job": args.reference, "layers": layers, "fpr": args.fpr}
    fit["held_out"] = args.held_out
    tuning = {"detectors": _layers(args.detectors), "combine": args.combine}
    return AnalysisKind.SCREENING_PROFILE, {**fit, "adversarial_job": args.adversarial, **tuning}


@contextmanager
def _spinner(show: bool) -> Iterator[Callable[[Analysis], None]]:
    """A line on a terminal saying where the analysis is; yields its progress callback."""
    if not show:
        yield lambda _: None
        return
    with output.err.status("sending the analysis") as status:
        yield lambda found: status.update(f"analysis {found.analysis_id} {found.state}")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Queue the analysis on the `analysis` queue through the backend a scan would use
    (embedded worker, broker, or API), wait for it and print it."""
    from api.cli.backends import backend_for

    if args.command == "screen" and args.screen_action == "run":
        from api.cli.screen_jobs import screen_run

        return screen_run(args, settings, args.store or settings.store)
    if args.command == "screen" and args.screen_action == "sample":
        from api.cli.screen_now import screen_files

        return screen_files(args, settings)
    kind, params = _request(args)
    backend = backend_for(settings, args.store or settings.store, args.api)
    if kind == AnalysisKind.SCREENING_PROFILE and not isinstance(backend, ApiBackend):
        from workers.analysis.profiles import check_reference_job

        check_reference_job(backend.store, args.reference, args.fpr, args.held_out)
    with _spinner(not args.json and output.err.is_terminal) as progress:
        found = backend.analyse(kind, params, progress)
    if found.state != "succeeded":
        reason = found.reason or f"analysis {found.analysis_id} ended {found.state}"
        if found.summary.get("error") == "internal":
            raise ActmapError(f"analysis {found.analysis_id} failed: {reason}")
        raise UserError(reason)
    key = "profile_id" if kind == AnalysisKind.SCREENING_PROFILE else "analysis_id"
    shown = {k: v for k, v in found.summary.items() if k not in ("inputs", "model")}
    summary = {"kind": found.kind, "state": found.state, **shown}
    if args.json:
        output.print_json({key: found.analysis_id, "store": backend.store, **summary})
    else:
        output.out.print(f"{found.kind} {found.analysis_id} in {backend.store}", highlight=False)
        if kind == AnalysisKind.SCREENING_PROFILE:
            _print_weights(found.summary)
        elif kind == AnalysisKind.HEALTH:
            _print_health(found.summary)
        elif kind == AnalysisKind.EXPLAIN:
            _print_explanation(found.summary)
        elif kind == AnalysisKind.ATLAS:
            _print_atlas(found.summary)
        else:
            _print_comparison(found.summary)
    return 0


def _channels(found: list[int], limit: int = 8) -> str:
    shown = ", ".join(map(str, found[:limit]))
    return f"{len(found)}: {shown}{', ...' if len(found) > limit else ''}" if found else "-"


def _print_health(summary: dict[str, Any]) -> None:
    table = Table("layer", "channels", "dead", "always on", "saturated", "sparse",
                  "median sparsity", title="filter health")  # fmt: skip
    for layer, v in summary.get("layers", {}).items():
        table.add_row(
            layer, str(v["channels"]), _channels(v["dead"]), _channels(v["always_on"]),
            _channels(v["saturated"]), _channels(v.get("sparse", [])),
            f"{v['median_sparsity']:.0%}" if "median_sparsity" in v else "-",
        )  # fmt: skip
    output.out.print(table)
    output.out.print(
        "dead: never above zero; always on: above zero at 99% of positions or more; "
        "saturated: at its ceiling half the time; sparse: at or below zero at 90% of "
        "positions or more",
        highlight=False,
    )


def _print_explanation(summary: dict[str, Any]) -> None:
    title = f"layer {summary.get('layer')}: channels on the Grad-CAM evidence"
    table = Table("class", "channels most often in its samples' top-k (times)", title=title)
    for name, found in summary.get("classes", {}).items():
        table.add_row(str(name), ", ".join(f"{c} ({n})" for c, n in found[:8]))
    output.out.print(table)
    output.out.print(
        f"{summary.get('n_explained')} samples explained; top {summary.get('top')} "
        f"{summary.get('measure')}",
        highlight=False,
    )


def _print_atlas(summary: dict[str, Any], limit: int = 32) -> None:
    """Each channel's strongest response: sample, position, value and input crop."""
    for layer, v in summary.get("layers", {}).items():
        field = "x".join(map(str, v.get("receptive_field", [])))
        table = Table("channel", "sample", "y, x", "value", "input crop (top, left, bottom, "
                      "right)", title=f"{layer}: strongest response per channel "
                      f"(field {field}, top {v.get('top')} kept)")  # fmt: skip
        for channel, sample, y, x, value, *box in v.get("best", [])[:limit]:
            table.add_row(str(channel), sample, f"{y}, {x}", f"{value:.4g}", str(tuple(box)))
        output.out.print(table)
        more = v.get("channels", 0) - limit
        if more > 0:
            output.out.print(f"... {more} more channels in the analysis arrays", highlight=False)


def _print_comparison(summary: dict[str, Any]) -> None:
    inputs = summary.get("inputs", {})
    for side in ("a", "b"):
        chosen = inputs.get(side, {})
        picked = {k: v for k, v in chosen.items() if k != "job_id" and v not in (None, [])}
        output.out.print(
            f"{side.upper()}: {inputs.get(f'n_{side}', '?')} samples of job "
            f"{chosen.get('job_id')} {picked or '(all)'}",
            highlight=False,
        )
    table = Table("layer", "channel", "Cohen's d", "AUROC", "q", title="top channels (A vs B)")
    for layer, v in summary.get("layers", {}).items():
        table.add_row(layer, f"{v['n_discriminative']} of {v['channels']} with q <= "
                      f"{inputs.get('alpha', 0.05)}", "", "", "")  # fmt: skip
        figures = zip(v["top"], v.get("top_cohen_d", []), v.get("top_auroc", []),
                      v.get("top_q", []), strict=False)  # fmt: skip
        for channel, d, auroc, q in figures:
            table.add_row("", str(channel), f"{d:+.2f}", f"{auroc:.3f}", f"{q:.2g}")
    output.out.print(table)


def _print_weights(summary: dict[str, Any]) -> None:
    """The threshold, the realised FPR, the layers and the columns that carry the
    combination."""
    weights = summary.get("column_weights") or {}
    inputs = summary.get("inputs", {})
    layers = inputs.get("layers") or summary.get("profile", {}).get("layers") or []
    output.out.print(
        f"layers: {', '.join(map(str, layers)) or '-'}; reference job "
        f"{inputs.get('reference_job', '?')}",
        highlight=False,
    )
    output.out.print(
        f"threshold {summary.get('threshold'):.4g} at fpr {summary.get('fpr')} "
        f"(realised {summary.get('calibration_fpr'):.3f} on "
        f"{summary.get('n_calibration', 'the')} held-out clean samples), "
        f"combine {summary.get('combine')}",
        highlight=False,
    )
    copies = summary.get("benign_copies") or []
    output.out.print(
        f"squeezing distances: {'used' if summary.get('squeeze') else 'none'}; benign "
        f"copies: {', '.join(copies) if copies else 'none (clean held-out samples only)'}",
        highlight=False,
    )
    ranked = sorted(weights.items(), key=lambda item: -abs(item[1]))
    total = sum(abs(w) for _, w in ranked) or 1.0
    shown = ", ".join(f"{name} {abs(w) / total:.0%}" for name, w in ranked[:8] if w)
    output.out.print(f"weight carried by: {shown}", highlight=False)
