"""GetStats after a scripted sequence against a real `flowport up`: sessions, executions,
failed logins, a rate-limited burst through Envoy, webhooks that fail, streams over each
transport. Every figure moves by what the script did; a tenant's user sees its tenant only."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from flowport.clients import Client
from flowport.clients.errors import ApiError
from flowport.v1 import apikey_pb2, event_pb2, execution_pb2, gateway_pb2, session_pb2, webhook_pb2

from ..conftest import ADMIN_KEY, Stack, make_settings, start_up, stop_up

pytestmark = pytest.mark.integration
BURST_LIMIT = 5


class _Receiver(BaseHTTPRequestHandler):
    """/busy answers 503 with Retry-After: 60 (retried later); /gone answers 400 (dead-lettered at once)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(503 if self.path == "/busy" else 400)
        if self.path == "/busy":
            self.send_header("retry-after", "60")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    settings = make_settings(
        tmp_path / "data",
        rate_limit_client_max_requests=BURST_LIMIT,
        rate_limit_time_window=60.0,
        webhook_max_attempts=5,
    )
    running = start_up(settings)
    try:
        yield running
    finally:
        stop_up(running)


def _stats(client: Client) -> dict[str, Any]:
    from google.protobuf import json_format

    answer = client.gateway.GetStats(gateway_pb2.GetStatsRequest())
    return json_format.MessageToDict(
        answer, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _number(stats: dict[str, Any], path: str) -> float:
    value: Any = stats
    for part in path.split("."):
        value = value[part]
    return float(value)


def _until(read: Any, ok: Any, what: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if ok(value):
            return value  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {value}"
        time.sleep(0.1)


def _user(admin: Client, tenant: str) -> str:
    made = admin.keys.CreateApiKey(
        apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(tenant=tenant, roles=["user"]))
    )
    return str(made.key)


def test_every_figure_moves_with_a_scripted_sequence(stack: Stack) -> None:  # noqa: PLR0915 - one script
    settings = stack.settings
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=receiver.serve_forever, args=(0.05,), daemon=True).start()
    grpc_target = settings.grpc_target
    try:
        with Client(grpc_target, api_key=ADMIN_KEY) as admin:
            acme_key, burst_key = _user(admin, "acme"), _user(admin, "burst")
            before = _stats(admin)
            with Client(grpc_target, api_key=acme_key) as acme:
                base = f"http://127.0.0.1:{receiver.server_port}"
                for path, kind in (("/busy", "session.created"), ("/gone", "session.deleted")):
                    acme.webhooks.CreateWebhook(
                        webhook_pb2.CreateWebhookRequest(
                            webhook=webhook_pb2.Webhook(url=base + path, event_types=[kind])
                        )
                    )
                first = acme.sessions.CreateSession(session_pb2.CreateSessionRequest())
                acme.sessions.CreateSession(session_pb2.CreateSessionRequest())
                acme.sessions.DeleteSession(session_pb2.DeleteSessionRequest(session_id=first.session_id))
                ok = acme.run_workflow({"name": "ok", "nodes": [{"type": "MergeNode", "name": "m"}]}, {})
                bad = acme.run_workflow(
                    {"name": "bad", "nodes": [{"type": "PythonCodeNode", "name": "p", "config": {"code": "1/0"}}]}, {}
                )
                assert (ok.state, bad.state) == (
                    execution_pb2.Execution.STATE_SUCCEEDED,
                    execution_pb2.Execution.STATE_FAILED,
                )
                with pytest.raises(ApiError):
                    acme.sessions.GetSession(session_pb2.GetSessionRequest(session_id="ses_missing"))

                # Three refused logins.
                for _ in range(3):
                    with Client(grpc_target, api_key="fpk_wrong", retries=1) as stranger, pytest.raises(ApiError):
                        stranger.sessions.ListSessions(session_pb2.ListSessionsRequest())

                # A burst past Envoy's per-key limit.
                with httpx.Client(base_url=settings.http_url, headers={"x-api-key": burst_key}, timeout=10) as http:
                    codes = [http.get("/api/sessions").status_code for _ in range(BURST_LIMIT + 7)]
                refused = codes.count(429)
                assert refused >= 7 and set(codes) == {200, 429}, codes

                # One stream over each transport, held open while the figures are read.
                with (
                    httpx.Client(base_url=settings.http_url, headers={"x-api-key": acme_key}, timeout=30) as http,
                    http.stream("GET", "/events", headers={"accept": "text/event-stream"}) as sse,
                    http.stream("GET", "/events") as ndjson,
                ):
                    assert (sse.status_code, ndjson.status_code) == (200, 200)
                    channel_stream = acme.events.StreamEvents(event_pb2.StreamEventsRequest())
                    try:
                        live = _until(
                            lambda: _stats(acme),
                            lambda s: (
                                (
                                    s["realtime"]["sse_count"],
                                    s["realtime"]["ndjson_count"],
                                    s["realtime"]["grpc_count"],
                                )
                                == (1, 1, 1)
                            ),
                            "one acme stream over each transport",
                        )
                    finally:
                        channel_stream.cancel()
                assert live["realtime"]["active_streams"] == 3

                acme_view = _until(
                    lambda: _stats(acme),
                    lambda s: int(s["webhooks"]["retrying"]) == 2 and int(s["webhooks"]["dead_lettered"]) == 1,
                    "two deliveries retrying (a session created, twice) and one dead-lettered (one deleted)",
                )
            after = _until(
                lambda: _stats(admin),
                lambda s: int(s["realtime"]["active_streams"]) == 0,
                "the streams to close",
            )
    finally:
        receiver.shutdown()
        receiver.server_close()

    # The tenant's own view: its figures only, none of the process-wide ones.
    assert acme_view["tenant"] == "acme"
    assert acme_view["sessions"]["active"] == 1
    assert int(acme_view["sessions"]["created"]) == 2, "the deleted session was created too"
    executions = acme_view["executions"]
    assert (int(executions["succeeded"]), int(executions["failed"]), int(executions["started"])) == (1, 1, 2)
    assert {k: int(v) for k, v in executions["by_state"].items()} == {
        "pending": 0,
        "running": 0,
        "succeeded": 1,
        "failed": 1,
        "cancelled": 0,
    }
    assert int(acme_view["webhooks"]["retried"]) == 2 and int(acme_view["webhooks"]["delivered"]) == 0
    requests = acme_view["requests"]
    assert int(requests["errors"]) >= 1 and 0 < requests["error_rate"] < 1
    assert 0 < requests["latency_p50"] <= requests["latency_p90"] <= requests["latency_p99"]
    assert acme_view["performance"]["p99"] == requests["latency_p99"]
    assert acme_view["errors"]["total"] == requests["errors"]
    assert int(acme_view["security"]["failed_auth"]) == 0 and "database" not in acme_view
    assert int(acme_view["system"]["rss_bytes"]) == 0

    # The admin's view: every tenant and the process.
    def moved(path: str) -> float:
        return _number(after, path) - _number(before, path)

    assert after["tenant"] == ""
    assert moved("sessions.active") == 1 and moved("sessions.created") == 2
    assert moved("executions.succeeded") == 1 and moved("executions.failed") == 1
    assert moved("executions.by_state.failed") == 1
    assert moved("security.failed_auth") == 3
    assert moved("security.edge_rate_limits") == refused and moved("security.rate_limits") == refused
    assert moved("webhooks.retried") == 2 and moved("webhooks.dead_lettered") == 1
    assert _number(after, "webhooks.retrying") == 2
    assert moved("requests.total") >= 15 and moved("requests.errors") >= 4
    assert after["database"]["connections"] >= 2
    assert moved("database.queries") > 0 and after["database"]["avg_query_time"] > 0
    assert int(after["system"]["rss_bytes"]) > 0 and after["system"]["uptime"] >= before["system"]["uptime"]
    assert json.dumps(after).count("acme") == 0, "the admin's view names no tenant"


def test_users_cannot_see_another_tenants_figures(stack: Stack) -> None:
    with Client(stack.settings.grpc_target, api_key=ADMIN_KEY) as admin:
        one, two = _user(admin, "one"), _user(admin, "two")
    with Client(stack.settings.grpc_target, api_key=one) as first:
        first.sessions.CreateSession(session_pb2.CreateSessionRequest())
        mine = _stats(first)
    with Client(stack.settings.grpc_target, api_key=two) as second:
        theirs = _stats(second)
    # A call is counted once answered: each GetStats sees the calls before it.
    assert (mine["tenant"], mine["sessions"]["active"], int(mine["requests"]["total"])) == ("one", 1, 1)
    assert (theirs["tenant"], theirs["sessions"]["active"], int(theirs["requests"]["total"])) == ("two", 0, 0)
    assert (int(mine["sessions"]["created"]), int(theirs["sessions"]["created"])) == (1, 0)
    with Client(stack.settings.grpc_target, api_key="fpk_nobody", retries=1) as nobody, pytest.raises(ApiError) as no:
        nobody.gateway.GetStats(gateway_pb2.GetStatsRequest())
    assert no.value.code() is grpc.StatusCode.UNAUTHENTICATED
