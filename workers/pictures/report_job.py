"""What a report tells of one job, read through storage/stored_job.py: confidences, the
representative samples, accuracy and failures, the inputs as pictures, each layer's health.

Reads are bounded: per-sample columns and logits in blocks of rows, activations one
sample at a time, health in one streaming pass per layer.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from PIL import Image, UnidentifiedImageError

from workers.analysis.health import FilterHealth, layer_health
from workers.analysis.stats import Rows, iter_rows
from workers.errors import ActmapError, InputError, SampleCode, SpecError
from workers.extraction.inputs import IMAGE_SUFFIXES, OutsideRoots, decode, fd_path, opened
from workers.jobs import CONV_TYPES, Preprocessing
from workers.storage.layout import ERROR_CODE, ERROR_MESSAGE, LABEL, PRED
from workers.storage.stored_job import Picked, StoredJob, StoredLayer

__all__ = ["Pick", "ReportJob", "health", "input_image"]

# Activations with a ceiling, where "saturated" (at the ceiling) can be judged.
CLIPS = {"ReLU6": 6.0, "Sigmoid": 1.0, "Hardsigmoid": 1.0, "Hardtanh": 1.0, "Tanh": 1.0}
MAX_INPUT_SIDE = 512  # an input is shrunk to this before it is drawn


class TooManyPixels(SpecError):
    """Raised when an input image is larger than the workers decode (Pillow's
    `MAX_IMAGE_PIXELS`, the limit workers/extraction/inputs.py applies): it is never drawn."""


def _over_limit(source: str, size: str) -> TooManyPixels:
    return TooManyPixels(
        f"the input {Path(source).name} is {size} {Image.MAX_IMAGE_PIXELS} pixels the workers "
        "decode; draw the maps without it (image=false)"
    )


def _within_pixel_limit(source: str, size: tuple[int, int]) -> None:
    """From the header alone, before any pixel is decoded."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and size[0] * size[1] > limit:
        raise _over_limit(source, f"{size[0]}x{size[1]}, over the")


def input_image(
    source: str, prep: dict[str, Any] | None, roots: tuple[str, ...] | None = None
) -> np.ndarray | None:
    """What a sample looked like: an image file as it is, any other input (arrays,
    binaries) decoded as the model saw it with `prep`; None when it cannot be read here.
    With `roots` (a tenant's job), the file is opened beneath them and read from that open
    file only; one that now lies outside them or behind a link raises OutsideRoots."""
    if not source:
        return None
    try:
        if Path(source).suffix.lower() in IMAGE_SUFFIXES:
            with opened(source, roots) as fd:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    return None
                with Image.open(fd_path(fd)) as image:
                    _within_pixel_limit(source, image.size)
                    picture = image.convert("L" if image.mode in ("1", "L", "I;16") else "RGB")
            picture.thumbnail((MAX_INPUT_SIDE, MAX_INPUT_SIDE))
            return np.asarray(picture)
        if prep is None:
            return None
        x = decode(source, Preprocessing.model_validate(prep), roots=roots)
        return x[0] if x.shape[0] == 1 else np.moveaxis(x, 0, -1)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _over_limit(source, "over twice the limit of") from None
    except (OutsideRoots, TooManyPixels):
        raise
    except InputError as exc:
        if exc.code == SampleCode.OUTSIDE_ROOTS:
            raise OutsideRoots(str(exc)) from None
        return None
    except (OSError, ValueError, UnidentifiedImageError, ActmapError):
        return None


def health(layer: StoredLayer, ok: np.ndarray) -> tuple[FilterHealth | None, str]:
    """The layer's health over the samples that ran, and what it was computed from."""
    if not ok.any():
        return None, "no sample ran"
    source = layer.pooled if layer.top_k else layer.acts
    rows: Rows = source if ok.all() else Picked(source, np.flatnonzero(ok))
    how = "pooled (top-k storage)" if layer.top_k else "acts"
    return layer_health(rows, clip=CLIPS.get(layer.type)), how


@dataclass(frozen=True)
class Pick:
    role: str
    row: int
    why: str


def _confidence(logits: zarr.Array[Any]) -> np.ndarray:
    """The softmax maximum of each row, NaN where the logits are not all finite."""
    parts = []
    for block in iter_rows(logits):
        z = np.asarray(block, dtype=np.float64)
        good = np.isfinite(z).all(axis=1) & (z.shape[1] > 0)
        conf = np.full(z.shape[0], np.nan)
        if good.any():
            zg = z[good] - z[good].max(axis=1, keepdims=True)
            p = np.exp(zg)
            conf[good] = (p / p.sum(axis=1, keepdims=True)).max(axis=1)
        parts.append(conf)
    return np.concatenate(parts) if parts else np.zeros(0)


def _seconds(start: object, end: object) -> float | None:
    try:
        return (
            datetime.fromisoformat(str(end)) - datetime.fromisoformat(str(start))
        ).total_seconds()
    except ValueError:
        return None


