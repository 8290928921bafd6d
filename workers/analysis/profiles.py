"""Screening profiles in the store: fitted on a reference job, loaded, and scoring a job.

Owns `fit_profile` (a `ScreeningProfile` fitted on a job's pooled activations and logits,
with its squeezing distances and benign copies when it stores them: storage/squeezed.py;
saved as the analysis kind `screening-profile`), `load_profile`, `screening_spec` (what a
screening of new inputs runs: the reference job's model and the profile's layers, with the
squeezing distances when the profile scores them), and `score_job`, which
scores a job and stores its `screen/score` and `screen/flag` (storage/screen.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from workers.analysis.calibration import check_reference
from workers.analysis.screening import LOGITS, SQUEEZE, ScreeningProfile
from workers.analysis.stats import DEFAULT_BLOCK, iter_rows
from workers.errors import SpecError
from workers.jobs import AnalysisKind, ExtractionSpec
from workers.storage.analyses import Arrays, open_analysis, save
from workers.storage.layout import (
    ERROR_CODE,
    LABEL,
    LAYERS,
    POOLED,
    array,
    attrs,
    open_job,
    read,
)
from workers.storage.layout import LOGITS as STORED_LOGITS
from workers.storage.screen import write_screen
from workers.storage.squeezed import SQUEEZE as SQUEEZED
from workers.storage.squeezed import benign_path, read_rows, stored_copies
from workers.storage.stored_job import Picked, StoredJob, subgroup

__all__ = [
    "check_reference_job",
    "fit_profile",
    "load_profile",
    "score_job",
    "screening_spec",
]

# Rows scored at a time: a screening job is read in blocks of this many samples.
_SCORE_BLOCK = 4096


def _load(picked: Picked, block: int) -> np.ndarray:
    parts = list(iter_rows(picked, block))
    return np.concatenate(parts).astype(np.float64) if parts else np.zeros(picked.shape)


def _logits(job: StoredJob, rows: np.ndarray) -> np.ndarray:
    """The job's logits (n, classes) of `rows`, for the output-score detectors."""
    logits: np.ndarray = np.asarray(job.logits[rows], dtype=np.float64)
    return logits


def check_reference_job(store: str, job_id: str, fpr: float, held_out: float = 0.25) -> None:
    """A reference job too small for `fpr` refused before anything is queued (the fit
    checks again, on the samples that ran)."""
    group = open_job(store, job_id, mode="r")
    labels = np.asarray(read(group, LABEL))
    if not (labels >= 0).all():
        labels = np.zeros(labels.size, dtype=np.int64)  # fitted as one class
    check_reference(labels, fpr, held_out)


