"""`actmap health`, `actmap compare`, `actmap screen fit|run`: the analysis commands.

Analyses are numpy over the stored arrays, so they run in this process against the store
(embedded, or the shared store of a cluster); `screen run` is an extraction job on the
`screen` queue, scored with the profile when it finalizes.
"""

from __future__ import annotations

import argparse
from typing import Any

from api import output
from workers.errors import UserError
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
    screen = sub.add_parser("screen", help="adversarial screening: fit a profile, run it")
    action = screen.add_subparsers(dest="screen_action", required=True)
    fit = action.add_parser("fit", help="fit a profile on a clean, labelled reference job")
    fit.add_argument("--reference", required=True, metavar="JOB")
    fit.add_argument("--layers", help="comma-separated (default: every stored layer)")
    fit.add_argument("--fpr", type=float, default=0.05, help="target false-positive rate")
    fit.add_argument("--adversarial", metavar="JOB", help="known attacks, to tune the combination")
    runs = action.add_parser("run", help="a screening job: extract and score INPUTs")
    runs.add_argument("inputs", nargs="+", metavar="INPUT")
    runs.add_argument("--profile", required=True)
    for parser in (health, compare, fit, runs):
        parser.add_argument("--store", help="store (default $ACTMAP_STORE)")
        parser.add_argument("--json", action="store_true", help="print one JSON object")


def _layers(text: str | None) -> list[str] | None:
    return [v.strip() for v in text.split(",") if v.strip()] if text else None


def _selection(job_id: str, text: str) -> Any:
    from workers.analysis.results import Selection

    fields: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, _, value = part.partition("=")
        if key in ("label", "pred"):
            fields[key] = tuple(int(v) for v in value.split(","))
        elif key == "correct" and value in ("true", "false"):
            fields[key] = value == "true"
        elif key == "ids":
            fields[key] = tuple(value.split(","))
        else:
            raise UserError(
                f"cannot read selection {part!r}; use label=3, pred=1,2, correct=false or ids=a,b"
            )
    return Selection(job_id, **fields)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from workers.analysis import analyses, profiles, results

    store = args.store or settings.store
    if args.command == "health":
        found: dict[str, Any] = {
            "analysis_id": analyses.run_health(store, args.job_id, _layers(args.layers))
        }
    elif args.command == "compare":
        a = _selection(args.job_a, args.select_a)
        b = _selection(args.job_b or args.job_a, args.select_b)
        found = {
            "analysis_id": analyses.run_compare(store, a, b, _layers(args.layers), args.paired)
        }
    elif args.screen_action == "fit":
        profile = profiles.fit_profile(
            store, args.reference, _layers(args.layers), args.fpr, args.adversarial
        )
        found = {"profile_id": profile}
    else:
        return _screen_run(args, settings, store)
    analysis = results.open_analysis(store, next(iter(found.values())))
    summary = {k: v for k, v in dict(analysis.attrs).items() if k not in ("inputs", "model")}
    if args.json:
        output.print_json({**found, "store": store, **summary})
    else:
        output.out.print(
            f"{summary.get('kind', 'analysis')} {next(iter(found.values()))} in {store}"
        )
        output.out.print_json(data=summary)
    return 0


def _screen_run(args: argparse.Namespace, settings: Settings, store: str) -> int:
    from api.backends import backend_for
    from workers.analysis.profiles import load_profile
    from workers.analysis.results import open_analysis
    from workers.jobs import ExtractionSpec
    from workers.storage.layout import attrs, open_job, read

    profile = load_profile(store, args.profile)
    reference = attrs(open_analysis(store, args.profile))["inputs"]["reference_job"]
    spec = attrs(open_job(store, reference, mode="r"))["spec"]
    screening = ExtractionSpec.model_validate(
        {**spec, "inputs": tuple(args.inputs), "layers": tuple(profile.channels),
         "labels_csv": None, "labels_from_dirs": False, "profile_id": args.profile,
         "queue": "screen", "channels": None, "top_k": None, "max_size": None}
    )  # fmt: skip
    backend = backend_for(settings, store)
    with output.progress(not args.json and output.err.is_terminal) as (on_plan, on_status):
        result = backend.scan(screening, True, on_plan, on_status)
    group = open_job(store, result.job_id, mode="r")
    flags = read(group, "screen/flag") if result.state in ("succeeded", "partial") else None
    n_flagged = int(flags.sum()) if flags is not None else None
    found = {"job_id": result.job_id, "store": store, "state": result.state,
             "n_samples": result.n_samples, "n_flagged": n_flagged}  # fmt: skip
    if args.json:
        output.print_json(found)
    else:
        output.out.print(output.status_line(result), highlight=False)
        if flags is not None:
            scores, ids = read(group, "screen/score"), read(group, "sample")
            for i in flags.nonzero()[0][:20]:
                output.out.print(
                    f"  [red]flagged[/] {ids[i]}: score {scores[i]:.2f}", highlight=False
                )
    return 0 if result.state in ("succeeded", "partial") else 1
