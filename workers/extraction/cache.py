"""Models cached per process: loaded lazily on first use, evicted least recently used."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Collection

from workers.extraction.isolation import Verdicts
from workers.extraction.models import LoadedModel, load_model
from workers.jobs import ExtractionSpec

__all__ = ["ModelCache"]


def _bytes(model: LoadedModel) -> int:
    tensors = [*model.module.parameters(), *model.module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


class ModelCache:
    """At most `max_models` models and `max_bytes` of weights, per process. With `verdicts`,
    model bytes this process has not seen load first in a limited child process."""

    def __init__(
        self,
        device: str = "cpu",
        max_models: int = 4,
        max_bytes: int = 8 << 30,
        factories: Collection[str] | None = None,
        verdicts: Verdicts | None = None,
    ) -> None:
        self.device = device
        self.max_models = max_models
        self.max_bytes = max_bytes
        self.factories = factories
        self.verdicts = verdicts
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, spec: ExtractionSpec) -> LoadedModel:
        prep = spec.preprocessing.model_dump_json() if spec.preprocessing else ""
        key = f"{spec.model}|{spec.weights or ''}|{prep}"
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            model = load_model(
                spec.model,
                spec.weights,
                spec.preprocessing,
                self.factories,
                self.device,
                self._check(spec),
            )
            self._models[key] = model
            while len(self._models) > 1 and (
                len(self._models) > self.max_models
                or sum(map(_bytes, self._models.values())) > self.max_bytes
            ):
                self._models.popitem(last=False)
            return model

    def _check(self, spec: ExtractionSpec) -> Callable[[str], None] | None:
        """What `load_model` calls with the digest of the model's bytes before loading them."""
        verdicts = self.verdicts
        if verdicts is None:
            return None
        allowed = None if self.factories is None else list(self.factories)
        return lambda digest: verdicts.check(
            digest, spec.model, spec.weights, spec.preprocessing, allowed
        )
