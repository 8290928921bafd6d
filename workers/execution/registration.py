"""Registering a model on a worker: load it in a limited child process and record its layer
catalogue, or its one-line refusal."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from workers.errors import UserError
from workers.extraction.isolation import ChildLimits, load_in_child
from workers.extraction.models import REGISTERED
from workers.storage.registry import Registry

__all__ = ["bundled", "register_model"]


def bundled() -> dict[str, tuple[str, Path]]:
    """The models known by name on every host: name -> (factory, weights file)."""
    return dict(REGISTERED)


def register_model(
    store: str,
    tenant: str,
    model_id: str,
    factories: Collection[str] | None,
    limits: ChildLimits | None = None,
) -> str:
    """Fill in the record's catalogue, or its one-line error. Returns the new state. The
    model is loaded in a child process with `limits`, so a hostile or broken one costs that
    child, not this worker."""
    registry = Registry(store)
    record = registry.get(tenant, model_id)
    allowed = None if factories is None else list(factories)
    try:
        info = load_in_child(record.ref, record.weights, None, allowed, limits or ChildLimits())
    except UserError as exc:
        record.state, record.error = "failed", str(exc)
    else:
        record.state, record.catalogue = "ready", info
    registry.save(record)
    return record.state
