"""Envoy's route and cluster for `/ws`: WebSocket upgrades to each server process's bridge.

The bridge (server/events/websocket.py) answers the upgrade and feeds the
connection from the server's event stream. The route keeps the edge Lua
filter (`?access_token=` and the cookie credential, the Origin check), the
CORS policy and the rate limits of every other route; the transcoder and
the body buffer, which would wait for the end of a request that never
ends, are off for it. No route timeout: the connection lasts until a side
closes it, Envoy's stream idle timeout kept away by the bridge's pings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flowport.server.settings import Settings
from flowport.server.shutdown import UNHEALTHY_THRESHOLD
from flowport.transcoder.envoy_routes import retry_policy
from flowport.transcoder.upstream_endpoints import membership, websocket_endpoints

WEBSOCKET_CLUSTER = "flowport_ws"
WEBSOCKET_PATH = "/ws"
HEALTH_PATH = "/healthz"  # the bridge's own, on its port
BUFFER = "envoy.filters.http.buffer"
# An upgrade that got no answer (a server restarting, or killed before Envoy's health check
# noticed: its connection refused, or reset after the kernel had queued it for the dead process)
# is tried on another server: an upgrade is a GET, and a stream its bridge began ends with the
# connection. Every answer a bridge gives is final, its 503s too: one says the bridge's
# handshakes are all taken (Retry-After is the client's to heed).
WEBSOCKET_RETRY_ON = "connect-failure,reset"


def websocket_routes(settings: Settings, disabled_filters: dict[str, Any]) -> list[dict[str, Any]]:
    """The `/ws` route (any query), or none when --websocket-port is 0."""
    if not settings.websocket_port:
        return []
    disabled = dict(disabled_filters)
    disabled[BUFFER] = {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}
    return [
        {
            "name": "websocket",
            "match": {"path": WEBSOCKET_PATH},
            "route": {
                "cluster": WEBSOCKET_CLUSTER,
                "timeout": "0s",
                "upgrade_configs": [{"upgrade_type": "websocket"}],
                "retry_policy": retry_policy(WEBSOCKET_RETRY_ON),
            },
            "typed_per_filter_config": disabled,
        }
    ]


def websocket_clusters(settings: Settings, endpoints_dir: Path | None = None) -> list[dict[str, Any]]:
    """One cluster of the bridges, an endpoint per server (transcoder/upstream_endpoints.py), each health-checked;
    given `endpoints_dir`, from the file there as the servers' cluster (upstream_endpoints.membership)."""
    if not settings.websocket_port:
        return []
    return [
        {
            "name": WEBSOCKET_CLUSTER,
            **membership(settings, WEBSOCKET_CLUSTER, websocket_endpoints(settings), endpoints_dir),
            "connect_timeout": "1s",
            "lb_policy": "LEAST_REQUEST",
            "health_checks": [
                {
                    "timeout": "1s",
                    "interval": "1s",
                    "no_traffic_interval": "1s",
                    "unhealthy_threshold": UNHEALTHY_THRESHOLD,  # a 503 from a draining bridge counts at once
                    "healthy_threshold": 1,
                    "http_health_check": {"path": HEALTH_PATH},
                }
            ],
            # A worker being restarted is skipped; with none healthy Envoy answers 503 at once.
            "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        }
    ]
