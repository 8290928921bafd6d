"""`actmap`: the command line. Importing this module never loads torch; the embedded path
imports the worker side only when it runs."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import SecretStr, ValidationError
from rich.logging import RichHandler

from api.cli import analyses as analysis_cli
from api.cli import models as models_cli
from api.cli import output
from api.cli.backends import ApiBackend, Backend, backend_for
from workers.errors import ActmapError, UserError
from workers.jobs import VERSION, ExtractionSpec, JobState, Preprocessing
from workers.lifecycle.state import Status, can_progress
from workers.settings import Settings
from workers.storage.layout import open_job
from workers.storage.summary import JobSummary, job_summary

__all__ = ["main"]


def _pair(text: str) -> tuple[int, int]:
    try:
        h, _, w = text.lower().partition("x")
        return int(h), int(w or h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, like 28x28, got {text!r}") from None


T = TypeVar("T")


def _parsed(text: str, kind: Callable[[str], T], what: str) -> tuple[T, ...]:
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    return _parsed(text, int, "integers")


def _floats(text: str) -> tuple[float, ...]:
    return _parsed(text, float, "numbers")


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


class _Parser(argparse.ArgumentParser):
    """No abbreviated options (`--layer` is not `--layers`), and an unknown option is
    refused by the command that got it, naming the close one it has."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._subparsers is None:  # a leaf command: every option left is for it
            given = sys.argv[1:] if args is None else list(args)
            unknown = [a for a in given if a.startswith("--") and self._unknown(a)]
            if unknown:  # before "required" errors, which would hide the typo
                self.error(f"unrecognized arguments: {' '.join(map(self._close, unknown))}")
        return super().parse_known_args(args, namespace)

    def _unknown(self, arg: str) -> bool:
        return arg != "--" and arg.split("=")[0] not in self._option_string_actions

    def _close(self, arg: str) -> str:
        close = difflib.get_close_matches(arg.split("=")[0], list(self._option_string_actions), 1)
        return f"{arg} (did you mean {close[0]}?)" if close else arg


