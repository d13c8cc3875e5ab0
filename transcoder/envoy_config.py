"""Render Envoy's bootstrap config from flowport's settings.

One listener serves REST/JSON (transcoded to gRPC from the checked-in
descriptor set), native gRPC, grpc-web, server-sent events and NDJSON
streams, `/healthz` and `/openapi.json`. Envoy owns the edge: CORS, local
rate limits, request size caps, JSON local replies, active health checks,
outlier detection and retries of idempotent calls. Admin listens on
127.0.0.1 only, whatever `--host` says.

`envoy/README.md` explains each part; `flowport envoy-config` prints the
result for operators who run their own Envoy.
"""

from __future__ import annotations

import ipaddress
import ssl
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flowport.server.limits import (
    MAX_MESSAGE_BYTES,
    MAX_REQUEST_HEADERS,
    MAX_REQUEST_HEADERS_KB,
    MAX_STREAMS_PER_CONNECTION,
    REQUEST_HEADERS_SECONDS,
)
from flowport.server.settings import Settings
from flowport.server.shutdown import HEALTH_CHECK_INTERVAL, HEALTH_CHECK_TIMEOUT, UNHEALTHY_THRESHOLD
from flowport.transcoder.body_fields import lua_source as body_fields_lua
from flowport.transcoder.console_routes import console_routes
from flowport.transcoder.docs_page import docs_route
from flowport.transcoder.edge_filter import edge_source
from flowport.transcoder.envoy_routes import (
    CLUSTER,
    GLOBAL_RATE_LIMIT,
    OPENAPI_PATH,
    RATE_LIMIT,
    TRANSCODER,
    rpc_routes,
    stream_routes,
)
from flowport.transcoder.envoy_routes import (
    seconds as _seconds,
)
from flowport.transcoder.http_rules import descriptor_path, services
from flowport.transcoder.local_replies import local_reply_config
from flowport.transcoder.request_ids import MARK_HEADER
from flowport.transcoder.request_ids import lua_source as request_ids_lua
from flowport.transcoder.upstream_endpoints import grpc_endpoints, membership
from flowport.transcoder.websocket_routes import websocket_clusters, websocket_routes

MAX_DOWNSTREAM_CONNECTIONS = 50_000
# A REST response the transcoder buffers whole: the largest message plus gRPC framing.
MAX_RESPONSE_BODY_BYTES = MAX_MESSAGE_BYTES + 64
# Headers that carry identity inside the gateway; a client must never set them.
IDENTITY_HEADERS = ("x-flowport-tenant", "x-flowport-subject", "x-flowport-roles", "x-envoy-original-path")
CORS_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
CORS_ALLOW_HEADERS = (
    "authorization, content-type, accept, x-api-key, last-event-id, x-request-id, "
    "x-grpc-web, x-user-agent, grpc-timeout"
)
CORS_EXPOSE_HEADERS = (
    "grpc-status, grpc-message, x-ratelimit-limit, x-ratelimit-remaining, x-ratelimit-reset, retry-after"
)
HEALTH_CHECK_PATH = "/healthz"
BODY_FIELDS = "flowport.body_fields"
REQUEST_IDS = "flowport.request_ids"
PER_ROUTE_DISABLED = {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}

SERVICES = services()


def openapi_path() -> Path:
    """The OpenAPI document shipped with the package (built by transcoder.codegen)."""
    return Path(str(resources.files("flowport.transcoder") / "openapi.json"))


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _typed(type_name: str, **fields: Any) -> dict[str, Any]:
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


def _percent(value: int) -> dict[str, Any]:
    return {"default_value": {"numerator": value, "denominator": "HUNDRED"}, "runtime_key": "flowport.unused"}


def transcoder_config(settings: Settings, descriptor: Path, stream_style: str = "") -> dict[str, Any]:
    """The gRPC-JSON transcoder's config; `stream_style` 'sse' or 'ndjson' for stream routes."""
    print_options: dict[str, Any] = {
        "add_whitespace": False,
        "always_print_primitive_fields": True,
        "always_print_enums_as_ints": False,
        "preserve_proto_field_names": True,
    }
    if stream_style == "sse":
        print_options["stream_sse_style_delimited"] = True
    elif stream_style == "ndjson":
        print_options["stream_newline_delimited"] = True
    return _typed(
        "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
        proto_descriptor=str(descriptor),
        services=SERVICES,
        print_options=print_options,
        # gRPC errors become JSON google.rpc.Status bodies; this needs
        # google/rpc/error_details.proto in the descriptor set.
        convert_grpc_status=True,
        request_validation_options={"reject_unknown_method": True, "reject_unknown_query_parameters": True},
        # Without these the transcoder holds at most a connection's buffer
        # (1 MiB) and answers 500 for a legal, larger message.
        max_request_body_size=settings.max_request_bytes,
        max_response_body_size=MAX_RESPONSE_BODY_BYTES,
    )


