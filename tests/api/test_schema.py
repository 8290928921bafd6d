"""Schemathesis over the OpenAPI schema, with a bounded number of examples per route: no
request a client can send makes the API answer 5xx or break its own schema."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.api.conftest import make_api

_api = make_api(Path(tempfile.mkdtemp(prefix="actmap-schema-")))
schema = schemathesis.openapi.from_asgi("/openapi.json", _api.client.app)


@pytest.fixture(scope="module", autouse=True)
def _model() -> None:
    with _api.client:
        _api.register()


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_makes_the_api_fail_or_break_its_schema(case: Any) -> None:
    case.call_and_validate(
        headers=_api.as_("acme"), checks=[not_a_server_error, response_schema_conformance]
    )
