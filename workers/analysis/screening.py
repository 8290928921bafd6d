"""Adversarial and out-of-distribution screening: the profile fitted on clean data.

Owns fitting, combining and calibrating the detectors of detectors.py, and the profile's
serialisation to plain arrays and JSON (stored in Zarr under analyses/{id}). Fit splits the
clean, labelled reference per class into a part the detectors learn from and a held-out part
that (1) standardises each (layer, detector) score to a z-score, (2) fits a logistic
regression over those z-scores when known adversarial samples are given (otherwise their max
or mean is the score), and (3) places the threshold at the target false-positive rate, as a
conformal quantile: on fresh clean samples like the reference, at most `fpr` are flagged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from sklearn.linear_model import LogisticRegression

from workers.analysis.detectors import Mahalanobis, Neighbours
from workers.errors import SpecError

__all__ = ["DETECTORS", "ScreeningProfile"]

DETECTORS = ("mahalanobis", "knn", "lid")
KIND, VERSION = "screening-profile", 1
# JSON keys the profile itself reads back; the rest is descriptive metadata.
_CORE = {"kind", "version", "layers", "detectors", "k", "combine", "intercept", "fpr", "threshold"}


class ScreeningProfile:
    """A fitted screen: `score` (higher is more suspicious) and `flag` for pooled
    activations of the profile's layers; nothing is refitted when scoring."""

    def __init__(
        self,
        channels: Mapping[str, int],
        detectors: Sequence[str],
        k: int,
        mahalanobis: Mapping[str, Mahalanobis],
        neighbours: Mapping[str, Neighbours],
        meta: Mapping[str, Any],
    ) -> None:
        self.channels = dict(channels)
        # Columns follow DETECTORS' order, whatever order they were asked in.
        self.detectors = tuple(d for d in DETECTORS if d in detectors)
        self.k = k
        self.columns = [(layer, d) for layer in self.channels for d in self.detectors]
        self._mahalanobis = dict(mahalanobis)
        self._neighbours = dict(neighbours)
        self.meta = dict(meta)
        self.z_mean = np.zeros(len(self.columns))
        self.z_std = np.ones(len(self.columns))
        self.combine = "max"
        self.coef = np.zeros(len(self.columns))
        self.intercept = 0.0
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
        detectors: Sequence[str] = DETECTORS,
        k: int = 20,
        bank_size: int = 4096,
        combine: Literal["max", "mean"] = "max",
        adversarial: Mapping[str, npt.ArrayLike] | None = None,
        seed: int = 0,
    ) -> ScreeningProfile:
        """Fit on clean pooled activations {layer: (N, C)} with their class labels (N,)
        (None: one class). `adversarial` {layer: (M, C)}, when given, replaces `combine`
        with a logistic regression over the held-out clean and these samples."""
        _check_options(detectors, fpr, held_out, combine)
        x = _layers(reference)
        n = next(iter(x.values())).shape[0]
        y = np.zeros(n, dtype=np.int64) if labels is None else np.asarray(labels)
        if y.shape != (n,) or (y < 0).any():
            raise SpecError(f"give a known label (>= 0) for each of the {n} reference samples")
        rng = np.random.default_rng(seed)
        fit_rows, cal_rows = _split(y, held_out, rng)
        # A logistic combination learns from half the held-out samples and the threshold
        # comes from the other half: a threshold set on the combination's own training data
        # flags too few fresh clean samples.
        learn_rows, threshold_rows = cal_rows[:0], cal_rows
        if adversarial is not None:
            shuffled = rng.permutation(cal_rows)
            learn_rows, threshold_rows = np.split(shuffled, [cal_rows.size // 2])
        if int(fpr * (threshold_rows.size + 1)) < 1:
            raise SpecError(
                f"a false-positive rate of {fpr} needs at least {int(np.ceil(1 / fpr)) - 1} "
                f"held-out clean samples, got {threshold_rows.size}; give more or raise fpr"
            )
        fit_x = _take(x, fit_rows)
        maha = {}
        if "mahalanobis" in detectors:
            maha = {name: Mahalanobis.fit(v, y[fit_rows]) for name, v in fit_x.items()}
        knn = {}
        if {"knn", "lid"} & set(detectors):
            knn = {name: Neighbours.fit(v, k, bank_size, rng) for name, v in fit_x.items()}
        meta = {
            "classes": np.unique(y).tolist(),
            "n_fit": int(fit_rows.size),
            "n_calibration": int(cal_rows.size),
            "n_threshold": int(threshold_rows.size),
            "seed": seed,
        }
        channels = {name: v.shape[1] for name, v in x.items()}
        profile = cls(channels, detectors, k, maha, knn, meta)
        profile._standardise(_take(x, cal_rows))
        profile.combine = combine
        if adversarial is not None:
            profile._learn_combination(_take(x, learn_rows), adversarial)
        profile._calibrate(_take(x, threshold_rows), fpr)
        return profile

    def layer_scores(self, pooled_by_layer: Mapping[str, npt.ArrayLike]) -> np.ndarray:
        """(n, len(columns)): each (layer, detector) score as a z-score of held-out clean
        data; shows which layer and detector made a sample suspicious."""
        z: np.ndarray = (self._raw(pooled_by_layer) - self.z_mean) / self.z_std
        return z

    def score(self, pooled_by_layer: Mapping[str, npt.ArrayLike]) -> np.ndarray:
        """(n,) combined score of pooled activations {layer: (n, C)} (or (C,) for one)."""
        return self._combined(self._raw(pooled_by_layer))

    def flag(self, pooled_by_layer: Mapping[str, npt.ArrayLike]) -> np.ndarray:
        """(n,) bool: the score is above the threshold calibrated at `fpr`."""
        flagged: np.ndarray = self.score(pooled_by_layer) > self.threshold
        return flagged

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays: per layer `{layer}/{name}`, profile-wide names without a slash."""
        arrays = {
            "z_mean": self.z_mean,
            "z_std": self.z_std,
            "coef": self.coef,
            "calibration_scores": self.calibration_scores,
        }
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
            "detectors": list(self.detectors),
            "k": self.k,
            "combine": self.combine,
            "intercept": self.intercept,
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
            profile = cls(channels, detectors, k, maha, knn, meta)
            profile.z_mean, profile.z_std = a["z_mean"], a["z_std"]
            profile.coef, profile.calibration_scores = a["coef"], a["calibration_scores"]
        except KeyError as missing:
            raise SpecError(f"the screening profile lacks {missing}; refit it") from None
        profile.combine, profile.intercept = json["combine"], float(json["intercept"])
        profile.fpr, profile.threshold = float(json["fpr"]), float(json["threshold"])
        return profile

    def _standardise(self, clean: Mapping[str, np.ndarray]) -> None:
        raw = self._raw(clean)
        self.z_mean = raw.mean(axis=0)
        std = raw.std(axis=0)
        self.z_std = np.where(std > 0, std, 1.0)

    def _learn_combination(
        self, clean: Mapping[str, np.ndarray], adversarial: Mapping[str, npt.ArrayLike]
    ) -> None:
        features = [self.layer_scores(clean), self.layer_scores(adversarial)]
        target = np.r_[np.zeros(features[0].shape[0]), np.ones(features[1].shape[0])]
        model = LogisticRegression(class_weight="balanced", max_iter=1000)
        model.fit(np.concatenate(features), target)
        self.combine = "logistic"
        self.coef = np.asarray(model.coef_[0], dtype=np.float64)
        self.intercept = float(model.intercept_[0])

    def _calibrate(self, clean: Mapping[str, np.ndarray], fpr: float) -> None:
        scores = self.score(clean)
        self.fpr = fpr
        self.threshold = _conformal_threshold(scores, fpr)
        self.calibration_scores = scores
        self.meta["calibration_fpr"] = float(np.mean(scores > self.threshold))

    def _raw(self, pooled_by_layer: Mapping[str, npt.ArrayLike]) -> np.ndarray:
        x = _layers(pooled_by_layer, self.channels)
        columns = []
        for layer in self.channels:
            if "mahalanobis" in self.detectors:
                columns.append(self._mahalanobis[layer].score(x[layer])[:, None])
            if {"knn", "lid"} & set(self.detectors):
                near = self._neighbours[layer].score(x[layer])
                picked = [DETECTORS.index(d) - 1 for d in self.detectors if d != "mahalanobis"]
                columns.append(near[:, picked])
        return np.concatenate(columns, axis=1) if columns else np.zeros((0, 0))

    def _combined(self, raw: np.ndarray) -> np.ndarray:
        z = (raw - self.z_mean) / self.z_std
        out: np.ndarray
        if self.combine == "logistic":
            out = z @ self.coef + self.intercept
        elif self.combine == "mean":
            out = z.mean(axis=1)
        else:
            out = z.max(axis=1)
        return out


def _layers(
    pooled_by_layer: Mapping[str, npt.ArrayLike], channels: Mapping[str, int] | None = None
) -> dict[str, np.ndarray]:
    """{layer: (n, C) float64}, checked: one n for all, C as the profile expects."""
    names = list(pooled_by_layer) if channels is None else list(channels)
    missing = [name for name in names if name not in pooled_by_layer]
    if missing or not names:
        raise SpecError(
            f"pooled activations of layers {missing or '(any)'} are needed; extract them"
        )
    x = {}
    for name in names:
        v = np.asarray(pooled_by_layer[name], dtype=np.float64)
        v = v[None] if v.ndim == 1 else v
        want = v.shape[1] if channels is None else channels[name]
        if v.ndim != 2 or v.shape[1] != want:
            raise SpecError(f"layer {name} needs pooled activations (n, {want}), got {v.shape}")
        x[name] = v
    if len({v.shape[0] for v in x.values()}) != 1 or next(iter(x.values())).shape[0] == 0:
        raise SpecError("give every layer the same, non-zero number of samples")
    return x


def _check_options(detectors: Sequence[str], fpr: float, held_out: float, combine: str) -> None:
    if not set(detectors) <= set(DETECTORS) or not detectors:
        raise SpecError(f"detectors are some of {', '.join(DETECTORS)}; got {list(detectors)}")
    if not 0.0 < fpr < 1.0 or not 0.0 < held_out < 1.0:
        raise SpecError(f"fpr and held_out are shares in (0, 1), got {fpr} and {held_out}")
    if combine not in ("max", "mean"):
        raise SpecError(f"combine is 'max' or 'mean', got {combine!r}")


def _take(x: Mapping[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {name: v[rows] for name, v in x.items()}


def _split(
    labels: np.ndarray, held_out: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Rows to fit on and held-out rows, per class, keeping at least one of each class to fit."""
    cal = []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        cal.append(rows[: min(round(held_out * rows.size), rows.size - 1)])
    held = np.sort(np.concatenate(cal))
    return np.setdiff1d(np.arange(labels.size), held), held


def _conformal_threshold(scores: np.ndarray, fpr: float) -> float:
    """The k-th largest held-out score, k = floor(fpr (n + 1)): a fresh clean score lies above
    it with probability k / (n + 1) <= fpr (exchangeability)."""
    k = int(fpr * (scores.size + 1))
    return float(np.sort(scores)[::-1][k - 1])


def _under(arrays: Mapping[str, np.ndarray], layer: str) -> dict[str, np.ndarray]:
    prefix = f"{layer}/"
    return {n[len(prefix) :]: a for n, a in arrays.items() if n.startswith(prefix)}
