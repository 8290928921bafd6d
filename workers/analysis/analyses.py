"""Analyses of stored jobs: filter health, two populations compared, family signatures.

Owns running health.py, compare.py and signatures.py over a job's stored arrays, read a
block of rows at a time (storage/stored_job.py), and saving each result under
`analyses/{analysis_id}` (storage/analyses.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from workers.analysis.compare import COMPARE_BUDGET, compare_rows, pair_by_id, paired_distances
from workers.analysis.health import layer_health
from workers.analysis.signatures import family_signatures
from workers.analysis.stats import DEFAULT_BLOCK, channel_quantiles
from workers.errors import SpecError
from workers.jobs import AnalysisKind
from workers.storage.analyses import Arrays, save
from workers.storage.layout import KEPT_CHANNEL, LABEL, POOLED, layer_path
from workers.storage.stored_job import Acts, Picked, Selection, StoredJob

__all__ = ["run_compare", "run_health", "run_signatures"]

_HEALTH = ("mean", "std", "max", "on_rate", "apoz", "dead", "always_on", "saturated")
# Sparse: at or below zero at this share of positions or more (APoZ).
SPARSE_APOZ = 0.9
_COMPARE = ("mean_a", "mean_b", "mean_difference", "cohen_d", "t", "df", "p", "q", "auroc")


def _dims(source: Acts) -> list[str]:
    names = getattr(source.metadata, "dimension_names", None)
    return [str(n) for n in names] if names else [f"dim_{i}" for i in range(source.ndim)]


def _listing(values: np.ndarray) -> list[int]:
    return [int(v) for v in np.asarray(values).tolist()]


def run_health(
    store: str,
    job_id: str,
    layers: Sequence[str] | None = None,
    selection: Selection | None = None,
    *,
    clip: float | None = None,
    reference_job: str | None = None,
    block: int = DEFAULT_BLOCK,
    analysis_id: str | None = None,
) -> str:
    """Filter health of each layer's stored activations (one streaming pass per layer).

    Extremes (and so `saturated`) are counted at `clip`, the activation's upper bound, or
    above the per-channel 99th percentile of `reference_job`'s activations; without either,
    `extreme_rate` is NaN and nothing is saturated. Returns the analysis id.
    """
    job = StoredJob.finished(store, job_id)
    if selection is not None and selection.job_id != job_id:
        raise SpecError(f"the selection is of job {selection.job_id}, not {job_id}")
    rows = job.rows(selection)
    names = job.layers(layers)
    ref = StoredJob.finished(store, reference_job) if reference_job else None
    results: Arrays = {}
    summary: dict[str, Any] = {}
    for layer in names:
        acts = job.acts(layer)
        dim = _dims(acts)[1]
        if dim == "rank":
            raise SpecError(
                f"layer {layer!r} of job {job_id} holds each sample's top-k channels only; "
                "health needs every channel: extract it without top_k"
            )
        p99 = None
        if ref is not None:
            ref_acts = ref.acts(ref.layers([layer])[0])
            if _dims(ref_acts)[1] != dim or ref_acts.shape[1] != acts.shape[1]:
                raise SpecError(
                    f"layer {layer!r} has {acts.shape[1]} stored channels in job {job_id} and "
                    f"{ref_acts.shape[1]} in reference job {ref.id}; extract the same channels"
                )
            p99 = channel_quantiles(Picked(ref_acts, ref.rows()), 0.99, block=block)
        health = layer_health(Picked(acts, rows), reference_p99=p99, clip=clip, block=block)
        for name in _HEALTH:
            results[layer_path(layer, name)] = (np.asarray(getattr(health, name)), [dim])
        extreme = health.extreme_rate  # None: neither clip nor a reference was given
        blank = np.full(health.mean.shape, np.nan)
        results[layer_path(layer, "extreme_rate")] = (blank if extreme is None else extreme, [dim])
        channel_ids = np.arange(acts.shape[1])
        if dim == "kept_channel":
            channel_ids = np.asarray(job.layer(layer, KEPT_CHANNEL)[:])
            results[layer_path(layer, KEPT_CHANNEL)] = (channel_ids.astype(np.int32), [dim])
        found = {k: _listing(channel_ids[v]) for k, v in health.summary().items()}
        found["sparse"] = _listing(channel_ids[health.apoz >= SPARSE_APOZ])
        summary[layer] = {
            "channels": int(acts.shape[1]),
            **{f"n_{k}": len(v) for k, v in found.items()},
            **found,
            "tau": health.tau,
            "median_sparsity": float(np.median(health.apoz)) if health.apoz.size else 0.0,
        }
    inputs = {
        "job_id": job_id,
        "selection": (selection or Selection(job_id)).as_json(),
        "layers": names,
        "n_samples": int(rows.size),
        "clip": clip,
        "reference_job": reference_job,
    }
    return save(store, AnalysisKind.HEALTH, job, inputs, {"layers": summary}, results, analysis_id)


def run_compare(
    store: str,
    a: Selection,
    b: Selection,
    layers: Sequence[str] | None = None,
    paired: bool = False,
    *,
    alpha: float = 0.05,
    block: int = DEFAULT_BLOCK,
    budget: int = COMPARE_BUDGET,
    analysis_id: str | None = None,
) -> str:
    """Selection A against B, channel by channel on pooled activations: means, Cohen's d,
    Welch's t, p and Benjamini-Hochberg q, AUROC, and `rank` (0 = the channel that best
    separates A from B, by |AUROC - 0.5| then |d|); `discriminative` marks q <= alpha.
    `paired` matches sample ids between A and B and adds per-pair cosine and L2 distances
    of the whole layer. Returns the analysis id.

    Memory stays near `budget` bytes whatever the job size (compare.compare_rows): moments
    stream, AUROC ranks a block of channels per pass; the summary's `auroc_error` is 0.0
    unless a channel was too long to rank within the budget. The paired distances read
    the full activations `block` pairs at a time."""
    if not 0.0 < alpha < 1.0:
        raise SpecError(f"alpha is a false discovery rate in (0, 1), got {alpha}")
    job_a = StoredJob.finished(store, a.job_id)
    job_b = job_a if b.job_id == a.job_id else StoredJob.finished(store, b.job_id)
    rows_a, rows_b = job_a.rows(a, "selection A"), job_b.rows(b, "selection B")
    names = job_a.layers(layers)
    job_b.layers(names)
    for layer in names:
        ca, cb = job_a.layer(layer, POOLED).shape[1], job_b.layer(layer, POOLED).shape[1]
        if ca != cb:
            raise SpecError(
                f"layer {layer!r} has {ca} channels in job {job_a.id} and {cb} in job "
                f"{job_b.id}; compare the same layer of one architecture"
            )
    pair: tuple[np.ndarray, np.ndarray] | None = None
    results: Arrays = {}
    if paired:
        pair = pair_by_id(job_a.samples[rows_a].tolist(), job_b.samples[rows_b].tolist())
        # The pair ids are the root's dimension coordinate, inherited by every layer.
        results["pair"] = (job_a.samples[rows_a][pair[0]], ["pair"])
    summary: dict[str, Any] = {}
    for layer in names:
        pooled_a = Picked(job_a.layer(layer, POOLED), rows_a)
        pooled_b = Picked(job_b.layer(layer, POOLED), rows_b)
        c = compare_rows(pooled_a, pooled_b, budget=budget)
        order = np.lexsort((-np.abs(c.cohen_d), -np.abs(c.auroc - 0.5)))
        rank = np.empty(order.size, dtype=np.int32)
        rank[order] = np.arange(order.size, dtype=np.int32)
        for name in _COMPARE:
            results[layer_path(layer, name)] = (np.asarray(getattr(c, name)), ["channel"])
        results[layer_path(layer, "rank")] = (rank, ["channel"])
        results[layer_path(layer, "discriminative")] = (c.q <= alpha, ["channel"])
        ranked = c.ranked(alpha)
        summary[layer] = {
            "channels": int(c.mean_a.size),
            "n_discriminative": int(ranked.size),
            "top": _listing(ranked[:10]),
            # The figures of those channels, so that a reader of the summary alone (the
            # CLI through the API) can show them.
            **{
                f"top_{name}": [float(v) for v in getattr(c, name)[ranked[:10]]]
                for name in ("cohen_d", "auroc", "q")
            },
            # The largest error of any AUROC: 0.0 unless histograms stood in for ranks.
            "auroc_error": 0.0 if c.auroc_error is None else float(c.auroc_error.max()),
        }
        if pair is not None:
            d = paired_distances(
                Picked(job_a.acts(layer), rows_a[pair[0]]),
                Picked(job_b.acts(layer), rows_b[pair[1]]),
                block=block,
            )
            results[layer_path(layer, "cosine")] = (d.cosine, ["pair"])
            results[layer_path(layer, "l2")] = (d.l2, ["pair"])
            summary[layer].update(mean_cosine=float(d.cosine.mean()), mean_l2=float(d.l2.mean()))
    inputs = {
        "a": a.as_json(),
        "b": b.as_json(),
        "layers": names,
        "n_a": int(rows_a.size),
        "n_b": int(rows_b.size),
        "paired": paired,
        "n_pairs": 0 if pair is None else int(pair[0].size),
        "alpha": alpha,
    }
    return save(
        store, AnalysisKind.COMPARE, job_a, inputs, {"layers": summary}, results, analysis_id
    )


def run_signatures(
    store: str,
    job_id: str,
    layers: Sequence[str] | None = None,
    *,
    q: float = 0.9,
    min_share: float = 0.9,
    block: int = DEFAULT_BLOCK,
    analysis_id: str | None = None,
) -> str:
    """Each label's signature channels per layer (signatures.family_signatures, labels as
    families, the job's own samples as the reference population). Returns the analysis id."""
    job = StoredJob.finished(store, job_id)
    rows = job.rows()
    names = job.layers(layers)
    labels = job.column(LABEL)[rows]
    classes = job.attrs.get("classes")
    results: Arrays = {}
    summary: dict[str, Any] = {}
    for layer in names:
        s = family_signatures(
            Picked(job.layer(layer, POOLED), rows), labels, q=q, min_share=min_share, block=block
        )
        results["family"] = (s.families, ["family"])
        results["n_samples"] = (s.n_samples, ["family"])
        results[layer_path(layer, "share")] = (s.share, ["family", "channel"])
        results[layer_path(layer, "consistent")] = (s.consistent, ["family", "channel"])
        results[layer_path(layer, "threshold")] = (s.threshold, ["channel"])
        summary[layer] = {str(int(f)): _listing(s.channels(int(f))) for f in s.families}
    inputs = {"job_id": job_id, "layers": names, "n_samples": int(rows.size), "q": q}
    headline = {"min_share": min_share, "classes": classes, "layers": summary}
    return save(store, AnalysisKind.SIGNATURES, job, inputs, headline, results, analysis_id)
