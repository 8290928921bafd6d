"""`actmap screen run --profile P INPUT...`: a screening job, an extraction job on the
`screen` queue scored with the profile when it finalizes, sent through the backend a scan
would use and waited for. Through an API the API makes the job's spec and the answers are
read page by page from it; embedded or on a broker the spec is made here from the stored
profile and the answers are read from the store."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from api.cli import output
from api.cli.backends import ApiBackend
from workers.settings import Settings
from workers.storage.layout import FLAG, JOBS, SAMPLE, SCORE, SCREEN

__all__ = ["screen_run"]


def screen_run(args: argparse.Namespace, settings: Settings, store: str) -> int:
    """A screening job of INPUTs with the profile, waited for; prints how many were flagged
    and the first flagged ids (or one JSON object)."""
    from api.cli.backends import backend_for

    backend = backend_for(settings, store, args.api)
    show = not args.json and output.err.is_terminal
    flags = scores = ids = None
    if isinstance(backend, ApiBackend):
        result, where, threshold, fpr = _screen_through_api(backend, args, show)
        if result.state in ("succeeded", "partial"):
            flags, scores, ids = _answers(backend, result.job_id)
    else:
        result, threshold, fpr = _screen_here(backend, args, store, show)
        where = store
        if result.state in ("succeeded", "partial"):
            from workers.storage.layout import open_job, read

            group = open_job(where, result.job_id, mode="r")
            flags, scores, ids = (
                read(group, f"{SCREEN}/{FLAG}"),
                read(group, f"{SCREEN}/{SCORE}"),
                read(group, SAMPLE),
            )
    n_flagged = int(flags.sum()) if flags is not None else None
    found = {"job_id": result.job_id, "store": where or backend.store, "state": result.state,
             "n_samples": result.n_samples, "n_flagged": n_flagged,
             "threshold": threshold}  # fmt: skip
    if args.json:
        output.print_json(found)
    else:
        output.out.print(output.status_line(result), highlight=False)
        if flags is not None and scores is not None and ids is not None:
            output.out.print(
                f"{n_flagged} of {result.n_samples} flagged (score above the threshold "
                f"{threshold:.4g}, fpr {fpr})",
                highlight=False,
            )
            for i in flags.nonzero()[0][:20]:
                output.out.print(
                    f"  [red]flagged[/] {ids[i]}: score {scores[i]:.2f}", highlight=False
                )
    return 0 if result.state in ("succeeded", "partial") else 1


def _screen_here(
    backend: Any, args: argparse.Namespace, store: str, show: bool
) -> tuple[Any, float, float]:
    """Embedded or on a broker: the screening spec is made here from the stored profile."""
    from workers.analysis.profiles import load_profile, screening_spec

    profile = load_profile(store, args.profile)
    screening = screening_spec(store, args.profile, inputs=tuple(args.inputs))
    with output.progress(show) as (on_plan, on_status):
        result = backend.scan(screening, True, on_plan, on_status)
    return result, profile.threshold, profile.fpr


def _answers(backend: ApiBackend, job_id: str) -> tuple[Any, Any, Any]:
    """(flags, scores, ids) of a screening job, read page by page through the API."""
    import numpy as np

    flags: list[bool] = []
    scores: list[float] = []
    ids: list[str] = []
    while True:
        page = backend.client.request(
            "GET", f"/v1/jobs/{job_id}/screen", params={"offset": len(ids), "limit": 1000}
        ).json()
        flags += page["flags"]
        scores += [np.nan if v is None else v for v in page["scores"]]
        ids += page["samples"]
        if not page["samples"] or len(ids) >= page["total"]:
            return np.asarray(flags, dtype=bool), np.asarray(scores), np.asarray(ids)


def _screen_through_api(
    backend: ApiBackend, args: argparse.Namespace, show: bool
) -> tuple[Any, str | None, float, float]:
    """Through the API, which makes the screening spec; the answers come through the API
    (GET /v1/jobs/{id}/screen), the store is named when this host reaches it."""
    import uuid

    client = backend.client
    profile = client.request("GET", f"/v1/analyses/{args.profile}").json()["summary"] or {}
    body = {"profile_id": args.profile, "inputs": list(args.inputs)}
    headers = {"Idempotency-Key": uuid.uuid4().hex}
    job_id = client.request("POST", "/v1/jobs/screenings", json=body, headers=headers).json()[
        "job_id"
    ]
    with output.progress(show) as (_, on_status):
        result = backend.wait(job_id, on_status)
    where = str(client.request("GET", f"/v1/jobs/{job_id}/store").json()["store"])
    reachable = "://" not in where and (Path(where) / JOBS / job_id).is_dir()
    threshold, fpr = float(profile["threshold"]), float(profile["fpr"])
    return result, where if reachable else None, threshold, fpr
