"""The servers behind Envoy's `flowport_grpc` and `flowport_ws` clusters.

`flowport up`'s own server processes (none with --no-local-server), then
the --upstream and --upstream-dns servers (server/upstreams.py). Every
server is one endpoint, health-checked and ejected on its own; a name
under --upstream-dns becomes as many endpoints as it has addresses.

A cluster holds its endpoints in the bootstrap (`load_assignment`), or, for
`flowport up` while every server is an address, takes them from a file
Envoy watches (EDS from the file system, server/endpoint_files.py), so
`flowport upstreams` can change them without restarting Envoy.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flowport.server.settings import Settings, _connect_host
from flowport.server.upstreams import Upstream


def discovery(settings: Settings) -> dict[str, Any]:
    """The cluster type: STATIC while every endpoint is an address, STRICT_DNS once one is a name.

    One cluster holds both kinds: under STRICT_DNS an address resolves to
    itself. Envoy re-resolves names every 5 s (its default), and prefers A
    records: servers listen on IPv4 (`--grpc-host 0.0.0.0`) unless told otherwise.
    """
    if any(upstream.by_name for upstream in settings.upstreams):
        return {"type": "STRICT_DNS", "dns_lookup_family": "V4_PREFERRED"}
    return {"type": "STATIC"}


CLUSTER_LOAD_ASSIGNMENT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


def reloadable(settings: Settings) -> bool:
    """Whether Envoy may take the servers from files: only addresses (a name is Envoy's to resolve)."""
    return not settings.upstream_dns


def endpoints_file(directory: Path, cluster: str) -> Path:
    """The file `cluster`'s endpoints are read from, under `directory`."""
    return directory / f"{cluster}.json"


def membership(
    settings: Settings, cluster: str, endpoints: list[dict[str, Any]], endpoints_dir: Path | None
) -> dict[str, Any]:
    """How `cluster` knows its servers: `endpoints` in the bootstrap, or (given `endpoints_dir`,
    and no --upstream-dns) the file Envoy watches there, which holds the same."""
    if endpoints_dir is None or not reloadable(settings):
        return {
            **discovery(settings),
            "load_assignment": {"cluster_name": cluster, "endpoints": [{"lb_endpoints": endpoints}]},
        }
    source = {"path_config_source": {"path": str(endpoints_file(endpoints_dir, cluster))}}
    return {
        "type": "EDS",
        "eds_cluster_config": {"eds_config": {**source, "resource_api_version": "V3"}},
        # A server taken out of the file gets no new calls at once, even while it
        # passes its health checks (Envoy's default keeps it until it fails one);
        # its connections drain: calls and streams under way finish.
        "ignore_health_on_host_removal": True,
    }


def assignment(cluster: str, endpoints: list[dict[str, Any]], version: str) -> dict[str, Any]:
    """The file Envoy reads `cluster`'s endpoints from: a DiscoveryResponse of one ClusterLoadAssignment."""
    return {
        "version_info": version,
        "resources": [
            {
                "@type": CLUSTER_LOAD_ASSIGNMENT,
                "cluster_name": cluster,
                "endpoints": [{"lb_endpoints": endpoints}],
            }
        ],
    }


def endpoint(host: str, port: int) -> dict[str, Any]:
    """One server at an address."""
    return {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}


def local_grpc(settings: Settings) -> list[tuple[str, int]]:
    """The gRPC addresses of `flowport up`'s own server processes (one per `--workers`; none with --no-local-server)."""
    host = _connect_host(settings.grpc_host)
    return [] if settings.no_local_server else [(host, port) for port in settings.grpc_ports]


def local_websocket(settings: Settings) -> list[tuple[str, int]]:
    """The WebSocket bridges of `flowport up`'s own server processes (none when --websocket-port is 0)."""
    host = _connect_host(settings.grpc_host)
    return [] if settings.no_local_server else [(host, port) for port in settings.websocket_ports]


def server_endpoints(local: Iterable[tuple[str, int]], upstreams: Iterable[Upstream]) -> list[dict[str, Any]]:
    """The local server processes, then the upstreams."""
    return [endpoint(host, port) for host, port in local] + [endpoint(u.host, u.port) for u in upstreams]


def bridge_endpoints(
    local: Iterable[tuple[str, int]], upstreams: Iterable[Upstream], websocket_port: int
) -> list[dict[str, Any]]:
    """The WebSocket bridges: the local processes', then each upstream host's on `websocket_port`.

    A server's bridge listens on its own host (on its `--grpc-host`), and
    every upstream host is taken to run one on the port this Envoy is
    given: servers sharing a host share that one bridge's endpoint. None when 0.
    """
    if not websocket_port:
        return []
    remote = dict.fromkeys(u.host for u in upstreams)  # each host once, in order
    return [endpoint(host, port) for host, port in local] + [endpoint(h, websocket_port) for h in remote]


def grpc_endpoints(settings: Settings) -> list[dict[str, Any]]:
    """The gRPC ports of the local server processes (one per `--workers`), then of the upstreams."""
    return server_endpoints(local_grpc(settings), settings.upstreams)


def websocket_endpoints(settings: Settings) -> list[dict[str, Any]]:
    """The WebSocket bridges of the local processes and of each upstream host (bridge_endpoints)."""
    return bridge_endpoints(local_websocket(settings), settings.upstreams, settings.websocket_port)
