"""The causes the counted scenarios give failed requests (tests/testbed/loadgen.failure_cause), from
what the test bed's load balancer and the engine simulator really answer."""

from __future__ import annotations

import aiohttp
import pytest
from tests.testbed.loadgen import failure_cause


@pytest.mark.parametrize(("status", "error", "cause"), [
    (503, '{"error": {"message": "no ready endpoint for service chat", "code": 503}}', "http_503_no_endpoint"),
    (503, '{"error": {"message": "The engine is sleeping; wake it up with POST /wake_up first."}}',
     "http_503_engine_asleep"),
    (502, "upstream chat-1 failed: ClientConnectorError(...)", "http_502_upstream_refused"),
    (502, "upstream chat-1 failed: ServerDisconnectedError('Server disconnected')", "http_502_upstream_reset"),
    (500, "the engine loop has crashed", "http_500"),
    (0, aiohttp.ServerDisconnectedError(), "connection_reset"),
    (0, ConnectionResetError(), "connection_reset"),
    (0, TimeoutError(), "timeout"),
    (0, ValueError("not JSON"), "bad_response"),
])
def test_a_failed_request_is_given_its_cause(status, error, cause):
    assert failure_cause(status, error) == cause