def _bucket(settings: Settings, max_requests: int) -> dict[str, Any]:
    # The seed's RateLimitConfig: max_requests per time_window, burst_limit tokens at most.
    return {
        "max_tokens": settings.rate_limit_burst_limit or max_requests,
        "tokens_per_fill": max_requests,
        "fill_interval": _seconds(settings.rate_limit_time_window),
    }


def caller_limits(settings: Settings, max_requests: int) -> tuple[int, int]:
    """The per-client and per-address limits within a shared bucket of `max_requests`.

    Each is cut to `rate_limit_client_share` of the shared bucket. Envoy
    spends a request's token from the shared bucket once the caller's own
    buckets let it through, so a caller allowed as much as the shared bucket
    holds (the address limit defaults to 4x the client's, the gateway's 2000
    to 4x 500) could empty it alone: with made-up keys and no valid one.
    """
    share = max(1, int(max_requests * settings.rate_limit_client_share))
    client = settings.rate_limit_client_max_requests
    address = settings.rate_limit_address_max_requests or 4 * client
    return min(client, share), min(address, share)


def rate_limit_config(settings: Settings, max_requests: int) -> dict[str, Any]:
    """A local rate limit with a shared bucket of `max_requests`, plus one bucket per client and per
    address, each holding at most `rate_limit_client_share` of the shared one."""
    descriptors: list[dict[str, Any]] = []
    actions: list[dict[str, Any]] = []
    if settings.rate_limit_client_max_requests:
        client_limit, address_limit = caller_limits(settings, max_requests)
        client = _bucket(settings, client_limit)
        address = _bucket(settings, address_limit)
        # A client is its API key, or its address when it sends none; every
        # address also has a looser bucket, so made-up keys cannot escape.
        # An empty value means one bucket per distinct value.
        descriptors = [
            {"entries": [{"key": "client_key", "value": ""}], "token_bucket": client},
            {
                "entries": [{"key": "keyless", "value": "yes"}, {"key": "remote_address", "value": ""}],
                "token_bucket": client,
            },
            {"entries": [{"key": "remote_address", "value": ""}], "token_bucket": address},
        ]
        key = {"header_name": "x-api-key", "descriptor_key": "client_key", "skip_if_absent": True}
        no_key = {
            "descriptor_key": "keyless",
            "descriptor_value": "yes",
            "expect_match": False,
            "headers": [{"name": "x-api-key", "present_match": True}],
        }
        # remote_address is the peer Envoy saw, never an X-Forwarded-For it was sent.
        actions = [
            {"actions": [{"request_headers": key}]},
            {"actions": [{"header_value_match": no_key}, {"remote_address": {}}]},
            {"actions": [{"remote_address": {}}]},
        ]
    return _typed(
        "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        stat_prefix="flowport_rate_limit",
        token_bucket=_bucket(settings, max_requests),
        descriptors=descriptors,
        rate_limits=actions,
        filter_enabled=_percent(100),
        filter_enforced=_percent(100),
        enable_x_ratelimit_headers="DRAFT_VERSION_03",
        rate_limited_as_resource_exhausted=True,
        local_rate_limit_per_downstream_connection=False,
        response_headers_to_add=[
            {
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                "header": {"key": "retry-after", "value": str(max(1, round(settings.rate_limit_time_window)))},
            }
        ],
    )


def _cors_policy(settings: Settings) -> dict[str, Any]:
    origins = [{"prefix": ""} if o == "*" else {"exact": o} for o in settings.cors_origins]
    return _typed(
        "envoy.extensions.filters.http.cors.v3.CorsPolicy",
        allow_origin_string_match=origins,
        allow_methods=CORS_METHODS,
        allow_headers=CORS_ALLOW_HEADERS,
        expose_headers=CORS_EXPOSE_HEADERS,
        max_age=str(settings.cors_max_age),
        allow_credentials=settings.cors_allow_credentials,
        # A preflight from an origin not allowed is answered here, never forwarded.
        forward_not_matching_preflights=False,
    )


