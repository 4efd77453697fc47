"""Property-based tests of the whole API from its OpenAPI schema: no input makes it fail.

The schema is loaded from the app (``/api/openapi.json``, behind the admin token); every
operation gets generated requests (valid and invalid ones) carrying the admin token, so the
handlers themselves, not only the auth layer, see the generated input. Checks: no 5xx, and
answers that match the documented schema and content type. Kept well under a minute.

(schemathesis' ``pytest.from_fixture`` lazy schema does not work with pytest 9 here, so the
operations are driven through Hypothesis directly.)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from tests.service.api_support import ADMIN_TOKEN, ApiHarness, add_finished_job, make_harness

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# Operations that need a part this API-only harness does not run (the in-process DICOM
# listener; a configured PACS) and answer 503 with a sentence, as documented; any other 5xx
# is still a failure for them.
NEEDS_SERVE = {"POST /dicomweb/studies", "POST /api/pull"}
EXAMPLES = {GenerationMode.POSITIVE: 15, GenerationMode.NEGATIVE: 8}


@pytest.fixture
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiHarness]:
    harness = make_harness(tmp_path_factory.mktemp("schemathesis"))
    add_finished_job(harness)
    harness.add_job(state="failed", failure_reason="the series has 3 slices")
    yield harness
    harness.engine.dispose()


@pytest.mark.parametrize("mode", list(EXAMPLES), ids=lambda mode: mode.value)
def test_no_generated_request_gets_a_server_error(
    harness: ApiHarness, mode: GenerationMode
) -> None:
    schema = schemathesis.openapi.from_asgi("/api/openapi.json", harness.client.app, headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    checks = [not_a_server_error]
    if mode is GenerationMode.POSITIVE:
        checks += [response_schema_conformance, content_type_conformance]

    for operation in operations:
        operation_checks = checks
        if operation.label in NEEDS_SERVE:
            operation_checks = [_unavailable_or_not_a_server_error, *checks[1:]]
        check = _property(operation, mode, operation_checks)

        try:
            check()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # nothing to make invalid (no parameters)
        except Exception as error:
            raise AssertionError(f"{operation.label}: {error}") from error


def _property(operation, mode, checks):  # type: ignore[no-untyped-def]
    """The Hypothesis test of one operation with ``checks``."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES[mode],
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(headers=AUTH, checks=checks)

    return check


def _unavailable_or_not_a_server_error(ctx, response, case):  # type: ignore[no-untyped-def]
    """``not_a_server_error``, but a 503 that says which part is missing is the answer."""
    missing = ("RTCONTOUR_PACS", "rtcontour serve")  # the sentences name what to configure
    if response.status_code == 503 and any(part in response.text for part in missing):
        return None
    return not_a_server_error(ctx, response, case)
