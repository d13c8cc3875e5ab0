"""The servers behind Envoy's `flowport_grpc` and `flowport_ws` clusters.

`flowport up`'s own server processes (none with --no-local-server), then
the --upstream and --upstream-dns servers (server/upstreams.py). Every
server is one endpoint, health-checked and ejected on its own; a name
under --upstream-dns becomes as many endpoints as it has addresses.
"""

from __future__ import annotations

from typing import Any

from flowport.server.settings import Settings, _connect_host


def discovery(settings: Settings) -> dict[str, Any]:
    """The cluster type: STATIC while every endpoint is an address, STRICT_DNS once one is a name.

    One cluster holds both kinds: under STRICT_DNS an address resolves to
    itself. Envoy re-resolves names every 5 s (its default), and prefers A
    records: servers listen on IPv4 (`--grpc-host 0.0.0.0`) unless told otherwise.
    """
    if any(upstream.by_name for upstream in settings.upstreams):
        return {"type": "STRICT_DNS", "dns_lookup_family": "V4_PREFERRED"}
    return {"type": "STATIC"}


def _endpoint(host: str, port: int) -> dict[str, Any]:
    return {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}


def grpc_endpoints(settings: Settings) -> list[dict[str, Any]]:
    """The gRPC ports of the local server processes (one per `--workers`), then of the upstreams."""
    local = [] if settings.no_local_server else settings.grpc_ports
    host = _connect_host(settings.grpc_host)
    return [_endpoint(host, port) for port in local] + [_endpoint(u.host, u.port) for u in settings.upstreams]


def websocket_endpoints(settings: Settings) -> list[dict[str, Any]]:
    """The WebSocket bridges: the local processes', then each upstream host's on `--websocket-port`.

    A server's bridge listens on its own host (on its `--grpc-host`), and
    every upstream host is taken to run one on the port this Envoy is
    given: servers sharing a host share that one bridge's endpoint. None when 0.
    """
    if not settings.websocket_port:
        return []
    local = [] if settings.no_local_server else settings.websocket_ports
    host = _connect_host(settings.grpc_host)
    remote = dict.fromkeys(u.host for u in settings.upstreams)  # each host once, in order
    return [_endpoint(host, port) for port in local] + [_endpoint(h, settings.websocket_port) for h in remote]