# Which requests edge.lua marked REST (transcoded, or Envoy's JSON replies), and which not.
_REST_MARK = {"filter": "flowport", "path": [{"key": "rest"}]}
# Left unset, match_if_key_not_found would log a request without the key too.
_IS_REST_LOG = {
    "metadata_filter": {"matcher": {**_REST_MARK, "value": {"bool_match": True}}, "match_if_key_not_found": False}
}
_NOT_REST_LOG = {
    "metadata_filter": {"matcher": {**_REST_MARK, "value": {"bool_match": False}}, "match_if_key_not_found": True}
}


def _access_log(settings: Settings) -> list[dict[str, Any]]:
    """Two loggers, one line per request, into one file (Envoy opens a path once for both).

    They differ in `grpc_status` alone. For gRPC and grpc-web it is Envoy's
    %GRPC_STATUS_NUMBER% (the upstream's grpc-status). A REST answer carries
    none (the transcoder puts it in the JSON body, edge.lua removes the rest),
    so that command would map the HTTP status back to a code, wrongly (404 is
    not UNIMPLEMENTED): edge.lua records the status the answer stands for in
    dynamic metadata instead.
    """
    if settings.access_log == "off":
        return []
    path = {"-": "/dev/stdout", "": str(settings.data_dir.resolve() / "access.log")}.get(
        settings.access_log, settings.access_log
    )
    fields = {
        "time": "%START_TIME%",
        # A REST call as the client made it (the transcoder turns it into a POST to the gRPC method):
        # edge.lua removes client-sent copies of these headers, so only the transcoder's are read.
        "method": "%REQ(X-ENVOY-ORIGINAL-METHOD?:METHOD)%",
        "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
        "protocol": "%PROTOCOL%",
        "status": "%RESPONSE_CODE%",
        "grpc_status": "%GRPC_STATUS_NUMBER%",
        "flags": "%RESPONSE_FLAGS%",
        "bytes_in": "%BYTES_RECEIVED%",
        "bytes_out": "%BYTES_SENT%",
        "duration_ms": "%DURATION%",
        "upstream_ms": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
        "client": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
        "user_agent": "%REQ(USER-AGENT)%",
        "request_id": "%REQ(X-REQUEST-ID)%",
    }
    rest_fields = {**fields, "grpc_status": "%DYNAMIC_METADATA(flowport:grpc_status)%"}
    return [
        {
            "name": "envoy.access_loggers.file",
            "filter": log_filter,
            "typed_config": _typed(
                "envoy.extensions.access_loggers.file.v3.FileAccessLog", path=path, log_format={"json_format": format_}
            ),
        }
        for log_filter, format_ in ((_IS_REST_LOG, rest_fields), (_NOT_REST_LOG, fields))
    ]