def fit_profile(
    store: str,
    reference_job: str,
    layers: Sequence[str] | None = None,
    fpr: float = 0.05,
    adversarial_job: str | None = None,
    *,
    detectors: Sequence[str] | None = None,
    combine: str = "fisher",
    held_out: float = 0.25,
    k: int = 20,
    seed: int = 0,
    block: int = DEFAULT_BLOCK,
    analysis_id: str | None = None,
) -> str:
    """Fit a `ScreeningProfile` on the reference job's pooled activations and logits (with
    its labels when every sample has one), and its squeezing distances and benign copies
    when it stores them (`actmap scan --squeeze --benign`), and store it; `adversarial_job`,
    of the same model, tunes the combination. Returns the profile id, which `score_job`
    takes."""
    ref = StoredJob.finished(store, reference_job)
    names = ref.layers(layers)
    rows = ref.rows()
    x = {layer: _load(Picked(ref.layer(layer, POOLED), rows), block) for layer in names}
    x[LOGITS] = _logits(ref, rows)
    squeezed = SQUEEZED in ref.group
    if squeezed:
        x[SQUEEZE] = read_rows(ref.group, SQUEEZED, rows)
    copies = stored_copies(ref.group)
    benign, benign_of = _benign(ref, names, rows, copies, squeezed)
    labels = ref.column(LABEL)[rows]
    known = bool((labels >= 0).all())
    adversarial = None
    if adversarial_job is not None:
        adv = StoredJob.finished(store, adversarial_job)
        if adv.sha256 != ref.sha256:
            raise SpecError(
                f"adversarial job {adv.id} ran another model than reference job {ref.id}; "
                "extract both with the same model"
            )
        adv_rows = adv.rows()
        adversarial = {
            layer: _load(Picked(adv.layer(layer, POOLED), adv_rows), block)
            for layer in adv.layers(names)
        }
        adversarial[LOGITS] = _logits(adv, adv_rows)
        if squeezed and SQUEEZED not in adv.group:
            raise SpecError(
                f"reference job {ref.id} has squeezing distances and adversarial job {adv.id} "
                "has none; scan the adversarial samples with --squeeze too"
            )
        if squeezed:
            adversarial[SQUEEZE] = read_rows(adv.group, SQUEEZED, adv_rows)
    profile = ScreeningProfile.fit(
        x,
        labels if known else None,
        fpr=fpr,
        held_out=held_out,
        detectors=detectors,
        combine=combine,
        k=k,
        adversarial=adversarial,
        benign=benign,
        benign_of=benign_of,
        seed=seed,
    )
    results: Arrays = {
        "column": (np.asarray([f"{n}/{d}" for n, d in profile.columns], dtype=object), ["column"])
    }
    for name, values in profile.to_arrays().items():
        layer, _, part = name.rpartition("/")
        path = f"{LAYERS}/{layer}/{part}" if layer else name
        results[path] = (
            values,
            _PROFILE_DIMS.get(part, [f"{part}_{i}" for i in range(values.ndim)]),
        )
    stored = profile.to_json()
    headline = {
        "threshold": stored["threshold"],
        "fpr": fpr,
        "calibration_fpr": stored.get("calibration_fpr"),
        "n_calibration": stored.get("n_calibration"),
        "combine": stored["combine"],
        "detectors": stored["detectors"],
        "column_weights": stored.get("column_weights"),
        # What the reference gave beyond activations and logits, so `screen fit` says it.
        "squeeze": "squeeze" in profile.detectors,
        "benign_copies": copies,
        "profile": stored,
    }
    inputs = {
        "reference_job": reference_job,
        "adversarial_job": adversarial_job,
        "layers": names,
        "n_reference": int(rows.size),
        "held_out": held_out,
        "labels": known,
    }
    return save(store, AnalysisKind.SCREENING_PROFILE, ref, inputs, headline, results, analysis_id)


def _benign(
    ref: StoredJob, names: Sequence[str], rows: np.ndarray, copies: list[str], squeezed: bool
) -> tuple[dict[str, np.ndarray] | None, np.ndarray | None]:
    """The stored benign copies of `rows` as one sample mapping, copy after copy, and the
    reference row (0 to rows.size - 1) each copies; None when the job stores none."""
    if not copies:
        return None, None
    parts = []
    for copy in copies:
        part = {n: read_rows(ref.group, benign_path(copy, POOLED, n), rows) for n in names}
        part[LOGITS] = read_rows(ref.group, benign_path(copy, STORED_LOGITS), rows)
        if squeezed:
            part[SQUEEZE] = read_rows(ref.group, benign_path(copy, SQUEEZED), rows)
        parts.append(part)
    found = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    return found, np.tile(np.arange(rows.size), len(copies))


_PROFILE_DIMS = {
    "z_mean": ["column"],
    "z_std": ["column"],
    "coef": ["column"],
    "calibration_scores": ["calibration"],
    "class_means": ["class", "channel"],
    "precision": ["channel", "channel_2"],  # xarray needs two names for a square matrix
    "bank": ["bank", "channel"],
    "fisher_reference": ["negative", "column"],
    "fisher_family_reference": ["negative", "family"],
}


def _profile_attrs(group: Any, profile_id: str) -> dict[str, Any]:
    meta = attrs(group)
    if meta.get("kind") != AnalysisKind.SCREENING_PROFILE:
        raise SpecError(f"analysis {profile_id} is a {meta.get('kind')}, not a screening profile")
    if "profile" not in meta:
        raise SpecError(f"screening profile {profile_id} is {meta.get('state')}, not fitted yet")
    return meta


