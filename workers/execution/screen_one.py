"""One sample screened now, without a job: the `screen` queue's fast path.

Owns `Screeners`, the profiles a process has loaded together with the spec their screenings
run (kept by id: a fitted profile never changes), and `screen_sample`: decode the bytes a
request sent, run the same `compute_batch` a screening job's batch runs (one forward with
hooks on the profile's layers), and score the sample with the profile. Nothing is written to
the store; the answer goes back to the caller. A screening job (`screen run`) stays the way
to screen many samples and keep their answers.
"""

from __future__ import annotations

import base64
import binascii
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.analysis.profiles import load_profile, screening_spec
from workers.analysis.requests import describe
from workers.analysis.screening import LOGITS, SQUEEZE, ScreeningProfile
from workers.errors import NotFound, TransientError, UserError
from workers.extraction.cache import ModelCache
from workers.extraction.decoders import decode_bytes
from workers.jobs import ExtractionSpec
from workers.pipeline import Decoded, compute_batch
from workers.settings import Settings

__all__ = ["Screener", "Screeners", "answer", "screen_here", "screen_sample"]


@dataclass(frozen=True)
class Screener:
    """A loaded profile, the spec its screenings run, and the tenant that owns it."""

    profile: ScreeningProfile
    spec: ExtractionSpec
    tenant: str


class Screeners:
    """The last `size` profiles this process screened with, loaded once each."""

    def __init__(self, size: int = 16) -> None:
        self._size = size
        self._loaded: OrderedDict[tuple[str, str], Screener] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, store: str, profile_id: str) -> Screener:
        key = (store, profile_id)
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
        found = Screener(
            load_profile(store, profile_id),
            screening_spec(store, profile_id),
            describe(store, profile_id).tenant,
        )
        with self._lock:
            self._loaded[key] = found
            while len(self._loaded) > self._size:
                self._loaded.popitem(last=False)
        return found


def screen_sample(
    store: str,
    tenant: str | None,
    profile_id: str,
    name: str,
    data: bytes,
    models: ModelCache,
    screeners: Screeners,
) -> dict[str, Any]:
    """The profile's answer for one sample: score, flag, threshold, the model's prediction,
    and the seconds it took here (`worker_s`: load, decode, forward, score). A sample that
    cannot be read raises InputError with its reason. The tenant is checked here, where the
    profile is used: another tenant's profile answers like one that does not exist.
    `tenant` None: the store's own user (the command line embedded or on a broker), who may
    use every profile in it."""
    began = time.perf_counter()
    try:
        screener = screeners.get(store, profile_id)
    except NotFound:
        screener = None
    if screener is None or (tenant is not None and screener.tenant != tenant):
        raise NotFound(f"no analysis {profile_id!r} of yours")
    profile, spec = screener.profile, screener.spec
    model = models.get(spec)
    prep = model.info.preprocessing
    x = decode_bytes(data, name, prep, kind=spec.input_kind or prep.input_kind)
    decoded = Decoded(0, 0, x[None], np.zeros(1, dtype=np.int16), [""])
    rows = compute_batch(model, spec, decoded)
    sample: dict[str, np.ndarray] = {layer: rows.layers[layer].pooled for layer in profile.channels}
    if profile.logits:
        sample[LOGITS] = rows.logits
    if rows.squeeze is not None:  # the spec asks for it when the profile scores it
        sample[SQUEEZE] = rows.squeeze
    score = float(profile.score(sample)[0])
    pred = int(rows.pred[0])
    classes = prep.classes
    return {
        "profile_id": profile_id,
        "sample": name,
        "threshold": float(profile.threshold),
        "fpr": profile.fpr,
        "score": score,
        "flag": bool(score > profile.threshold),
        "pred": pred,
        "pred_class": classes[pred] if classes and 0 <= pred < len(classes) else None,
        "worker_s": time.perf_counter() - began,
    }


def answer(
    store: str,
    tenant: str | None,
    profile_id: str,
    name: str,
    data: str,
    models: ModelCache,
    screeners: Screeners,
) -> dict[str, Any]:
    """`screen_sample` of the base64 `data` a task carries, as its result: the answer, or
    what the caller did wrong as data named by kind (workers.errors.REFUSALS), never as a
    pickled error."""
    try:
        try:
            sent = base64.b64decode(data, validate=True)
        except binascii.Error:
            raise UserError("the sample's bytes were not valid base64") from None
        return screen_sample(store, tenant, profile_id, name, sent, models, screeners)
    except NotFound as exc:  # before UserError, which it is
        return {"refused": "not_found", "error": str(exc)}
    except UserError as exc:
        return {"refused": "user", "error": str(exc)}
    except (TransientError, ConnectionError, TimeoutError) as exc:
        return {"refused": "transient", "error": f"{exc}; retry"}


def screen_here(
    settings: Settings, store: str, profile_id: str, name: str, data: bytes
) -> dict[str, Any]:
    """`screen_sample` in this process (the command line with no broker): the model loads
    here, for this call."""
    models = ModelCache(settings.device, factories=settings.factories)
    return screen_sample(store, None, profile_id, name, data, models, Screeners())
