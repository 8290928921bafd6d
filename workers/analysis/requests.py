"""Analysis requests as the API queues them: a kind and its parameters, run on the
`analysis` queue. A request the caller got wrong leaves a `failed` analysis with the
one-line reason, so that polling it ends."""

from __future__ import annotations

from typing import Any

import zarr

from workers.analysis.analyses import run_compare, run_health, run_signatures
from workers.analysis.profiles import fit_profile
from workers.analysis.results import Selection
from workers.errors import UserError
from workers.storage.consolidate import publish_path

__all__ = ["KINDS", "placeholder", "run_analysis"]

KINDS = ("health", "comparison", "signatures", "profile")


def _selection(raw: dict[str, Any]) -> Selection:
    def many(key: str) -> tuple[Any, ...] | None:
        value = raw.get(key)
        return tuple(value) if value is not None else None

    return Selection(
        raw["job_id"], label=many("labels"), pred=many("predictions"),
        correct=raw.get("correct"), ids=many("samples"),
    )  # fmt: skip


def placeholder(
    store: str, analysis_id: str, kind: str, tenant: str, state: str, reason: str = ""
) -> None:
    """The analysis group before (or instead of) its results: kind, tenant and state."""
    root = zarr.open_group(store.removeprefix("file://"), mode="a", use_consolidated=False)
    meta = {
        "kind": kind,
        "state": state,
        "tenant": tenant,
        **({"reason": reason} if reason else {}),
    }
    root.require_group("analyses").create_group(analysis_id, attributes=meta, overwrite=True)
    publish_path(store, f"analyses/{analysis_id}")


def run_analysis(
    store: str, kind: str, params: dict[str, Any], analysis_id: str, tenant: str
) -> str:
    """Run one queued analysis; returns its final state."""
    layers = params.get("layers")
    try:
        if kind == "health":
            run_health(store, params["job_id"], layers, analysis_id=analysis_id)
        elif kind == "signatures":
            run_signatures(store, params["job_id"], layers, analysis_id=analysis_id)
        elif kind == "comparison":
            a, b = _selection(params["a"]), _selection(params["b"])
            paired = bool(params.get("paired"))
            run_compare(store, a, b, layers, paired, analysis_id=analysis_id)
        elif kind == "profile":
            fit_profile(
                store, params["reference_job"], layers, params.get("fpr", 0.05),
                params.get("adversarial_job"), analysis_id=analysis_id,
            )  # fmt: skip
        else:
            raise UserError(f"unknown analysis kind {kind!r}; use one of {', '.join(KINDS)}")
    except UserError as exc:
        placeholder(store, analysis_id, kind, tenant, "failed", str(exc))
        return "failed"
    return "succeeded"