def _settings_help() -> str:
    """The ACTMAP_* settings the server reads, with their defaults."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        rows.append(f"  ACTMAP_{name.upper():<26} default: {default}")
    return "settings, from the environment (deploy/README.md says what each does):\n" + "\n".join(
        rows
    )


def _jobs_parsers(sub: Any) -> None:
    jobs = sub.add_parser("jobs", help="list, inspect, wait for, cancel or resume jobs")
    action = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = action.add_parser("list", help="jobs, newest first")
    listing.add_argument("--state", choices=[s.value for s in JobState], help="only these")
    listing.add_argument("--limit", type=int, help="this many, newest first (a page)")
    listing.add_argument("--cursor", help="the page after this one (printed with a page)")
    helps = {
        "status": "state, progress, rate and time left",
        "wait": "wait for the job to finish, with its progress",
        "cancel": "stop the job after the batch running",
        "resume": "run the batches the job lacks",
    }
    parsers = [listing]
    for name, text in helps.items():
        one = action.add_parser(name, help=text)
        one.add_argument("job_id", metavar="JOB")
        parsers.append(one)
    parsers[-1].add_argument("--no-wait", action="store_true", help="return once queued")
    for one in parsers:
        one.add_argument("--store", help="store (default $ACTMAP_STORE)")
        one.add_argument("--api", help="through this API (default $ACTMAP_API_URL)")
        one.add_argument("--token", help="the API's bearer token (default $ACTMAP_TOKEN)")
        one.add_argument("--json", action="store_true", help="print one JSON object at the end")


def parser() -> argparse.ArgumentParser:
    root = _Parser(prog="actmap", description="What convolutional filters detect.")
    root.add_argument("--version", action="version", version=f"actmap {VERSION}")
    sub = root.add_subparsers(dest="command", required=True)
    scan = sub.add_parser("scan", help="extract activations of INPUTs into the store")
    scan.add_argument("inputs", nargs="+", metavar="INPUT", help="file, directory or @list.txt")
    _model_args(scan)
    scan.add_argument("--layers", required=True, help="comma-separated dotted layer names")
    scan.add_argument("--out", help="store: a directory or fsspec URL (default $ACTMAP_STORE)")
    scan.add_argument("--batch-size", type=int, default=32)
    scan.add_argument(
        "--dtype", choices=("float16", "float32", "uint8"), default="float16",
        help="how maps are stored; uint8: per-channel scale and offset per batch, decoded "
        "when read (README: reading them with xarray)",
    )  # fmt: skip
    scan.add_argument(
        "--compression", choices=("zstd", "lz4", "none"),
        help="the codec of the job's arrays; default by the host running the forward: "
        "zstd on a GPU host (embedded with ACTMAP_DEVICE=cuda, and through a broker or "
        "the API, whose workers are GPU hosts), lz4 on a CPU-only host, whose forward "
        "uses every core and would wait on zstd",
    )  # fmt: skip
    scan.add_argument("--channels", type=_ints, help="keep only these channel indices")
    scan.add_argument("--top-k", type=int, help="keep each sample's k strongest channels")
    scan.add_argument(
        "--max-size", type=_pair, metavar="HxW", help="downsample maps to at most HxW"
    )
    scan.add_argument(
        "--gradcam", metavar="LAYER[,LAYER]",
        help="also store each sample's Grad-CAM map at these layers (among --layers)",
    )  # fmt: skip
    scan.add_argument(
        "--target", default="pred", metavar="pred|label|CLASS",
        help="the class Grad-CAM explains: the prediction, the label, or one class",
    )  # fmt: skip
    scan.add_argument(
        "--squeeze", action="store_true",
        help="also store each sample's feature-squeezing distances (Xu et al. 2018), which "
        "a screening profile scores: two extra forwards per batch",
    )  # fmt: skip
    scan.add_argument(
        "--benign", action="store_true",
        help="also store benign copies (noise, blur, JPEG-like) of each sample, pooled "
        "activations and logits: a screening profile's reference learns from them",
    )  # fmt: skip
    scan.add_argument("--labels", help="CSV of sample_id,label")
    scan.add_argument(
        "--labels-from-dirs", action="store_true",
        help="label = parent folder: a class name the model declares, or a class index",
    )  # fmt: skip
    scan.add_argument(
        "--input-kind", choices=("image", "array", "binary"),
        help="what the model reads, overriding its declaration; other files are skipped",
    )  # fmt: skip
    scan.add_argument("--no-wait", action="store_true", help="return once queued (broker or API)")
    scan.add_argument("--api", help="submit through this API (default $ACTMAP_API_URL)")
    scan.add_argument("--upload", action="store_true", help="with --api: upload local INPUTs")
    scan.add_argument("--token", help="the API's bearer token (default $ACTMAP_TOKEN)")
    scan.add_argument("--report", metavar="DIR", help="at the end, write the job's HTML report")
    layers = sub.add_parser("layers", help="the model's layer catalogue")
    _model_args(layers)
    keep = sub.add_parser("store", help="reindex: upgrade a store and rebuild its job index")
    keep.add_argument("action", choices=("reindex",))
    keep.add_argument("--store", help="store (default $ACTMAP_STORE)")
    keep.add_argument("--json", action="store_true", help="print one JSON object at the end")
    _jobs_parsers(sub)
    analysis_cli.add_parsers(sub)
    models_cli.add_parsers(sub)
    report = sub.add_parser("report", help="write a job's HTML report: DIR/index.html, DIR/img/")
    report.add_argument("job_id", metavar="JOB")
    report.add_argument("--out", required=True, metavar="DIR", help="folder for the report")
    report.add_argument("--store", help="store (default $ACTMAP_STORE)")
    report.add_argument(
        "--scale",
        choices=("layer", "tile"),
        default="layer",
        help="activation tiles on one range per layer (default), or each on its own",
    )
    report.add_argument("--json", action="store_true", help="print one JSON object at the end")
    serve = sub.add_parser(
        "serve",
        help="the HTTP API",
        epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    worker = sub.add_parser("worker", help="run Celery workers against $ACTMAP_BROKER_URL")
    worker.add_argument("--gpus", help="'all' or indices like 0,2: one worker per GPU")
    worker.add_argument("--cpu", type=int, metavar="N", help="N CPU workers")
    worker.add_argument("--queues", default="screen,extract,analysis", help="comma-separated")
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
    from workers.execution import embedded  # the model's own declaration is the base

    base = embedded.catalogue(args.model, args.weights, None, settings).preprocessing
    return Preprocessing.model_validate({**base.model_dump(), **given})


def _layers(args: argparse.Namespace, settings: Settings) -> int:
    from workers.execution import embedded

    info = embedded.catalogue(args.model, args.weights, _preprocessing(args, settings), settings)
    if args.json:
        found = info.model_dump(mode="json")
        for row, layer in zip(found["layers"], info.layers, strict=True):
            row["calls"] = layer.calls  # stored only when not 1; printed always
        output.print_json(found)
    else:
        output.catalogue(info)
    return 0


def _spec(args: argparse.Namespace, settings: Settings) -> ExtractionSpec:
    try:
        return ExtractionSpec(
            model=args.model,
            weights=args.weights,
            layers=tuple(v.strip() for v in args.layers.split(",") if v.strip()),
            inputs=tuple(args.inputs),
            batch_size=args.batch_size,
            dtype=args.dtype,
            compression=args.compression,
            channels=args.channels,
            top_k=args.top_k,
            max_size=args.max_size,
            preprocessing=_preprocessing(args, settings),
            labels_csv=args.labels,
            labels_from_dirs=args.labels_from_dirs,
            input_kind=args.input_kind,
            gradcam=tuple(v.strip() for v in (args.gradcam or "").split(",") if v.strip()),
            gradcam_target=args.target,
            squeeze=args.squeeze,
            benign=args.benign,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or "spec"
        raise UserError(f"invalid {where}: {first['msg']}") from None


def _report(args: argparse.Namespace, settings: Settings) -> int:
    from api.cli.report import report

    page = report(
        args.store or settings.store, args.job_id, Path(args.out), settings.factories, args.scale
    )
    if args.json:
        output.print_json({"job_id": args.job_id, "report": str(page.resolve())})
    else:
        output.out.print(f"report of job {args.job_id}: {page.resolve()}", highlight=False)
    return 0


def _exit_code(s: Status) -> int:
    return 0 if s.state in ("succeeded", "partial") or can_progress(s) else 1


def _scan(args: argparse.Namespace, settings: Settings, backend: Backend) -> int:
    remote = bool(args.api or settings.api_url)
    if args.no_wait and settings.broker_url is None and not remote:
        raise UserError("--no-wait needs a broker or an API; the embedded run finishes here")
    spec = _spec(args, settings)
    with output.progress(not args.json and output.err.is_terminal) as (on_plan, on_status):
        result = backend.scan(spec, not args.no_wait, on_plan, on_status)
    page = None
    store: str | None = backend.store  # None: the API's, not reachable from here
    finished = JobState(result.state).finished
    api_store = None  # the store as the API names it, when this host does not reach it
    if remote and finished:
        store, api_store = _reachable(backend, result.job_id, args.report)
    if args.report and finished and store is not None:
        from api.cli.report import report

        page = report(store, result.job_id, Path(args.report), settings.factories)
    if args.json:
        keys = ("job_id", "state", "n_samples", "n_failed")
        found = {"store": store or backend.store, **{k: getattr(result, k) for k in keys}}
        output.print_json({**found, **({"report": str(page.resolve())} if page else {})})
    elif finished:
        output.scan_report(_summary(backend, store, result.job_id), result)
        if store is not None:
            output.results_in(store, result.job_id)
        else:
            output.out.print(
                f"results in {api_store} (group jobs/{result.job_id}) on the API's side; "
                f"fetch them with api.client.Client(URL).job({result.job_id!r}).fetch(LAYER)",
                highlight=False,
            )
        if page is not None:
            output.out.print(f"report: {page.resolve()} (open it in a browser)", highlight=False)
    else:
        output.out.print(output.status_line(result), highlight=False)
    return _exit_code(result)


def _summary(backend: Backend, store: str | None, job_id: str) -> JobSummary:
    """The job's summary, from the store when this host reaches it, else from the API."""
    if store is not None:
        return job_summary(open_job(store, job_id, mode="r"))
    assert isinstance(backend, ApiBackend)
    answer = backend.client.request("GET", f"/v1/jobs/{job_id}/summary").json()
    return JobSummary.model_validate(answer)