def _http_filters(settings: Settings, descriptor: Path) -> list[dict[str, Any]]:
    lua = edge_source(settings)
    filters: list[dict[str, Any]] = [
        {
            "name": "envoy.filters.http.lua",
            "typed_config": _typed(
                "envoy.extensions.filters.http.lua.v3.Lua", default_source_code={"inline_string": lua}
            ),
        },
        {
            "name": "envoy.filters.http.header_mutation",
            "typed_config": _typed(
                "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                mutations={"request_mutations": [{"remove": h} for h in (*IDENTITY_HEADERS, MARK_HEADER)]},
            ),
        },
        {
            # Answers GET /healthz itself: 200 while the upstream passes its
            # active health checks, 503 otherwise.
            "name": "envoy.filters.http.health_check",
            "typed_config": _typed(
                "envoy.extensions.filters.http.health_check.v3.HealthCheck",
                pass_through_mode=False,
                headers=[{"name": ":path", "string_match": {"exact": HEALTH_CHECK_PATH}}],
                cluster_min_healthy_percentages={CLUSTER: {"value": 1.0}},
            ),
        },
        {"name": "envoy.filters.http.cors", "typed_config": _typed("envoy.extensions.filters.http.cors.v3.Cors")},
        {
            "name": "envoy.filters.http.grpc_web",
            "typed_config": _typed("envoy.extensions.filters.http.grpc_web.v3.GrpcWeb"),
        },
        {
            # Caps request bodies (413); the API has no client streams, so
            # whole requests are buffered anyway for transcoding.
            "name": "envoy.filters.http.buffer",
            "typed_config": _typed(
                "envoy.extensions.filters.http.buffer.v3.Buffer", max_request_bytes=settings.max_request_bytes
            ),
        },
        {
            # Refuses unknown keys in REST bodies, which the transcoder would drop, and a field of
            # one value set twice (twice in the query, by the path and again by the body or the
            # query, by the query and the body), of which it would keep one silently
            # (transcoder/body_fields.py); after the buffer filter, so bodies are capped, and
            # after the cors filter, so its 400s carry CORS headers as the transcoder's do.
            "name": BODY_FIELDS,
            "typed_config": _typed(
                "envoy.extensions.filters.http.lua.v3.Lua",
                default_source_code={"inline_string": body_fields_lua(descriptor)},
            ),
        },
        {"name": TRANSCODER, "typed_config": transcoder_config(settings, descriptor)},
        {
            # Marks creates whose body sets request_id, for their retrying route
            # (transcoder/request_ids.py); after the transcoder, so REST bodies are gRPC by then.
            "name": REQUEST_IDS,
            "typed_config": _typed(
                "envoy.extensions.filters.http.lua.v3.Lua",
                default_source_code={"inline_string": request_ids_lua(descriptor)},
            ),
        },
    ]
    if settings.rate_limit_max_requests:
        # After the transcoder, so buckets apply per RPC however it was called.
        filters.append(
            {"name": RATE_LIMIT, "typed_config": rate_limit_config(settings, settings.rate_limit_max_requests)}
        )
    if settings.rate_limit_tenant_max_requests:
        filters.append({"name": GLOBAL_RATE_LIMIT, "typed_config": global_rate_limit_config(settings)})
    filters += [
        {
            "name": "envoy.filters.http.grpc_stats",
            "typed_config": _typed(
                "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
                emit_filter_state=True,
                stats_for_all_methods=True,
                enable_upstream_stats=True,
            ),
        },
        {"name": "envoy.filters.http.router", "typed_config": _typed("envoy.extensions.filters.http.router.v3.Router")},
    ]
    return filters


def _routes(settings: Settings, descriptor: Path) -> list[dict[str, Any]]:
    routes: list[dict[str, Any]] = []
    document = openapi_path()
    if document.exists():
        routes.append(
            {
                "name": "openapi",
                "match": {"path": OPENAPI_PATH},
                "direct_response": {"status": 200, "body": {"filename": str(document)}},
                "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
                "typed_per_filter_config": {TRANSCODER: PER_ROUTE_DISABLED, RATE_LIMIT: PER_ROUTE_DISABLED},
            }
        )
    docs = docs_route(document, {TRANSCODER: PER_ROUTE_DISABLED, RATE_LIMIT: PER_ROUTE_DISABLED})
    if docs is not None:
        routes.append(docs)
    routes += console_routes({TRANSCODER: PER_ROUTE_DISABLED, RATE_LIMIT: PER_ROUTE_DISABLED})
    routes += websocket_routes(settings, {TRANSCODER: PER_ROUTE_DISABLED})
    routes += stream_routes(
        transcoder_config(settings, descriptor, "sse"), transcoder_config(settings, descriptor, "ndjson")
    )
    execution_limit = None
    if settings.rate_limit_max_requests and settings.rate_limit_execution_max_requests:
        execution_limit = rate_limit_config(settings, settings.rate_limit_execution_max_requests)
    routes += rpc_routes(settings, execution_limit)
    # Native gRPC to the server's other public services. Nothing else is
    # routed: the rate limit service on the same port is Envoy's own to call
    # (through its cluster, not the listener), and unknown paths are a 404
    # here rather than work for the server.
    for prefix in EDGE_GRPC_PREFIXES:
        routes.append(
            {"name": f"grpc:{prefix}", "match": {"prefix": prefix}, "route": {"cluster": CLUSTER, "timeout": "0s"}}
        )
    # Any request that is not gRPC: REST calls find this route before the
    # transcoder turns them into gRPC (the cors filter needs a route for its
    # policy, preflights included); the transcoder then refuses paths it
    # does not know, so nothing unknown reaches the server this way either.
    not_grpc = {
        "name": "content-type",
        "string_match": {"prefix": "application/grpc"},
        "invert_match": True,
        "treat_missing_header_as_empty": True,
    }
    routes.append(
        {
            "name": "rest",
            "match": {"prefix": "/", "headers": [not_grpc]},
            "route": {"cluster": CLUSTER, "timeout": "0s"},
        }
    )
    return routes


