"""Analysis jobs: read a job's stored arrays block by block, write results beside it.

Owns running this package's analyses (health, comparison, signatures, screening) on jobs in a
store and writing each result under `analyses/{analysis_id}` of that store: arrays with named
dimensions, and a JSON summary in the group's attrs (kind, inputs, created, actmap version and
the headline numbers), published into the root's consolidated metadata so that
`xarray.open_datatree(store, group="analyses/ID", engine="zarr")` opens it without warnings.
Screening profiles are analyses too; `score_job` writes a job's `screen/score` and
`screen/flag`. Results are computed in full before anything is written, so a user error never
leaves half an analysis behind. Numpy and Zarr only.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import zarr

from workers.analysis.compare import compare, pair_by_id, paired_distances
from workers.analysis.health import layer_health
from workers.analysis.screening import ScreeningProfile
from workers.analysis.selection import select
from workers.analysis.signatures import family_signatures
from workers.analysis.stats import DEFAULT_BLOCK, channel_quantiles, iter_rows
from workers.errors import JobError, LayerError, SpecError
from workers.jobs import close_matches
from workers.storage.consolidate import publish, publish_path
from workers.storage.layout import COMPRESSOR, array, attrs, open_job, read

__all__ = [
    "Selection",
    "fit_profile",
    "analysis_ids",
    "load_profile",
    "new_analysis_id",
    "open_analysis",
    "run_compare",
    "run_health",
    "run_signatures",
    "score_job",
]

PROFILE = "screening-profile"
_FINISHED = ("succeeded", "partial")
# Rows scored at a time: a screening job is read in blocks of this many samples.
_SCORE_BLOCK = 4096
_HEALTH = ("mean", "std", "max", "on_rate", "apoz", "dead", "always_on", "saturated")
_COMPARE = ("mean_a", "mean_b", "mean_difference", "cohen_d", "t", "df", "p", "q", "auroc")
# Arrays: {path under the analysis group: (values, dimension names)}.
_Arrays = dict[str, tuple[np.ndarray, list[str]]]


@dataclass(frozen=True)
class Selection:
    """The samples of one job that meet every condition given (see selection.select);
    failed samples never take part."""

    job_id: str
    label: int | tuple[int, ...] | None = None
    pred: int | tuple[int, ...] | None = None
    correct: bool | None = None
    ids: tuple[str, ...] | None = None

    def as_json(self) -> dict[str, Any]:
        given = {
            "job_id": self.job_id,
            "label": self.label,
            "pred": self.pred,
            "correct": self.correct,
            "ids": self.ids,
        }
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in given.items() if v is not None
        }


class _Job:
    """A finished job, opened read-only, with its per-sample table and stored layers."""

    def __init__(self, store: str, job_id: str) -> None:
        self.id = job_id
        self.group = open_job(store, job_id, mode="r")
        self.attrs = attrs(self.group)
        state = self.attrs.get("state")
        if state not in _FINISHED:
            raise SpecError(
                f"job {job_id} is {state}; analyse it once it has finished "
                f"(`actmap jobs wait {job_id}`)"
            )
        # Plain Python strings: numpy's StringDType (as Zarr returns them) casts to little.
        self.samples = np.asarray(read(self.group, "sample").tolist(), dtype=object)

    @property
    def sha256(self) -> str:
        return str(self.attrs.get("model", {}).get("sha256", ""))

    def rows(self, selection: Selection | None = None, name: str = "") -> np.ndarray:
        s = selection or Selection(self.id)
        table = {n: read(self.group, n) for n in ("label", "pred", "error_code")}
        table["sample"] = self.samples
        try:
            return select(table, label=s.label, pred=s.pred, correct=s.correct, ids=s.ids)
        except SpecError as exc:
            raise SpecError(f"{name or 'selection'} of job {self.id}: {exc}") from None

    def stored_layers(self) -> list[str]:
        if "layers" not in self.group:
            return []
        held = {name for name, _ in _group(self.group, "layers").groups()}
        order = [n for n in self.attrs.get("spec", {}).get("layers", []) if n in held]
        return order + sorted(held - set(order))

    def layers(self, wanted: Sequence[str] | None) -> list[str]:
        held = self.stored_layers()
        for name in wanted or ():
            if name not in held:
                raise LayerError(
                    f"job {self.id} stores no layer {name!r}; {close_matches(name, held)}"
                )
        names = list(dict.fromkeys(wanted)) if wanted else held
        if not names:
            raise LayerError(f"job {self.id} stores no layers; extract some first")
        return names

    def layer(self, layer: str, name: str) -> zarr.Array[Any]:
        return array(self.group, f"layers/{layer}/{name}")


class _Picked:
    """Rows `rows` of an array (the selected samples) in the `stats.Rows` shape: sliced or
    indexed by position, each read only when asked for."""

    def __init__(self, source: zarr.Array[Any], rows: np.ndarray) -> None:
        self._source = source
        self._rows = np.asarray(rows, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        return (int(self._rows.size), *self._source.shape[1:])

    def __getitem__(self, key: Any, /) -> np.ndarray:
        rows = np.atleast_1d(self._rows[key])
        if rows.size and rows[-1] - rows[0] == rows.size - 1 and (np.diff(rows) == 1).all():
            return np.asarray(self._source[int(rows[0]) : int(rows[-1]) + 1])  # whole chunks
        return np.asarray(self._source.oindex[rows])


def _group(parent: zarr.Group, name: str) -> zarr.Group:
    node = parent[name]
    if not isinstance(node, zarr.Group):
        raise TypeError(f"{name} is an array, not a group")
    return node


def _dims(source: zarr.Array[Any]) -> list[str]:
    names = getattr(source.metadata, "dimension_names", None)
    return [str(n) for n in names] if names else [f"dim_{i}" for i in range(source.ndim)]


def _load(picked: _Picked, block: int) -> np.ndarray:
    parts = list(iter_rows(picked, block))
    return np.concatenate(parts).astype(np.float64) if parts else np.zeros(picked.shape)


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
    job = _Job(store, job_id)
    if selection is not None and selection.job_id != job_id:
        raise SpecError(f"the selection is of job {selection.job_id}, not {job_id}")
    rows = job.rows(selection)
    names = job.layers(layers)
    ref = _Job(store, reference_job) if reference_job else None
    results: _Arrays = {}
    summary: dict[str, Any] = {}
    for layer in names:
        acts = job.layer(layer, "acts")
        dim = _dims(acts)[1]
        if dim == "rank":
            raise SpecError(
                f"layer {layer!r} of job {job_id} holds each sample's top-k channels only; "
                "health needs every channel: extract it without top_k"
            )
        p99 = None
        if ref is not None:
            ref_acts = ref.layer(ref.layers([layer])[0], "acts")
            if _dims(ref_acts)[1] != dim or ref_acts.shape[1] != acts.shape[1]:
                raise SpecError(
                    f"layer {layer!r} has {acts.shape[1]} stored channels in job {job_id} and "
                    f"{ref_acts.shape[1]} in reference job {ref.id}; extract the same channels"
                )
            p99 = channel_quantiles(_Picked(ref_acts, ref.rows()), 0.99, block=block)
        health = layer_health(_Picked(acts, rows), reference_p99=p99, clip=clip, block=block)
        for name in _HEALTH:
            results[f"layers/{layer}/{name}"] = (np.asarray(getattr(health, name)), [dim])
        extreme = health.extreme_rate  # None: neither clip nor a reference was given
        blank = np.full(health.mean.shape, np.nan)
        results[f"layers/{layer}/extreme_rate"] = (blank if extreme is None else extreme, [dim])
        channel_ids = np.arange(acts.shape[1])
        if dim == "kept_channel":
            channel_ids = np.asarray(job.layer(layer, "kept_channel")[:])
            results[f"layers/{layer}/kept_channel"] = (channel_ids.astype(np.int32), [dim])
        found = {k: _listing(channel_ids[v]) for k, v in health.summary().items()}
        summary[layer] = {
            "channels": int(acts.shape[1]),
            **{f"n_{k}": len(v) for k, v in found.items()},
            **found,
            "tau": health.tau,
        }
    inputs = {
        "job_id": job_id,
        "selection": (selection or Selection(job_id)).as_json(),
        "layers": names,
        "n_samples": int(rows.size),
        "clip": clip,
        "reference_job": reference_job,
    }
    return _save(store, "health", job, inputs, {"layers": summary}, results, analysis_id)


def run_compare(
    store: str,
    a: Selection,
    b: Selection,
    layers: Sequence[str] | None = None,
    paired: bool = False,
    *,
    alpha: float = 0.05,
    block: int = DEFAULT_BLOCK,
    analysis_id: str | None = None,
) -> str:
    """Selection A against B, channel by channel on pooled activations: means, Cohen's d,
    Welch's t, p and Benjamini-Hochberg q, AUROC, and `rank` (0 = the channel that best
    separates A from B, by |AUROC - 0.5| then |d|); `discriminative` marks q <= alpha.
    `paired` matches sample ids between A and B and adds per-pair cosine and L2 distances
    of the whole layer. Returns the analysis id.

    Pooled activations of both selections are held in memory (the AUROC ranks them all);
    the paired distances read the full activations block by block."""
    if not 0.0 < alpha < 1.0:
        raise SpecError(f"alpha is a false discovery rate in (0, 1), got {alpha}")
    job_a = _Job(store, a.job_id)
    job_b = job_a if b.job_id == a.job_id else _Job(store, b.job_id)
    rows_a, rows_b = job_a.rows(a, "selection A"), job_b.rows(b, "selection B")
    names = job_a.layers(layers)
    job_b.layers(names)
    for layer in names:
        ca, cb = job_a.layer(layer, "pooled").shape[1], job_b.layer(layer, "pooled").shape[1]
        if ca != cb:
            raise SpecError(
                f"layer {layer!r} has {ca} channels in job {job_a.id} and {cb} in job "
                f"{job_b.id}; compare the same layer of one architecture"
            )
    pair: tuple[np.ndarray, np.ndarray] | None = None
    results: _Arrays = {}
    if paired:
        pair = pair_by_id(job_a.samples[rows_a].tolist(), job_b.samples[rows_b].tolist())
        # The pair ids are the root's dimension coordinate, inherited by every layer.
        results["pair"] = (job_a.samples[rows_a][pair[0]], ["pair"])
    summary: dict[str, Any] = {}
    for layer in names:
        pooled_a = _load(_Picked(job_a.layer(layer, "pooled"), rows_a), block)
        pooled_b = _load(_Picked(job_b.layer(layer, "pooled"), rows_b), block)
        c = compare(pooled_a, pooled_b)
        order = np.lexsort((-np.abs(c.cohen_d), -np.abs(c.auroc - 0.5)))
        rank = np.empty(order.size, dtype=np.int32)
        rank[order] = np.arange(order.size, dtype=np.int32)
        for name in _COMPARE:
            results[f"layers/{layer}/{name}"] = (np.asarray(getattr(c, name)), ["channel"])
        results[f"layers/{layer}/rank"] = (rank, ["channel"])
        results[f"layers/{layer}/discriminative"] = (c.q <= alpha, ["channel"])
        ranked = c.ranked(alpha)
        summary[layer] = {
            "channels": int(c.mean_a.size),
            "n_discriminative": int(ranked.size),
            "top": _listing(ranked[:10]),
        }
        if pair is not None:
            d = paired_distances(
                _Picked(job_a.layer(layer, "acts"), rows_a[pair[0]]),
                _Picked(job_b.layer(layer, "acts"), rows_b[pair[1]]),
                block=block,
            )
            results[f"layers/{layer}/cosine"] = (d.cosine, ["pair"])
            results[f"layers/{layer}/l2"] = (d.l2, ["pair"])
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
    return _save(store, "compare", job_a, inputs, {"layers": summary}, results, analysis_id)


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
    job = _Job(store, job_id)
    rows = job.rows()
    names = job.layers(layers)
    labels = read(job.group, "label")[rows]
    classes = job.attrs.get("classes")
    results: _Arrays = {}
    summary: dict[str, Any] = {}
    for layer in names:
        s = family_signatures(
            _Picked(job.layer(layer, "pooled"), rows), labels, q=q, min_share=min_share, block=block
        )
        results["family"] = (s.families, ["family"])
        results["n_samples"] = (s.n_samples, ["family"])
        results[f"layers/{layer}/share"] = (s.share, ["family", "channel"])
        results[f"layers/{layer}/consistent"] = (s.consistent, ["family", "channel"])
        results[f"layers/{layer}/threshold"] = (s.threshold, ["channel"])
        summary[layer] = {str(int(f)): _listing(s.channels(int(f))) for f in s.families}
    inputs = {"job_id": job_id, "layers": names, "n_samples": int(rows.size), "q": q}
    headline = {"min_share": min_share, "classes": classes, "layers": summary}
    return _save(store, "signatures", job, inputs, headline, results, analysis_id)


def fit_profile(
    store: str,
    reference_job: str,
    layers: Sequence[str] | None = None,
    fpr: float = 0.05,
    adversarial_job: str | None = None,
    *,
    k: int = 20,
    seed: int = 0,
    block: int = DEFAULT_BLOCK,
    analysis_id: str | None = None,
) -> str:
    """Fit a `ScreeningProfile` on the reference job's pooled activations (with its labels
    when every sample has one) and store it; `adversarial_job`, of the same model, tunes the
    combination. Returns the profile id, which `score_job` takes."""
    ref = _Job(store, reference_job)
    names = ref.layers(layers)
    rows = ref.rows()
    x = {layer: _load(_Picked(ref.layer(layer, "pooled"), rows), block) for layer in names}
    labels = read(ref.group, "label")[rows]
    known = bool((labels >= 0).all())
    adversarial = None
    if adversarial_job is not None:
        adv = _Job(store, adversarial_job)
        if adv.sha256 != ref.sha256:
            raise SpecError(
                f"adversarial job {adv.id} ran another model than reference job {ref.id}; "
                "extract both with the same model"
            )
        adv_rows = adv.rows()
        adversarial = {
            layer: _load(_Picked(adv.layer(layer, "pooled"), adv_rows), block)
            for layer in adv.layers(names)
        }
    profile = ScreeningProfile.fit(
        x, labels if known else None, fpr=fpr, k=k, adversarial=adversarial, seed=seed
    )
    results: _Arrays = {
        "column": (np.asarray([f"{n}/{d}" for n, d in profile.columns], dtype=object), ["column"])
    }
    for name, values in profile.to_arrays().items():
        layer, _, part = name.rpartition("/")
        path = f"layers/{layer}/{part}" if layer else name
        results[path] = (
            values,
            _PROFILE_DIMS.get(part, [f"{part}_{i}" for i in range(values.ndim)]),
        )
    stored = profile.to_json()
    headline = {
        "threshold": stored["threshold"],
        "fpr": fpr,
        "calibration_fpr": stored.get("calibration_fpr"),
        "combine": stored["combine"],
        "profile": stored,
    }
    inputs = {
        "reference_job": reference_job,
        "adversarial_job": adversarial_job,
        "layers": names,
        "n_reference": int(rows.size),
        "labels": known,
    }
    return _save(store, PROFILE, ref, inputs, headline, results, analysis_id)


_PROFILE_DIMS = {
    "z_mean": ["column"],
    "z_std": ["column"],
    "coef": ["column"],
    "calibration_scores": ["calibration"],
    "class_means": ["class", "channel"],
    "precision": ["channel", "channel_2"],  # xarray needs two names for a square matrix
    "bank": ["bank", "channel"],
}


def load_profile(store: str, profile_id: str) -> ScreeningProfile:
    """The stored profile, ready to score; its `meta["model"]` is the model it was fitted on."""
    group = open_analysis(store, profile_id)
    meta = attrs(group)
    if meta.get("kind") != PROFILE:
        raise SpecError(f"analysis {profile_id} is a {meta.get('kind')}, not a screening profile")
    arrays: dict[str, np.ndarray] = {
        name: np.asarray(node[:]) for name, node in group.arrays() if name != "column"
    }
    if "layers" in group:
        for layer, sub in _group(group, "layers").groups():
            arrays.update({f"{layer}/{n}": np.asarray(node[:]) for n, node in sub.arrays()})
    described = {**meta["profile"], "model": meta["model"], "profile_id": profile_id}
    return ScreeningProfile.from_arrays(arrays, described)


def score_job(store: str, job_id: str, profile_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Score the job's pooled activations with the profile, block by block, and store them as
    `jobs/{job_id}/screen/score` (N,) float32 and `screen/flag` (N,) bool; failed samples
    get NaN and False. Refuses a job of another model than the profile's."""
    profile = load_profile(store, profile_id)
    job = _Job(store, job_id)
    model = profile.meta.get("model", {})
    if job.sha256 != model.get("sha256"):
        raise SpecError(
            f"profile {profile_id} was fitted on another model ({model.get('name')}, "
            f"sha256 {str(model.get('sha256'))[:12]}) than job {job_id} ran "
            f"(sha256 {job.sha256[:12]}); fit a profile on a reference job of this model"
        )
    names = job.layers(list(profile.channels))
    ok = read(job.group, "error_code") == 0
    n = ok.size
    scores = np.full(n, np.nan, dtype=np.float32)
    for start in range(0, n, _SCORE_BLOCK):
        keep = ok[start : start + _SCORE_BLOCK]
        if not keep.any():
            continue
        part = {
            layer: np.asarray(job.layer(layer, "pooled")[start : start + keep.size])[keep]
            for layer in names
        }
        scores[start : start + keep.size][keep] = profile.score(part)
    flags = np.asarray(ok & (scores > profile.threshold), dtype=bool)
    writable = open_job(store, job_id)
    screen = writable.require_group("screen")
    screen.update_attributes(
        {
            "profile_id": profile_id,
            "threshold": float(profile.threshold),
            "fpr": profile.fpr,
            "n_flagged": int(flags.sum()),
            "scored": _now(),
        }
    )
    chunk = array(writable, "label").chunks
    for name, values in (("score", scores), ("flag", flags)):
        screen.create_array(
            name,
            shape=values.shape,
            chunks=chunk,
            dtype=values.dtype,
            dimension_names=["sample"],
            fill_value=False if values.dtype == bool else np.nan,
            compressors=COMPRESSOR,
            overwrite=True,
        )[:] = values
    publish(store, job_id)
    return scores, flags


