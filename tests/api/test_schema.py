"""Schemathesis over the OpenAPI schema with all its checks, valid and invalid requests,
a bounded number of examples per route and a deadline per example: no request a client
can send makes the API answer 5xx, accept what its schema forbids or break its schema."""

from __future__ import annotations

import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import negative_data_rejection

from tests.api.conftest import make_api

_api = make_api(Path(tempfile.mkdtemp(prefix="actmap-schema-")))
schema = schemathesis.openapi.from_asgi("/openapi.json", _api.client.app)
schema.config.checks.update(included_check_names=["all"])
# A request can be valid in form and impossible in fact (an input outside the tenant's
# roots, an unknown layer, over a quota): the API answers those 413 or 422, with one line.
schema.config.checks.positive_data_acceptance.expected_statuses = [
    "2xx", "401", "403", "404", "409", "413", "422", "429",
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _model() -> None:
    with _api.client:
        _api.register()


@schema.parametrize()
@settings(max_examples=20, deadline=timedelta(seconds=10), suppress_health_check=list(HealthCheck))
def test_no_request_makes_the_api_fail_or_break_its_schema(case: Any) -> None:
    # A file part cannot carry the JSON types a negative case puts in its place (a null
    # "file" is still sent as a file), so on multipart bodies that one check has no meaning.
    multipart = case.media_type == "multipart/form-data"
    case.call_and_validate(
        headers=_api.as_("acme"), excluded_checks=[negative_data_rejection] if multipart else []
    )