def _reachable(backend: Backend, job_id: str, report: str | None) -> tuple[str | None, str]:
    """The API's store, and the same when this host reaches it too (a shared directory),
    so that the report can be drawn here; None when it does not, and then a `--report` is
    refused, since the report is drawn from the store."""
    assert isinstance(backend, ApiBackend)
    where = str(backend.client.request("GET", f"/v1/jobs/{job_id}/store").json()["store"])
    if "://" not in where and (Path(where) / "jobs" / job_id).is_dir():
        return where, where
    if report:
        raise UserError(
            f"job {job_id} finished, but its store {where} is not reachable from here, and "
            "--report draws from the store: run `actmap report` where the store is"
        )
    return None, where


def _reindex(store: str, as_json: bool) -> int:
    from workers.storage.consolidate import reindex

    n = reindex(store)
    if as_json:
        output.print_json({"store": store, "jobs": n})
    else:
        output.out.print(f"reindexed {n} jobs in {store}")
    return 0


def _list(args: argparse.Namespace, backend: Backend) -> int:
    if args.limit is None and args.cursor is None:
        found, after = backend.list(args.state), None
    elif args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: give 1 or more")
    else:
        found, after = backend.page(args.state, args.limit or 50, args.cursor)
    if args.json:
        output.print_json({"jobs": [s.as_dict() for s in found], "next_cursor": after})
        return 0
    output.job_table(found)
    if after is not None:
        limit = f" --limit {args.limit}" if args.limit else ""
        state = f" --state {args.state}" if args.state else ""
        output.err.print(f"next page: actmap jobs list{limit}{state} --cursor {after}")
    return 0


