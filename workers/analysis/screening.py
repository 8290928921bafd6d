"""Adversarial and out-of-distribution screening: the profile fitted on clean data.

Owns fitting, combining and calibrating the detectors, and the profile's serialisation to
plain arrays and JSON (stored in Zarr under analyses/{id}). A sample is described by a
mapping: each profiled layer's pooled activations (n, C), and optionally the model's logits
under the key LOGITS (n, K) and the feature-squeezing distances under SQUEEZE (n, 2); the
columns are the per-layer detectors of detectors.py (mahalanobis, knn, lid), the output
scores of output_scores.py (msp, energy, margin) and the squeezing distance of
workers/extraction/squeezing.py.

Fit splits the clean, labelled reference per class into a part the per-layer detectors learn
from and a held-out part that (1) standardises each column to a z-score, (2) learns how to
combine the columns, and (3) places the threshold at the target false-positive rate, as a
conformal quantile: on fresh clean samples like the reference, at most `fpr` are flagged.
The combination is learned from clean data alone. "fisher", the default (combining.py):
each column becomes an empirical p-value against held-out clean samples and, when given,
their `benign` copies (noise, blur, JPEG-like quantisation of clean samples:
extraction.squeezing.benign_corruptions), so that being as far from clean as a corruption
weighs nothing; Fisher's method combines them within the feature-space and the output-space
columns, then across the two. "weighted" scales each z-score down by how far the benign
copies reach and takes the maximum; "max" and "mean" take the plain maximum and mean of the
z-scores. Known adversarial samples, when given, keep only the columns that tell them from
the clean and benign samples. Every held-out sample both teaches the combination and places
the threshold, through cross-fitting (calibration.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from workers.analysis.auroc import rank_auroc
from workers.analysis.calibration import (
    check_reference,
    conformal_threshold,
    cross_fitted,
    held_out_share,
    split,
)
from workers.analysis.combining import COMBINE, Combination, FisherCombination, families_of
from workers.analysis.detectors import Mahalanobis, Neighbours
from workers.analysis.output_scores import OUTPUT_SCORES, output_scores
from workers.errors import SpecError
from workers.jobs import AnalysisKind

__all__ = [
    "COMBINE",
    "DEFAULT_DETECTORS",
    "DETECTORS",
    "LOGITS",
    "SQUEEZE",
    "ScreeningProfile",
]

LAYER_DETECTORS = ("mahalanobis", "knn", "lid")
DETECTORS = (*LAYER_DETECTORS, *OUTPUT_SCORES, "squeeze")
# msp and energy are left out by default: near the top they move with the margin, and
# Fisher's method would count one signal three times.
DEFAULT_DETECTORS = (*LAYER_DETECTORS, "margin", "squeeze")
# Keys of the model's logits and of the squeezing distances in a sample's mapping: a ':'
# never occurs in a module's dotted name, so they cannot collide with a layer.
LOGITS, SQUEEZE = ":logits", ":squeeze"
KIND, VERSION = AnalysisKind.SCREENING_PROFILE.value, 2
# JSON keys the profile itself reads back; the rest is descriptive metadata.
_CORE = {
    "kind",
    "version",
    "layers",
    "detectors",
    "k",
    "combine",
    "intercept",
    "fpr",
    "threshold",
    "logits",
}


class ScreeningProfile:
    """A fitted screen: `score` (higher is more suspicious) and `flag` for a sample mapping
    (see the module's docstring); nothing is refitted when scoring."""

    def __init__(
        self,
        channels: Mapping[str, int],
        detectors: Sequence[str],
        k: int,
        mahalanobis: Mapping[str, Mahalanobis],
        neighbours: Mapping[str, Neighbours],
        meta: Mapping[str, Any],
        logits: int = 0,
    ) -> None:
        self.channels = dict(channels)
        # Columns follow DETECTORS' order, whatever order they were asked in.
        self.detectors = tuple(d for d in DETECTORS if d in detectors)
        self.k = k
        self.logits = logits  # classes of the logits the output scores read; 0: none
        per_layer = [d for d in self.detectors if d in LAYER_DETECTORS]
        self.columns = [(layer, d) for layer in self.channels for d in per_layer]
        self.columns += [("logits", d) for d in self.detectors if d in OUTPUT_SCORES]
        self.columns += [("input", "squeeze")] if "squeeze" in self.detectors else []
        self._mahalanobis = dict(mahalanobis)
        self._neighbours = dict(neighbours)
        self.meta = dict(meta)
        self.z_mean = np.zeros(len(self.columns))
        self.z_std = np.ones(len(self.columns))
        self.combination = Combination("max", np.ones(len(self.columns)))
        self.fpr = 1.0
        self.threshold = -np.inf
        self.calibration_scores = np.zeros(0)

    @classmethod
    def fit(
        cls,
        reference: Mapping[str, npt.ArrayLike],
        labels: npt.ArrayLike | None = None,
        *,
        fpr: float = 0.05,
        held_out: float = 0.25,
        detectors: Sequence[str] | None = None,
        k: int = 20,
        bank_size: int = 4096,
        combine: str = "fisher",
        adversarial: Mapping[str, npt.ArrayLike] | None = None,
        benign: Mapping[str, npt.ArrayLike] | None = None,
        benign_of: npt.ArrayLike | None = None,
        seed: int = 0,
    ) -> ScreeningProfile:
        """Fit on a clean reference mapping {layer: (N, C), LOGITS: (N, K), SQUEEZE: (N, 2)}
        with its class labels (N,) (None: one class). `detectors` None takes those of
        DEFAULT_DETECTORS whose input the reference has. `benign` {same keys: (M, ...)}
        are corrupted copies of reference samples, `benign_of` (M,) the reference row each
        copies (None: of other samples); copies of held-out rows teach the "fisher" and
        "weighted" combinations. `adversarial`,
        when given, keeps the columns that tell it from clean and benign samples."""
        x = _inputs(reference)
        layers = [name for name in x if name not in (LOGITS, SQUEEZE)]
        if detectors is None:
            detectors = [d for d in DEFAULT_DETECTORS if _has_input(d, x, layers)]
        _check_options(detectors, fpr, held_out, combine)
        missing = [d for d in detectors if not _has_input(d, x, layers)]
        if missing:
            raise SpecError(
                f"detectors {missing} need inputs the reference lacks (layers, logits or "
                "squeezing distances); extract them or leave those detectors out"
            )
        n = next(iter(x.values())).shape[0]
        y = np.zeros(n, dtype=np.int64) if labels is None else np.asarray(labels)
        if y.shape != (n,) or (y < 0).any():
            raise SpecError(f"give a known label (>= 0) for each of the {n} reference samples")
        rng = np.random.default_rng(seed)
        share = held_out_share(held_out, fpr, n)
        fit_rows, cal_rows = split(y, share, rng)
        check_reference(y, fpr, share)
        fit_x = {name: x[name][fit_rows] for name in layers}
        maha = {}
        if "mahalanobis" in detectors:
            maha = {name: Mahalanobis.fit(v, y[fit_rows]) for name, v in fit_x.items()}
        knn = {}
        if {"knn", "lid"} & set(detectors):
            knn = {name: Neighbours.fit(v, k, bank_size, rng) for name, v in fit_x.items()}
        meta: dict[str, Any] = {
            "classes": np.unique(y).tolist(),
            "n_fit": int(fit_rows.size),
            "n_calibration": int(cal_rows.size),
            "seed": seed,
        }
        channels = {name: x[name].shape[1] for name in layers}
        n_logits = x[LOGITS].shape[1] if LOGITS in x and set(OUTPUT_SCORES) & set(detectors) else 0
        profile = cls(channels, detectors, k, maha, knn, meta, n_logits)
        cal_x = _take(x, cal_rows)
        profile._standardise(cal_x)
        z = profile.layer_scores(cal_x)
        z_benign = z_adversarial = source = None
        if benign is not None:
            copies, source = _benign_rows(benign, benign_of, cal_rows, n)
            z_benign = profile.layer_scores(_take(_inputs(benign), copies))
            profile._report("benign_auroc", z_benign, z)
        if adversarial is not None:
            z_adversarial = profile.layer_scores(adversarial)
            negatives = z if z_benign is None else np.concatenate([z, z_benign])
            profile._report("adversarial_auroc", z_adversarial, negatives)
        families = families_of([layer for layer, _ in profile.columns])

        def learned(rows: np.ndarray) -> Combination:
            # The benign copies of `rows` only (all of them when their sources are unknown).
            b = z_benign
            if b is not None and source is not None:
                b = b[(source < 0) | np.isin(source, rows)]
            return Combination.learn(combine, families, z[rows], b, z_adversarial)

        profile.combination = learned(np.arange(cal_rows.size))
        # The combination learned from these rows: each is scored by one learned without
        # it (calibration.py).
        scores = cross_fitted(cal_rows.size, lambda rows, out: learned(rows).score(z[out]), seed)
        profile._calibrate(scores, fpr)
        profile.meta["column_weights"] = {
            f"{layer}/{d}": round(float(w), 4)
            for (layer, d), w in zip(profile.columns, profile.combination.coef, strict=True)
        }
        return profile

    def layer_scores(self, sample: Mapping[str, npt.ArrayLike]) -> np.ndarray:
        """(n, len(columns)): each column's score as a z-score of held-out clean data;
        shows which layer and detector made a sample suspicious."""
        z: np.ndarray = (self._raw(sample) - self.z_mean) / self.z_std
        return z

    def score(self, sample: Mapping[str, npt.ArrayLike]) -> np.ndarray:
        """(n,) combined score of a sample mapping {layer: (n, C), ...} (or (C,) for one)."""
        return self._combined(self._raw(sample))

    def flag(self, sample: Mapping[str, npt.ArrayLike]) -> np.ndarray:
        """(n,) bool: the score is above the threshold calibrated at `fpr`."""
        flagged: np.ndarray = self.score(sample) > self.threshold
        return flagged

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays: per layer `{layer}/{name}`, profile-wide names without a slash."""
        arrays = {
            "z_mean": self.z_mean,
            "z_std": self.z_std,
            "coef": self.combination.coef,
            "calibration_scores": self.calibration_scores,
        }
        fisher = self.combination.fisher
        if fisher is not None:
            arrays["fisher_reference"] = fisher.reference
            arrays["fisher_family_reference"] = fisher.family_reference
        for layer in self.channels:
            for part in (self._mahalanobis.get(layer), self._neighbours.get(layer)):
                if part is not None:
                    arrays.update({f"{layer}/{n}": a for n, a in part.to_arrays().items()})
        return arrays

    def to_json(self) -> dict[str, Any]:
        """Everything else, as JSON types; floats survive a JSON round trip exactly."""
        return {
            "kind": KIND,
            "version": VERSION,
            "layers": [{"name": n, "channels": c} for n, c in self.channels.items()],
            "logits": self.logits,
            "detectors": list(self.detectors),
            "k": self.k,
            "combine": self.combination.combine,
            "intercept": 0.0,
            "fpr": self.fpr,
            "threshold": float(self.threshold),
            **self.meta,
        }

    @classmethod
    def from_arrays(
        cls, arrays: Mapping[str, npt.ArrayLike], json: Mapping[str, Any]
    ) -> ScreeningProfile:
        """The profile `to_arrays` and `to_json` describe, ready to score."""
        if json.get("kind") != KIND or json.get("version") != VERSION:
            raise SpecError(f"not a {KIND} of version {VERSION}; refit the screening profile")
        a = {name: np.asarray(value) for name, value in arrays.items()}
        channels = {entry["name"]: int(entry["channels"]) for entry in json["layers"]}
        detectors, k = tuple(json["detectors"]), int(json["k"])
        try:
            maha = {}
            if "mahalanobis" in detectors:
                maha = {n: Mahalanobis.from_arrays(_under(a, n)) for n in channels}
            knn = {}
            if {"knn", "lid"} & set(detectors):
                knn = {n: Neighbours.from_arrays(_under(a, n), k) for n in channels}
            meta = {key: value for key, value in json.items() if key not in _CORE}
            profile = cls(channels, detectors, k, maha, knn, meta, int(json["logits"]))
            profile.z_mean, profile.z_std = a["z_mean"], a["z_std"]
            profile.calibration_scores, coef = a["calibration_scores"], a["coef"]
            fisher = None
            if json["combine"] == "fisher":
                fisher = FisherCombination(
                    a["fisher_reference"], a["fisher_family_reference"],
                    families_of([layer for layer, _ in profile.columns]), coef > 0,
                )  # fmt: skip
        except KeyError as missing:
            raise SpecError(f"the screening profile lacks {missing}; refit it") from None
        profile.combination = Combination(json["combine"], coef, fisher)
        profile.fpr, profile.threshold = float(json["fpr"]), float(json["threshold"])
        return profile

    def _standardise(self, clean: Mapping[str, np.ndarray]) -> None:
        raw = self._raw(clean)
        self.z_mean = raw.mean(axis=0)
        std = raw.std(axis=0)
        self.z_std = np.where(std > 0, std, 1.0)

    def _report(self, key: str, positives: np.ndarray, negatives: np.ndarray) -> None:
        """meta[key]: how well each column tells `positives` from `negatives` (AUROC)."""
        tells = rank_auroc(np.concatenate([positives, negatives]), positives.shape[0])
        self.meta[key] = {
            f"{layer}/{d}": round(float(a), 4)
            for (layer, d), a in zip(self.columns, tells, strict=True)
        }

    def _calibrate(self, scores: np.ndarray, fpr: float) -> None:
        self.fpr = fpr
        self.threshold = conformal_threshold(scores, fpr)
        self.calibration_scores = scores
        self.meta["calibration_fpr"] = float(np.mean(scores > self.threshold))

    def _raw(self, sample: Mapping[str, npt.ArrayLike]) -> np.ndarray:
        x = _inputs(sample, self._expected())
        columns = []
        per_layer = [d for d in self.detectors if d in LAYER_DETECTORS]
        picked = [LAYER_DETECTORS.index(d) - 1 for d in per_layer if d != "mahalanobis"]
        for layer in self.channels:
            if "mahalanobis" in per_layer:
                columns.append(self._mahalanobis[layer].score(x[layer])[:, None])
            if picked:
                columns.append(self._neighbours[layer].score(x[layer])[:, picked])
        outputs = [OUTPUT_SCORES.index(d) for d in self.detectors if d in OUTPUT_SCORES]
        if outputs:
            columns.append(output_scores(x[LOGITS])[:, outputs])
        if "squeeze" in self.detectors:
            # Xu et al. score the largest change over the squeezers.
            columns.append(x[SQUEEZE].max(axis=1, keepdims=True))
        return np.concatenate(columns, axis=1)

    def _expected(self) -> dict[str, int]:
        wanted = dict(self.channels)
        if any(d in OUTPUT_SCORES for d in self.detectors):
            wanted[LOGITS] = self.logits
        if "squeeze" in self.detectors:
            wanted[SQUEEZE] = 2
        return wanted

    def _combined(self, raw: np.ndarray) -> np.ndarray:
        return self.combination.score((raw - self.z_mean) / self.z_std)


def _has_input(detector: str, x: Mapping[str, np.ndarray], layers: Sequence[str]) -> bool:
    if detector in LAYER_DETECTORS:
        return bool(layers)
    return (LOGITS if detector in OUTPUT_SCORES else SQUEEZE) in x


def _benign_rows(
    benign: Mapping[str, npt.ArrayLike], benign_of: npt.ArrayLike | None, rows: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """The benign copies that may teach the combination: those of `rows` (held-out samples,
    which the per-layer detectors never saw), or every copy when their sources are unknown;
    and each one's source as a position in `rows` (-1: unknown)."""
    m = np.asarray(next(iter(benign.values()))).shape[0]
    if benign_of is None:
        return np.arange(m), np.full(m, -1)
    of = np.asarray(benign_of)
    if of.shape != (m,) or (of < 0).any() or (of >= n).any():
        raise SpecError(f"benign_of gives the reference row (0 to {n - 1}) of each of {m} copies")
    picked = np.flatnonzero(np.isin(of, rows))
    if picked.size == 0:
        raise SpecError("no benign copy is of a held-out reference sample; copy every sample")
    return picked, np.searchsorted(rows, of[picked])


def _inputs(
    sample: Mapping[str, npt.ArrayLike], expected: Mapping[str, int] | None = None
) -> dict[str, np.ndarray]:
    """{key: (n, width) float64}, checked: one n for all, widths as the profile expects."""
    names = list(sample) if expected is None else list(expected)
    missing = [name for name in names if name not in sample]
    if missing or not names:
        shown = [{LOGITS: "logits", SQUEEZE: "squeezing"}.get(m, m) for m in missing]
        raise SpecError(f"pooled activations of layers {shown or '(any)'} are needed; extract them")
    x = {}
    for name in names:
        v = np.asarray(sample[name], dtype=np.float64)
        v = v[None] if v.ndim == 1 else v
        want = v.shape[1] if expected is None else expected[name]
        if v.ndim != 2 or v.shape[1] != want:
            raise SpecError(f"{_shown(name)} needs (n, {want}) values, got {v.shape}")
        x[name] = v
    if len({v.shape[0] for v in x.values()}) != 1 or next(iter(x.values())).shape[0] == 0:
        raise SpecError("give every layer the same, non-zero number of samples")
    return x


def _shown(key: str) -> str:
    return {LOGITS: "the logits", SQUEEZE: "the squeezing distances"}.get(key, f"layer {key}")


def _check_options(detectors: Sequence[str], fpr: float, held_out: float, combine: str) -> None:
    if not set(detectors) <= set(DETECTORS) or not detectors:
        raise SpecError(f"detectors are some of {', '.join(DETECTORS)}; got {list(detectors)}")
    if not 0.0 < fpr < 1.0 or not 0.0 < held_out < 1.0:
        raise SpecError(f"fpr and held_out are shares in (0, 1), got {fpr} and {held_out}")
    if combine not in COMBINE:
        raise SpecError(f"combine is one of {', '.join(COMBINE)}; got {combine!r}")


def _take(x: Mapping[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {name: v[rows] for name, v in x.items()}


def _under(arrays: Mapping[str, np.ndarray], layer: str) -> dict[str, np.ndarray]:
    prefix = f"{layer}/"
    return {n[len(prefix) :]: a for n, a in arrays.items() if n.startswith(prefix)}
