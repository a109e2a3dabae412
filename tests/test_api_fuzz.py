"""The HTTP API under generated input: no request, well-formed or not, gets a server error.

Schemathesis reads the API's own OpenAPI schema from a real web instance and sends each
operation valid and invalid requests (boundaries, wrong types, missing fields, odd strings and
headers) as a publisher with a token. Whatever it sends, the answer is a clear 4xx or a success,
never a 5xx (a traceback, a crash): the broker and the database are up, so not even a 503.
Examples are derandomized, so a run is the same every time.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

# Generated requests per operation (and phase); the operations are few and each request is quick.
EXAMPLES = 25


@pytest.fixture
def api_schema(cluster, users):
    web = cluster.add_web()
    web.wait_ready()
    return schemathesis.openapi.from_url(f"{web.url}/api/schema/?format=json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,  # nothing written to the checkout: the same examples every run anyway
    suppress_health_check=list(HealthCheck),
)
def test_no_generated_request_gets_a_server_error(case, users):
    case.call_and_validate(
        headers={"Authorization": f"Token {users['alice'].token}"}, checks=[not_a_server_error]
    )
