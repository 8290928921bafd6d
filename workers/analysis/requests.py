"""Analysis requests: a kind and its parameters, queued on the `analysis` queue and run by a
worker, the same from the API and from the CLI.

Owns the request's life in the store: `submit` leaves a `queued` placeholder under
`analyses/{id}` and sends the task; the worker's `run_analysis` marks it `running` and
replaces it with the result, or with a `failed` placeholder and a one-line reason (and
`error`: `user` when the request was wrong, `internal` for a bug), so that polling it with
`wait` always ends. The parameters are the API's request bodies as JSON.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from workers.errors import ActmapError, NotFound, UserError
from workers.jobs import AnalysisKind, AnalysisState, TaskName, new_id
from workers.storage.analyses import open_analysis, placeholder
from workers.storage.layout import attrs
from workers.storage.stored_job import Selection

__all__ = ["Analysis", "describe", "run_analysis", "submit", "wait"]

QUEUE = "analysis"
# Longest pause between two reads of a pending analysis: short ones answer at once.
_MAX_POLL_S = 0.5
# How long an analysis may be missing while it is polled: its worker replaces the group,
# so a read can fall between the removal and the new one, never for longer than that.
_MISSING_S = 30.0
log = logging.getLogger("actmap")

# How a task is sent: (task name, args, queue), as api.broker.Broker.send.
Send = Callable[[str, list[Any], str], None]


@dataclass(frozen=True)
class Analysis:
    """An analysis as its requester sees it: the attrs beyond kind, state, tenant and
    reason are its `summary` (inputs, model, created, the headline numbers)."""

    analysis_id: str
    kind: str
    state: str
    tenant: str = ""
    reason: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def pending(self) -> bool:
        return self.state in (AnalysisState.QUEUED, AnalysisState.RUNNING)


def describe(store: str, analysis_id: str) -> Analysis:
    """The analysis as stored now; NotFound when there is none."""
    found = attrs(open_analysis(store, analysis_id))
    summary = {k: v for k, v in found.items() if k not in ("kind", "state", "tenant", "reason")}
    return Analysis(
        analysis_id, str(found.get("kind")), str(found.get("state")), str(found.get("tenant")),
        found.get("reason"), summary,
    )  # fmt: skip


def submit(send: Send, store: str, kind: AnalysisKind, params: dict[str, Any], tenant: str) -> str:
    """Queue an analysis on the `analysis` queue; returns its id at once."""
    analysis_id = new_id()
    placeholder(store, analysis_id, kind, tenant, AnalysisState.QUEUED)
    send(TaskName.ANALYSE, [store, kind, params, analysis_id, tenant], QUEUE)
    return analysis_id


def wait(
    store: str,
    analysis_id: str,
    progress: Callable[[Analysis], None] | None = None,
    alive: Callable[[], bool] | None = None,
) -> Analysis:
    """Poll the store until the analysis is no longer pending. `alive`, when given, says
    whether whoever runs it still can (the embedded worker thread): if not, fail loudly
    instead of waiting forever."""
    pause, missing_since = 0.01, None
    while True:
        try:
            current = describe(store, analysis_id)
        except NotFound:
            missing_since = missing_since or time.monotonic()
            if time.monotonic() - missing_since > _MISSING_S:
                raise
        else:
            missing_since = None
            if progress is not None:
                progress(current)
            if not current.pending:
                return current
        if alive is not None and not alive():
            raise ActmapError("the in-process worker stopped; see the log above")
        time.sleep(pause)
        pause = min(pause * 1.5, _MAX_POLL_S)


def _selection(raw: dict[str, Any]) -> Selection:
    def many(key: str) -> tuple[Any, ...] | None:
        value = raw.get(key)
        return tuple(value) if value is not None else None

    return Selection(
        raw["job_id"], label=many("labels"), pred=many("predictions"),
        correct=raw.get("correct"), ids=many("samples"),
    )  # fmt: skip


def run_analysis(
    store: str, kind: str, params: dict[str, Any], analysis_id: str, tenant: str
) -> AnalysisState:
    """Run one queued analysis; returns its final state."""
    # The numerics load here, in the worker, not where requests are only sent.
    from workers.analysis.analyses import run_compare, run_health, run_signatures
    from workers.analysis.explanations import run_explain
    from workers.analysis.filter_atlas import DEFAULT_TOP, run_atlas
    from workers.analysis.profiles import fit_profile

    layers = params.get("layers")
    try:
        if kind not in set(AnalysisKind):
            known = ", ".join(AnalysisKind)
            raise UserError(f"unknown analysis kind {kind!r}; use one of {known}")
        placeholder(store, analysis_id, kind, tenant, AnalysisState.RUNNING)
        if kind == AnalysisKind.HEALTH:
            run_health(store, params["job_id"], layers, analysis_id=analysis_id)
        elif kind == AnalysisKind.EXPLAIN:
            run_explain(
                store, params["job_id"], params["layer"], params.get("top", 5),
                analysis_id=analysis_id,
            )  # fmt: skip
        elif kind == AnalysisKind.SIGNATURES:
            run_signatures(store, params["job_id"], layers, analysis_id=analysis_id)
        elif kind == AnalysisKind.ATLAS:
            top = params.get("top") or DEFAULT_TOP
            run_atlas(store, params["job_id"], params["layer"], top, analysis_id=analysis_id)
        elif kind == AnalysisKind.COMPARE:
            a, b = _selection(params["a"]), _selection(params["b"])
            paired = bool(params.get("paired"))
            run_compare(store, a, b, layers, paired, analysis_id=analysis_id)
        else:
            fit_profile(
                store, params["reference_job"], layers, params.get("fpr", 0.05),
                params.get("adversarial_job"), detectors=params.get("detectors"),
                combine=params.get("combine") or "fisher",
                held_out=params.get("held_out") or 0.25, analysis_id=analysis_id,
            )  # fmt: skip
    except UserError as exc:
        placeholder(store, analysis_id, kind, tenant, AnalysisState.FAILED, str(exc), "user")
        return AnalysisState.FAILED
    except Exception as exc:  # a bug: keep the traceback, and end the requester's wait
        log.exception("analysis %s (%s) failed unexpectedly", analysis_id, kind)
        reason = f"internal error: {exc!r}"
        placeholder(store, analysis_id, kind, tenant, AnalysisState.FAILED, reason, "internal")
        return AnalysisState.FAILED
    return AnalysisState.SUCCEEDED
