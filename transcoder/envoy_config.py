"""Render Envoy's bootstrap config from flowport's settings.

One listener serves REST/JSON (transcoded to gRPC by `grpc_json_transcoder`
from the checked-in descriptor set), native gRPC over h2c, and `/healthz`
(answered by Envoy from the upstream's active gRPC health checks). The
upstream cluster speaks HTTP/2 to the flowport server. Admin listens on
127.0.0.1 only, whatever `--host` says.

`envoy/README.md` explains each part; `flowport envoy-config` prints the
result for operators who run their own Envoy.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from flowport.server.settings import Settings, _connect_host

CLUSTER = "flowport_grpc"
MAX_DOWNSTREAM_CONNECTIONS = 50_000
API_PACKAGE = "flowport.v1"
SERVICES = [
    f"{API_PACKAGE}.{name}"
    for name in (
        "GatewayService",
        "SessionService",
        "WorkflowService",
        "ExecutionService",
        "EventService",
        "WebhookService",
        "SchemaService",
    )
]
# Server-streaming RPCs: no route timeout, or Envoy would cut them at it.
STREAMING_PATHS = [
    f"/{API_PACKAGE}.EventService/StreamEvents",
    f"/{API_PACKAGE}.ExecutionService/WatchExecution",
]


def descriptor_path() -> Path:
    """The descriptor set shipped with the package (built by transcoder.codegen)."""
    return Path(str(resources.files("flowport.transcoder") / "descriptor.pb"))


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _typed(type_name: str, **fields: Any) -> dict[str, Any]:
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


def _seconds(value: float) -> str:
    return f"{value:g}s"


def render(settings: Settings, descriptor: Path | None = None) -> dict[str, Any]:
    """The Envoy v3 bootstrap for `settings`, as a JSON-ready dict."""
    descriptor = descriptor or descriptor_path()
    routes = [{"match": {"path": path}, "route": {"cluster": CLUSTER, "timeout": "0s"}} for path in STREAMING_PATHS]
    routes.append(
        {"match": {"prefix": "/"}, "route": {"cluster": CLUSTER, "timeout": _seconds(settings.unary_timeout)}}
    )
    http_filters = [
        {
            # Answers GET /healthz itself: 200 while the upstream passes its
            # active health checks, 503 otherwise.
            "name": "envoy.filters.http.health_check",
            "typed_config": _typed(
                "envoy.extensions.filters.http.health_check.v3.HealthCheck",
                pass_through_mode=False,
                headers=[{"name": ":path", "string_match": {"exact": "/healthz"}}],
                cluster_min_healthy_percentages={CLUSTER: {"value": 1.0}},
            ),
        },
        {
            "name": "envoy.filters.http.grpc_json_transcoder",
            "typed_config": _typed(
                "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
                proto_descriptor=str(descriptor),
                services=SERVICES,
                print_options={
                    "add_whitespace": False,
                    "always_print_primitive_fields": True,
                    "always_print_enums_as_ints": False,
                    "preserve_proto_field_names": True,
                },
                # gRPC errors become JSON google.rpc.Status bodies; this needs
                # google/rpc/error_details.proto in the descriptor set.
                convert_grpc_status=True,
                request_validation_options={
                    "reject_unknown_method": True,
                    "reject_unknown_query_parameters": True,
                },
            ),
        },
        {
            "name": "envoy.filters.http.router",
            "typed_config": _typed("envoy.extensions.filters.http.router.v3.Router"),
        },
    ]
    connection_manager = _typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="flowport",
        codec_type="AUTO",
        stream_idle_timeout="300s",
        route_config={
            "name": "flowport",
            "virtual_hosts": [{"name": "flowport", "domains": ["*"], "routes": routes}],
        },
        http_filters=http_filters,
    )
    cluster = {
        "name": CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": _address(_connect_host(settings.host), settings.grpc_port)}}
                    ]
                }
            ],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={"http2_protocol_options": {}},
            )
        },
        "health_checks": [
            {
                "timeout": "1s",
                "interval": "2s",
                # Keep checking an idle upstream, so /healthz stays true.
                "no_traffic_interval": "1s",
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "grpc_health_check": {},
            }
        ],
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
            "clusters": [cluster],
        },
    }
