"""`GET /api/audit` through a real Envoy: JSON names, time filters as RFC 3339
query parameters, admin-only, and the client address Envoy vouches for
rather than one a client claims."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest

from ..conftest import ADMIN_HEADERS, Stack

pytestmark = pytest.mark.integration


def _since(seconds: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_a_failed_rest_login_is_listed_with_the_address_envoy_saw(stack: Stack) -> None:
    start = _since(1)
    # From a loopback address of its own: the other tests' failures from 127.0.0.1 may have used up
    # that client's entries of the minute (server/audit/throttle.py counts the rest in an aggregate).
    own_address = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(base_url=stack.http, timeout=10, transport=own_address) as http:
        spoofed = {"x-api-key": "fpk_nope.nope", "x-forwarded-for": "198.51.100.66"}
        assert http.get("/api/webhooks", headers=spoofed).status_code == 401
        response = http.get("/api/audit", params={"action": "auth.failed", "start_time": start}, headers=ADMIN_HEADERS)
    assert response.status_code == 200, response.text
    events = [e for e in response.json()["audit_events"] if e["method"].endswith("/ListWebhooks")]
    assert len(events) == 1
    event = events[0]
    assert (event["code"], event["reason"], event["credential_kind"]) == (
        "UNAUTHENTICATED",
        "unknown api key",
        "CREDENTIAL_KIND_API_KEY",
    )
    # Envoy appends the peer it saw; what the client put in the header is ignored.
    assert event["client_address"] == "127.0.0.2"
    assert event["proxy_address"] == "127.0.0.1"
    assert "nope" not in response.text


def test_the_audit_log_is_for_admins_and_checks_its_filters(stack: Stack) -> None:
    with httpx.Client(base_url=stack.http, timeout=10) as http:
        created = http.post("/api/keys", json={"tenant": "restaudit", "roles": ["user"]}, headers=ADMIN_HEADERS)
        assert created.status_code == 200, created.text
        user = {"x-api-key": created.json()["key"]}
        assert http.get("/api/audit", headers=user).status_code == 403
        bad_time = http.get("/api/audit", params={"start_time": "yesterday"}, headers=ADMIN_HEADERS)
        assert bad_time.status_code == 400 and "start_time" in bad_time.text
        bad_action = http.get("/api/audit", params={"action": "api_key.maybe"}, headers=ADMIN_HEADERS)
        assert bad_action.status_code == 400
        violation = bad_action.json()["details"][1]["field_violations"][0]
        assert violation["field"] == "action"
        listed = http.get(
            "/api/audit", params={"tenant": "restaudit", "action": "api_key.*"}, headers=ADMIN_HEADERS
        ).json()
    (made,) = listed["audit_events"]
    assert (made["action"], made["resource"]) == ("api_key.created", f"api_keys/{created.json()['api_key']['key_id']}")
    assert created.json()["key"] not in str(listed)
