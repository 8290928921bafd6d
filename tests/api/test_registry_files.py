"""A tenant's jobs load model files from the registry only: a record that still points
at a file outside it (registered by path before models were copied in) is refused at
submission, since the worker would open that path later, after any swap."""

from __future__ import annotations

from pathlib import Path

from tests.api.conftest import Api
from workers.storage.registry import Registry


def test_a_model_whose_file_lies_outside_the_registry_is_refused_at_submission(api: Api) -> None:
    model_id = api.register()
    registry = Registry(str(api.store))
    record = registry.get("acme", model_id)
    assert record.weights is not None
    outside = api.roots["acme"] / "weights.safetensors"  # the tenant can swap it at will
    outside.write_bytes(Path(record.weights).read_bytes())
    record.weights = str(outside)
    registry.save(record)

    refused = api.submit(model_id)

    assert refused.status_code == 409, refused.text
    detail = refused.json()["detail"]
    assert "\n" not in detail
    assert model_id in detail
    assert "register it again" in detail


def test_a_model_registered_now_keeps_its_files_in_the_registry_and_runs(api: Api) -> None:
    model_id = api.register()
    record = Registry(str(api.store)).get("acme", model_id)
    assert record.weights is not None
    assert Path(record.weights).is_relative_to(api.store / "registry" / "acme" / model_id)
    assert api.submit(model_id).status_code == 202
