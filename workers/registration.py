"""Registering a model on a worker: load it the safe way and record its layer catalogue."""

from __future__ import annotations

from collections.abc import Collection

from workers.errors import UserError
from workers.extraction.models import load_model
from workers.storage.registry import Registry

__all__ = ["register_model"]


def register_model(
    store: str, tenant: str, model_id: str, factories: Collection[str] | None
) -> str:
    """Fill in the record's catalogue, or its one-line error. Returns the new state."""
    registry = Registry(store)
    record = registry.get(tenant, model_id)
    try:
        info = load_model(record.ref, record.weights, None, factories).info
    except UserError as exc:
        record.state, record.error = "failed", str(exc)
    else:
        record.state, record.catalogue = "ready", info
    registry.save(record)
    return record.state