def global_rate_limit_config(settings: Settings) -> dict[str, Any]:
    """Envoy's ratelimit filter, asking flowport's rate limit service (on the server's own port).

    Envoy's own failure mode follows the same setting as the service's when
    Redis is down: an unreachable service lets requests through unless
    rate_limit_fail_open is off.
    """
    return _typed(
        "envoy.extensions.filters.http.ratelimit.v3.RateLimit",
        domain="flowport",
        stage=0,
        failure_mode_deny=not settings.rate_limit_fail_open,
        # Limits that cannot be checked are the service unavailable, not the caller over its limit.
        status_on_error={"code": "ServiceUnavailable"},
        timeout="0.25s",
        enable_x_ratelimit_headers="DRAFT_VERSION_03",
        rate_limited_as_resource_exhausted=True,
        rate_limit_service={
            "grpc_service": {"envoy_grpc": {"cluster_name": CLUSTER}},
            "transport_api_version": "V3",
        },
    )


# Services besides the API that clients may call through Envoy.
EDGE_GRPC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

# The request's credential goes to the rate limit service, which counts
# per tenant; only one of the two is present on a request.
GLOBAL_RATE_LIMIT_ACTIONS = [
    {"actions": [{"request_headers": {"header_name": "x-api-key", "descriptor_key": "api_key"}}]},
    {"actions": [{"request_headers": {"header_name": "authorization", "descriptor_key": "authorization"}}]},
]