def _on_change(on_status: Callable[[Status], None], say: bool) -> Callable[[Status], None]:
    """Progress that also prints the state, with its reason, each time it changes."""
    seen: list[tuple[str, str | None]] = []

    def check(s: Status) -> None:
        on_status(s)
        if say and (s.state, s.reason) not in seen[-1:]:
            seen.append((s.state, s.reason))
            output.err.print(output.status_line(s), highlight=False)

    return check


def _jobs(args: argparse.Namespace, backend: Backend) -> int:
    if args.action == "list":
        return _list(args, backend)
    show = not args.json and output.err.is_terminal
    with output.progress(show) as (_, on_status):
        if args.action == "status":
            result = backend.status(args.job_id)
        elif args.action == "wait":
            result = backend.wait(args.job_id, _on_change(on_status, not args.json))
        elif args.action == "cancel":
            result = backend.cancel(args.job_id)
        else:
            result = backend.resume(
                args.job_id, not args.no_wait, _on_change(on_status, not args.json)
            )
    if args.json:
        output.print_json(result.as_dict())
    else:
        output.out.print(output.status_line(result), highlight=False)
    return 0 if args.action in ("status", "cancel") else _exit_code(result)


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from api.app import create_app
    from api.broker import RedisBroker
    from api.logs import configure
    from workers.execution.celery_app import make_celery
    from workers.lifecycle.counters import Roster

    if settings.broker_url is None:
        raise UserError("the API needs ACTMAP_BROKER_URL: it sends tasks to the workers")
    url = settings.broker_url.get_secret_value()
    broker = RedisBroker(url, make_celery(settings), Roster(url))
    configure()
    host = args.host
    if settings.auth_file is None:
        if host not in ("127.0.0.1", "localhost", "::1"):
            host = "127.0.0.1"
        logging.getLogger("actmap.api").warning(
            "no ACTMAP_AUTH_FILE: no authentication, so listening on loopback only (%s:%d)",
            host, args.port,
        )  # fmt: skip
    uvicorn.run(create_app(settings, broker), host=host, port=args.port, log_config=None)
    return 0


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from workers.execution.launcher import launch

    code: int = launch(settings, args.gpus, args.cpu, args.queues)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught below
    except BrokenPipeError:
        # The reader (`| head`) left: nothing more to say to it. Point stdout at devnull so
        # that the interpreter's own flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a command killed by SIGPIPE
    return code


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    """The command's handler; the store-bound ones get the backend the flags ask for."""
    if args.command == "models":
        return models_cli.run(args, settings)
    if args.command == "layers":
        return _layers(args, settings)
    if args.command == "worker":
        return _worker(args, settings)
    if args.command == "serve":
        return _serve(args, settings)
    if args.command in ("health", "compare", "explain", "screen", "atlas"):
        return analysis_cli.run(args, settings)
    if args.command == "report":
        return _report(args, settings)
    if args.command == "store":
        return _reindex(args.store or settings.store, args.json)
    store = getattr(args, "out", None) or getattr(args, "store", None) or settings.store
    backend = backend_for(
        settings, store, getattr(args, "api", None), getattr(args, "upload", False)
    )
    if args.command == "jobs":
        return _jobs(args, backend)
    return _scan(args, settings, backend)


def _main(argv: Sequence[str] | None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        # A worker's start and restarts are news on its terminal, not warnings.
        level=logging.INFO if args.command == "worker" else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=output.err, show_path=False)],
    )
    try:
        settings = Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "ACTMAP_" + "_".join(map(str, first["loc"])).upper() if first["loc"] else "settings"
        print(f"actmap: error: invalid {name}: {first['msg']}", file=sys.stderr)
        return 2
    if getattr(args, "token", None):
        settings = settings.model_copy(update={"token": SecretStr(args.token)})
    try:
        return _dispatch(args, settings)
    except UserError as exc:
        hint = ""
        if getattr(exc, "status", None) == 401:
            hint = "; give the API's bearer token with --token TOKEN or $ACTMAP_TOKEN"
        print(f"actmap: error: {exc}{hint}", file=sys.stderr)
        return 2
    except ActmapError as exc:
        print(f"actmap: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        job = getattr(exc, "job_id", None)  # an embedded run names the job it stopped
        hint = f"`actmap jobs resume {job}`" if job else "`actmap jobs resume JOB`"
        print(f"actmap: interrupted; {hint} runs what is left", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
