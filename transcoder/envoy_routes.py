"""Envoy routes, generated from the API's RPCs.

Routes are matched twice: first on the REST path (where the transcoder
picks its per-route settings: SSE or NDJSON for streams), then, once the
transcoder has rewritten the request, on the gRPC path (where timeouts,
retries and rate-limit overrides are chosen per RPC).
"""

from __future__ import annotations

import re
from typing import Any

from flowport.server.limits import MAX_WAIT
from flowport.server.settings import Settings
from flowport.transcoder.http_rules import methods
from flowport.transcoder.request_ids import MARK_HEADER, request_id_fields

CLUSTER = "flowport_grpc"
TRANSCODER = "envoy.filters.http.grpc_json_transcoder"
RATE_LIMIT = "envoy.filters.http.local_ratelimit"
GLOBAL_RATE_LIMIT = "envoy.filters.http.ratelimit"
OPENAPI_PATH = "/openapi.json"
# Calls safe to repeat (idempotent ones, and creates carrying a request_id,
# which the server deduplicates) are retried on another server
# (previous_hosts) when the server could not be reached, refused the stream,
# answered UNAVAILABLE or reset the call: a server that died or is stopping.
RETRY_ON = "connect-failure,refused-stream,unavailable,reset"
# Every other call only when it never reached a server's code: no connection,
# a stream the server refused (HTTP/2 says it was not processed), or a reset
# before the request was sent.
UNSENT_RETRY_ON = "connect-failure,refused-stream,reset-before-request"
# Methods whose bucket is stricter than the gateway-wide one.
EXECUTION_METHODS = ("/flowport.v1.ExecutionService/CreateExecution",)
# CreateExecution with `wait` (and POST /workflows/{id}/execute, the same
# RPC) holds the call until the execution ends or its wait_timeout (at most
# MAX_WAIT) passes, sending nothing meanwhile; neither the route's timeout
# nor its idle timeout (else the stream idle timeout) may cut it sooner.
WAIT_METHODS = ("/flowport.v1.ExecutionService/CreateExecution",)
WAIT_MARGIN = 5.0


def _template_regex(template: str) -> str:
    """A REST path template as a regex: `{x}` matches one segment."""
    parts = re.split(r"(\{[^}]+\})", template)
    return "^" + "".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts) + "$"


def seconds(value: float) -> str:
    """A duration as Envoy writes it, e.g. `30s`."""
    return f"{value:g}s"


def stream_routes(sse: dict[str, Any], ndjson: dict[str, Any]) -> list[dict[str, Any]]:
    """REST routes of the streaming RPCs: SSE when the client accepts it, NDJSON otherwise."""
    routes = []
    for method in methods():
        if not method.server_streaming:
            continue
        for binding in method.bindings:
            match = {"safe_regex": {"regex": _template_regex(binding.template)}}
            for name, config, accept in (("sse", sse, True), ("ndjson", ndjson, False)):
                route: dict[str, Any] = {
                    "name": f"{method.name}-{name}",
                    "match": dict(match),
                    "route": {"cluster": CLUSTER, "timeout": "0s"},
                    "typed_per_filter_config": {TRANSCODER: config},
                }
                if accept:
                    route["match"]["headers"] = [{"name": "accept", "string_match": {"contains": "text/event-stream"}}]
                routes.append(route)
    return routes


def rpc_routes(settings: Settings, execution_limit: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One route per RPC on its gRPC path: timeout, retries, rate-limit override (and, for a
    create that a request_id makes safe to retry, a twin route for calls that set one)."""
    routes = []
    with_request_id = request_id_fields()
    for method in methods():
        timeout = settings.unary_timeout
        if method.grpc_path in WAIT_METHODS:
            timeout = max(timeout, MAX_WAIT + WAIT_MARGIN)
        action: dict[str, Any] = {
            "cluster": CLUSTER,
            # Streams end when they end; unary calls get the unary timeout.
            "timeout": "0s" if method.server_streaming else seconds(timeout),
        }
        if method.grpc_path in WAIT_METHODS:
            action["idle_timeout"] = seconds(timeout)
        # A stream is retried only until its response starts (Envoy never retries after that).
        action["retry_policy"] = retry_policy(RETRY_ON if method.idempotent else UNSENT_RETRY_ON)
        route: dict[str, Any] = {"name": method.grpc_path, "match": {"path": method.grpc_path}, "route": action}
        if execution_limit is not None and method.grpc_path in EXECUTION_METHODS:
            route["typed_per_filter_config"] = {RATE_LIMIT: execution_limit}
        if method.grpc_path in with_request_id:
            # Its twin for calls whose body sets request_id (request_ids.lua marks them): retried as idempotent.
            marked = {
                **route,
                "name": f"{method.grpc_path}+request_id",
                "match": {"path": method.grpc_path, "headers": [{"name": MARK_HEADER, "present_match": True}]},
                "route": {**action, "retry_policy": retry_policy(RETRY_ON)},
            }
            routes.append(marked)
        routes.append(route)
    return routes


def retry_policy(retry_on: str) -> dict[str, Any]:
    """At most two retries, each on a server not tried yet, soon after the failure."""
    return {
        "retry_on": retry_on,
        "num_retries": 2,
        "retry_back_off": {"base_interval": "0.05s", "max_interval": "0.5s"},
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                },
            }
        ],
        # previous_hosts makes Envoy pick again when it lands on a server already tried, this many
        # times, then it keeps the last pick. Least-request picks at random among idle servers: with
        # two, one of them refusing, 3 left 1 retry in 16 on the same server (1 call in 256 failed
        # after both retries); 12 leaves 1 in 8192.
        "host_selection_retry_max_attempts": 12,
    }