def render(settings: Settings, descriptor: Path | None = None, endpoints_dir: Path | None = None) -> dict[str, Any]:
    """The Envoy v3 bootstrap for `settings`, as a JSON-ready dict.

    With `endpoints_dir` (`flowport up`'s), the servers' clusters read their
    endpoints from the files there (server/endpoint_files.py writes them),
    unless a name under --upstream-dns keeps them in the bootstrap.
    """
    descriptor = descriptor or descriptor_path()
    virtual_host: dict[str, Any] = {
        "name": "flowport",
        "domains": ["*"],
        "routes": _routes(settings, descriptor),
        "typed_per_filter_config": {"envoy.filters.http.cors": _cors_policy(settings)},
    }
    if settings.rate_limit_tenant_max_requests:
        virtual_host["rate_limits"] = GLOBAL_RATE_LIMIT_ACTIONS
    connection_manager = _typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="flowport",
        codec_type="AUTO",
        stream_idle_timeout=_seconds(settings.stream_idle_timeout),
        # The client address is the peer's, never an X-Forwarded-For it sent.
        use_remote_address=True,
        xff_num_trusted_hops=0,
        max_request_headers_kb=MAX_REQUEST_HEADERS_KB,
        common_http_protocol_options={"max_headers_count": MAX_REQUEST_HEADERS},
        request_headers_timeout=_seconds(REQUEST_HEADERS_SECONDS),
        http2_protocol_options={"max_concurrent_streams": MAX_STREAMS_PER_CONNECTION},
        local_reply_config=local_reply_config(),
        access_log=_access_log(settings),
        route_config={
            "name": "flowport",
            "virtual_hosts": [virtual_host],
            # The OpenAPI document is served whole from memory.
            "max_direct_response_body_size_bytes": 4 * 2**20,
        },
        http_filters=_http_filters(settings, descriptor),
    )
    extra_clusters: list[dict[str, Any]] = []
    if settings.otlp_endpoint:
        # Envoy starts each request's trace (or continues the client's traceparent)
        # and hands its span to the server as the parent of the server's spans.
        connection_manager["tracing"] = _tracing(settings)
        extra_clusters.append(_collector_cluster(settings.otlp_endpoint))
    cluster = {
        "name": CLUSTER,
        # One endpoint per server: each local process (`--workers`) and
        # each upstream, health-checked and ejected on its own; a request
        # goes to the least busy. The rate limit service is theirs too.
        **membership(settings, CLUSTER, grpc_endpoints(settings), endpoints_dir),
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        # Envoy's defaults would cap the whole cluster at 1024 requests in flight (each
        # open event stream is one) and 3 retries at once, so a server dying with many
        # calls would see most of their retries refused. Retries get a budget instead:
        # a fifth of the requests in flight, and never fewer than 32 at once.
        "circuit_breakers": {
            "thresholds": [
                {
                    "priority": "DEFAULT",
                    "max_requests": 100_000,
                    "max_pending_requests": 100_000,
                    "retry_budget": {"budget_percent": {"value": 20.0}, "min_retry_concurrency": 32},
                }
            ]
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={"http2_protocol_options": {}},
            )
        },
        "health_checks": [
            {
                # A server stopping reports NOT_SERVING and keeps serving while
                # these checks take it out (--drain-seconds, server/shutdown.py).
                "timeout": _seconds(HEALTH_CHECK_TIMEOUT),
                "interval": _seconds(HEALTH_CHECK_INTERVAL),
                # Keep checking an idle upstream, so /healthz stays true.
                "no_traffic_interval": _seconds(HEALTH_CHECK_INTERVAL),
                "unhealthy_threshold": UNHEALTHY_THRESHOLD,
                "healthy_threshold": 1,
                "grpc_health_check": {},
            }
        ],
        # Eject a server that cannot be reached or resets streams; never one
        # that answers. Every gRPC status is an answer, whatever HTTP status
        # it maps to (UNAVAILABLE is a 503, INTERNAL a 500): it says nothing
        # about the server's health, and a client's bad input must never count.
        # Split mode keeps Envoy's own failures to reach the server (connect
        # failures, resets, timeouts) apart from answers, and only they eject.
        "outlier_detection": {
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 3,
            "enforcing_consecutive_local_origin_failure": 100,
            "enforcing_local_origin_success_rate": 0,
            "enforcing_failure_percentage_local_origin": 0,
            "enforcing_consecutive_5xx": 0,
            "enforcing_consecutive_gateway_failure": 0,
            "enforcing_success_rate": 0,
            "enforcing_failure_percentage": 0,
            "interval": "5s",
            "base_ejection_time": "5s",
            "max_ejection_percent": 100,
        },
        # No traffic to an unhealthy upstream: fail fast with 503 instead.
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
    }
    return {
        "node": {"id": "flowport", "cluster": "flowport"},
        "admin": {"address": _address("127.0.0.1", settings.admin_port)},
        # A bound on downstream connections, so a flood cannot exhaust file
        # descriptors (Envoy warns at start when there is none).
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": _typed(
                        "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                        max_active_downstream_connections=MAX_DOWNSTREAM_CONNECTIONS,
                    ),
                }
            ]
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "flowport_http",
                    "address": _address(settings.host, settings.http_port),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": connection_manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [cluster, *websocket_clusters(settings, endpoints_dir), *extra_clusters],
        },
    }


OTEL_CLUSTER = "otel_collector"


def _tracing(settings: Settings) -> dict[str, Any]:
    return {
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": _typed(
                "envoy.config.trace.v3.OpenTelemetryConfig",
                grpc_service={"envoy_grpc": {"cluster_name": OTEL_CLUSTER}, "timeout": "1s"},
                service_name=f"{settings.otel_service_name}-envoy",
            ),
        },
        "random_sampling": {"value": 100 * settings.trace_sample_ratio},
    }


def _collector_cluster(endpoint: str) -> dict[str, Any]:
    """The OTLP/gRPC collector at `endpoint` (http://host:port, or https:// verified against the system CAs)."""
    parts = urlsplit(endpoint)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 4317
    cluster: dict[str, Any] = {
        "name": OTEL_CLUSTER,
        # A name is resolved by Envoy; an address is used as is.
        "type": "STATIC" if _is_address(host) else "STRICT_DNS",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": OTEL_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(host, port)}}]}],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={"http2_protocol_options": {}},
            )
        },
    }
    if parts.scheme == "https":
        paths = ssl.get_default_verify_paths()
        context: dict[str, Any] = {"match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": host}}]}
        ca = paths.cafile or paths.openssl_cafile
        if ca:
            context["trusted_ca"] = {"filename": ca}
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": _typed(
                "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                sni=host,
                common_tls_context={"validation_context": context},
            ),
        }
    return cluster


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