def screening_spec(store: str, profile_id: str, **fields: Any) -> ExtractionSpec:
    """The spec a screening with the profile runs: its reference job's spec (model, weights,
    preprocessing, roots, inputs) on the profile's layers, on the `screen` queue, scored
    with it; `fields` set the rest (inputs, tenant, roots)."""
    meta = _profile_attrs(open_analysis(store, profile_id), profile_id)
    reference = str(meta["inputs"]["reference_job"])
    spec = attrs(open_job(store, reference, mode="r"))["spec"]
    layers = tuple(str(entry["name"]) for entry in meta["profile"]["layers"])
    return ExtractionSpec.model_validate(
        {**spec, "layers": layers, "labels_csv": None, "labels_from_dirs": False,
         "profile_id": profile_id, "queue": "screen", "channels": None, "top_k": None,
         "max_size": None, "gradcam": (),
         "squeeze": "squeeze" in meta["profile"]["detectors"], "benign": False, **fields}
    )  # fmt: skip


def load_profile(store: str, profile_id: str) -> ScreeningProfile:
    """The stored profile, ready to score; its `meta["model"]` is the model it was fitted on."""
    group = open_analysis(store, profile_id)
    meta = _profile_attrs(group, profile_id)
    arrays: dict[str, np.ndarray] = {
        name: np.asarray(node[:]) for name, node in group.arrays() if name != "column"
    }
    if LAYERS in group:
        for layer, sub in subgroup(group, LAYERS).groups():
            arrays.update({f"{layer}/{n}": np.asarray(node[:]) for n, node in sub.arrays()})
    described = {**meta["profile"], "model": meta["model"], "profile_id": profile_id}
    return ScreeningProfile.from_arrays(arrays, described)


def score_job(
    store: str, job_id: str, profile_id: str, *, finalizing: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Score the job's pooled activations with the profile, block by block, and store them as
    `jobs/{job_id}/screen/score` (N,) float32 and `screen/flag` (N,) bool; failed samples
    get NaN and False. Refuses a job of another model than the profile's. `finalizing`:
    called by finalize, whose job has every batch done but no final state yet."""
    profile = load_profile(store, profile_id)
    job = StoredJob(store, job_id) if finalizing else StoredJob.finished(store, job_id)
    model = profile.meta.get("model", {})
    if job.sha256 != model.get("sha256"):
        raise SpecError(
            f"profile {profile_id} was fitted on another model ({model.get('name')}, "
            f"sha256 {str(model.get('sha256'))[:12]}) than job {job_id} ran "
            f"(sha256 {job.sha256[:12]}); fit a profile on a reference job of this model"
        )
    names = job.layers(list(profile.channels))
    if "squeeze" in profile.detectors and SQUEEZED not in job.group:
        raise SpecError(
            f"profile {profile_id} scores feature squeezing and job {job_id} was extracted "
            "without it; screen with `actmap screen run --profile`, or scan with --squeeze"
        )
    ok = job.column(ERROR_CODE) == 0
    n = ok.size
    scores = np.full(n, np.nan, dtype=np.float32)
    for start in range(0, n, _SCORE_BLOCK):
        keep = ok[start : start + _SCORE_BLOCK]
        if not keep.any():
            continue
        part = {
            layer: np.asarray(job.layer(layer, POOLED)[start : start + keep.size])[keep]
            for layer in names
        }
        if profile.logits:
            part[LOGITS] = np.asarray(job.logits[start : start + keep.size])[keep]
        if "squeeze" in profile.detectors:
            stored = array(job.group, SQUEEZED)[start : start + keep.size]
            part[SQUEEZE] = np.asarray(stored)[keep]
        scores[start : start + keep.size][keep] = profile.score(part)
    flags = np.asarray(ok & (scores > profile.threshold), dtype=bool)
    write_screen(store, job_id, profile_id, float(profile.threshold), profile.fpr, scores, flags)
    return scores, flags