def analysis_ids(store: str) -> list[str]:
    try:
        found = zarr.open_group(_location(store), path="analyses", mode="r", use_consolidated=False)
    except FileNotFoundError:
        return []
    return sorted(name for name, _ in found.groups())


def open_analysis(store: str, analysis_id: str) -> zarr.Group:
    """The analysis group, read fresh from the store."""
    try:
        return zarr.open_group(
            _location(store), path=f"analyses/{analysis_id}", mode="r", use_consolidated=False
        )
    except FileNotFoundError:
        raise JobError(f"no analysis {analysis_id!r} in store {store}") from None


def _location(store: str) -> str:
    return store.removeprefix("file://")  # as layout.py: zarr's fsspec store makes no folders


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _version() -> str:
    try:
        return version("actmap")
    except PackageNotFoundError:
        return "unknown"


def new_analysis_id() -> str:
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def _save(
    store: str,
    kind: str,
    job: _Job,
    inputs: Mapping[str, Any],
    headline: Mapping[str, Any],
    results: _Arrays,
    analysis_id: str | None = None,
) -> str:
    """Create `analyses/{id}` with its attrs and arrays (replacing a `queued` placeholder
    the API may have made), then publish it; returns the id."""
    analysis_id = analysis_id or new_analysis_id()
    meta = {
        "kind": kind,
        "state": "succeeded",
        "tenant": job.attrs.get("tenant", "local"),
        "model": job.attrs.get("model"),
        "inputs": dict(inputs),
        "created": _now(),
        "actmap_version": _version(),
        **headline,
    }
    root = zarr.open_group(_location(store), mode="a", use_consolidated=False)
    group = root.require_group("analyses").create_group(
        analysis_id, attributes=meta, overwrite=True
    )
    for path, (values, dims) in results.items():
        text = values.dtype.kind in "OUT"
        parent, _, name = path.rpartition("/")
        out = (group.require_group(parent) if parent else group).create_array(
            name,
            shape=values.shape,
            chunks=tuple(max(1, s) for s in values.shape),
            dtype=str if text else values.dtype,
            dimension_names=dims,
            fill_value="" if text else (False if values.dtype == bool else 0),
            compressors="auto" if text else COMPRESSOR,
        )
        if values.size:
            out[...] = values.astype(object) if text else values
    publish_path(store, f"analyses/{analysis_id}")
    return analysis_id
