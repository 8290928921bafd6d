"""`actmap screen sample --profile P FILE...`: each file screened now, without a job, through
the backend a scan would use: an API (POST /v1/analyses/P/screen), a broker (a task on the
`screen` queue, its answer awaited) or this process. A file that cannot be read or screened
is one line on stderr; the others go on."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from api.cli import output
from workers.errors import NotFound, UserError
from workers.extraction.inputs import MAX_INPUT_BYTES
from workers.settings import Settings

__all__ = ["screen_files"]


def _read(file: str) -> bytes:
    path = Path(file)
    try:
        size = path.stat().st_size
        if size > MAX_INPUT_BYTES:
            raise UserError(f"{path.name} is {size} bytes, over {MAX_INPUT_BYTES}")
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {file}: {exc.strerror}") from None


def _line(answer: dict[str, Any]) -> str:
    verdict = "[red]flagged[/]" if answer["flag"] else "clean"
    pred = answer["pred_class"] if answer.get("pred_class") is not None else answer["pred"]
    return (
        f"{answer['sample']}: {verdict}, score {answer['score']:.4g} (threshold "
        f"{answer['threshold']:.4g}, fpr {answer['fpr']}), predicted {pred}"
    )


def screen_files(args: argparse.Namespace, settings: Settings) -> int:
    """Exit 0 when every file was answered, 1 when any was refused; an unknown profile
    stops at once (exit 2)."""
    from api.cli.backends import backend_for

    backend = backend_for(settings, args.store or settings.store, args.api)
    answers: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    for file in args.files:
        name = Path(file).name
        try:
            found = backend.screen_sample(args.profile, name, _read(file))
            found.pop("worker_s", None)  # the same answer from every backend
            answers.append(found)
        except UserError as exc:
            if isinstance(exc, NotFound) or getattr(exc, "status", None) in (401, 404):
                raise  # the profile, not the file: no other file would fare better
            failed.append({"file": file, "error": str(exc)})
            if not args.json:
                output.err.print(f"{file}: {exc}", highlight=False, markup=False)
            continue
        if not args.json:
            output.out.print(_line(answers[-1]), highlight=False)
    n_flagged = sum(bool(a["flag"]) for a in answers)
    if args.json:
        output.print_json({"profile_id": args.profile, "n_flagged": n_flagged,
                           "answers": answers, "failed": failed})  # fmt: skip
    else:
        output.out.print(f"{n_flagged} of {len(answers)} flagged", highlight=False)
    return 1 if failed else 0
