"""Schemathesis against the server's own OpenAPI document (with the key): any 5xx, crash or
response that violates the document fails. A small budget here; a longer run:

    FUZZ_EXAMPLES=300 .venv/bin/python -m pytest tests/integration/test_fuzz.py
"""

from __future__ import annotations

import os

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.conftest import Server

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "15"))
# make test replays the same examples every run; a longer run (make fuzz) explores anew each time.
DERANDOMIZE = "FUZZ_EXAMPLES" not in os.environ
# No 5xx, and every response as the document says (status, content type, body). Not checked:
# that every schema-valid body is accepted, since the server also checks meaning (roles, lengths,
# the vocabulary) that a JSON schema cannot say, and answers those with documented 400s.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def test_every_operation_survives_generated_requests(text_server: Server) -> None:
    schema = schemathesis.openapi.from_url(
        f"{text_server.base_url}/openapi.json", headers=text_server.auth_headers
    )
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    calls = 0
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            derandomize=DERANDOMIZE,
        )
        def run(case) -> None:
            nonlocal calls
            calls += 1
            case.call_and_validate(headers=text_server.auth_headers, checks=CHECKS, timeout=60)

        run()
    print(f"fuzz: {calls} generated requests over {len(operations)} operations")