class ReportJob(StoredJob):
    """A stored job as its report tells it."""

    @cached_property
    def confidence(self) -> np.ndarray:
        return _confidence(self.logits)

    @cached_property
    def ok(self) -> np.ndarray:
        return np.asarray((self.column(ERROR_CODE) == 0) & np.isfinite(self.confidence))

    @cached_property
    def known(self) -> np.ndarray:
        """Samples that ran and have a label."""
        return np.asarray(self.ok & (self.column(LABEL) >= 0))

    @cached_property
    def hit(self) -> np.ndarray:
        """Samples predicted as their label."""
        return np.asarray(self.column(PRED) == self.column(LABEL))

    @cached_property
    def layers_stored(self) -> list[StoredLayer]:
        return self.stored()

    @property
    def n_failed(self) -> int:
        return int(np.count_nonzero(self.column(ERROR_CODE)))

    @property
    def state(self) -> str:
        return str(self.attrs.get("state", "?"))

    @property
    def reason(self) -> str:
        return str(self.attrs.get("reason") or "")

    @property
    def model(self) -> dict[str, Any]:
        return dict(self.attrs.get("model", {}))

    @property
    def n_classes(self) -> int:
        return int(self.logits.shape[1])

    @property
    def preprocessing(self) -> dict[str, Any] | None:
        spec = self.attrs.get("spec", {}).get("preprocessing")
        found = spec or self.attrs.get("catalogue", {}).get("preprocessing")
        return dict(found) if found else None

    @property
    def elapsed_s(self) -> float | None:
        if self.attrs.get("elapsed_s") is not None:
            return float(self.attrs["elapsed_s"])
        if self.attrs.get("finished") and self.attrs.get("created"):
            return _seconds(self.attrs["created"], self.attrs["finished"])
        return None

    @property
    def samples_per_s(self) -> float | None:
        if self.attrs.get("samples_per_s"):
            return float(self.attrs["samples_per_s"])
        elapsed = self.elapsed_s
        return self.n / elapsed if elapsed else None

    @property
    def accuracy(self) -> str | None:
        known = self.known
        if not known.any():
            return None
        right = int(np.count_nonzero(self.hit[known]))
        return f"{right}/{int(known.sum())} ({100 * right / int(known.sum()):.1f}%)"

    def sample(self, row: int) -> str:
        return str(self.samples[row])

    def class_name(self, index: int) -> str:
        names = self.attrs.get("classes") or []
        return str(names[index]) if 0 <= index < len(names) else str(index)

    def verdict(self, row: int) -> str:
        said = f"predicted {self.class_name(int(self.column(PRED)[row]))}"
        said += f" with probability {self.confidence[row]:.2f}"
        label = int(self.column(LABEL)[row])
        return said + (f", labelled {self.class_name(label)}" if label >= 0 else ", label unknown")

    def stored_shape(self, name: str) -> str:
        for layer in self.layers_stored:
            if layer.name == name:
                return f"{tuple(layer.acts.shape)} {layer.stored_dtype}"
        return ""

    def receptive_field(self, name: str) -> str:
        """`receptive field 21x21, stride 4` for a layer the catalogue knows one of."""
        row = next((r for r in self.catalogue if r["name"] == name), None)
        if row is None or not row.get("receptive_field"):
            return ""
        size = "x".join(map(str, row["receptive_field"]))
        stride = "x".join(map(str, row.get("rf_stride") or ["?"]))
        return f"receptive field {size}, stride {stride}"

    def failures_by_code(self) -> dict[str, int]:
        names = self.attrs.get("error_codes", {})
        codes = self.column(ERROR_CODE)
        counted = Counter(int(c) for c in codes[codes != 0])
        return {names.get(str(c), str(c)): k for c, k in sorted(counted.items())}

    def failures(self, limit: int) -> list[tuple[str, str, str]]:
        names = self.attrs.get("error_codes", {})
        codes, messages = self.column(ERROR_CODE), self.column(ERROR_MESSAGE)
        rows = np.flatnonzero(codes)[:limit]
        return [(self.sample(r), names.get(str(int(codes[r])), ""), str(messages[r])) for r in rows]

    def representatives(self) -> tuple[list[Pick], str]:
        """A correct, a misclassified and a low-confidence sample;
        with no labels, the most and the least confident instead."""
        picks: list[Pick] = []
        conf = np.where(self.ok, self.confidence, np.nan)

        def best(mask: np.ndarray, sign: float) -> int:
            return int(np.flatnonzero(mask)[np.argmax(sign * conf[mask])])

        known = self.known
        note = ""
        if known.any():
            right, wrong = known & self.hit, known & ~self.hit
            if right.any():
                picks.append(Pick("correct", best(right, 1.0), "the most confident correct one"))
            if wrong.any():
                picks.append(Pick("misclassified", best(wrong, 1.0), "the most confident mistake"))
            else:
                note = "Every labelled sample was classified correctly."
        elif self.ok.any():
            note = "Labels are unknown, so correct and misclassified samples cannot be told apart."
            picks.append(Pick("most confident", best(self.ok, 1.0), "the most confident one"))
        rest = self.ok.copy()
        rest[[p.row for p in picks]] = False
        if rest.any():
            picks.append(Pick("low confidence", best(rest, -1.0), "the least confident one"))
        return picks, note

    def probabilities(self, row: int) -> np.ndarray | None:
        z = np.asarray(self.logits[row], dtype=np.float64)
        if z.size == 0 or not np.isfinite(z).all():
            return None
        p = np.exp(z - z.max())
        probs: np.ndarray = p / p.sum()
        return probs

    def grid_layers(self) -> list[StoredLayer]:
        """Layers with maps, at most three: an early, a middle and the last."""
        spatial = [layer for layer in self.layers_stored if layer.acts.ndim in (3, 4)]
        if len(spatial) <= 3:
            return spatial
        return [spatial[0], spatial[len(spatial) // 2], spatial[-1]]

    def input_image(self, row: int) -> np.ndarray | None:
        if self.sources is None:
            return None
        roots = self.attrs.get("spec", {}).get("roots")  # a tenant's job: beneath its roots
        try:
            return input_image(
                str(self.sources[row]), self.preprocessing, None if roots is None else tuple(roots)
            )
        except (OutsideRoots, TooManyPixels):  # swapped for a link, or too big: drawn without
            return None

    def first_conv(self) -> str | None:
        return next((r["name"] for r in self.catalogue if r["type"] in CONV_TYPES), None)
