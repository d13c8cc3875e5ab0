"""Envoy's CPU per REST call, with parts of its HTTP filter chain left out.

Starts `flowport up` (as the harness does: access log and rate limits off),
makes a session, then runs further Envoy processes next to it, each on the
rendered config with one change, in front of the same server. Each takes
--requests REST calls from h2load (4 connections, 8 streams each) after a
warm-up: GetSession, or with `--call execute` the trivial workflow's
execute. The Envoy's CPU time (from /proc) per call is reported, variants
alternating over --rounds so the machine's drift hits each alike. Every
answer is checked (h2load counts non-2xx as errors).

    python -m benchmarks.envoy_filters --rounds 5 --requests 20000

Variants: `full` (the config as rendered), `no-edge-lua` (without
transcoder/edge.lua), `no-body-lua` (without body_fields.lua and
request_ids.lua), `no-lua` (none of the three), `minimal` (the transcoder
and the router alone: the floor), `one-worker` (`--concurrency 1`),
`no-access-log`, `no-stats` (every statistic rejected), `no-request-id`
(no `x-request-id` made), `quiet-router` (`suppress_envoy_headers`),
`upstream-8-streams` (at most 8 streams per connection to the server),
`nghttp2` and `oghttp2` (Envoy's HTTP/2 codec chosen by its runtime flag
`envoy.reloadable_features.http2_use_oghttp2`, on both sides). The
server's CPU per call is reported too: what Envoy sends it costs the server
as well.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.harness import http_tools, procstat
from benchmarks.harness.targets import FlowportUp, free_port
from benchmarks.scenarios.setup import HEADERS, prepare

Config = dict[str, Any]


def _connection_managers(config: Config) -> Iterator[Config]:
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                if network_filter["name"].endswith("http_connection_manager"):
                    yield network_filter["typed_config"]


def _without(predicate: Callable[[str], bool]) -> Callable[[Config], None]:
    def change(config: Config) -> None:
        for manager in _connection_managers(config):
            manager["http_filters"] = [f for f in manager["http_filters"] if not predicate(f["name"])]

    return change


def _no_access_log(config: Config) -> None:
    for manager in _connection_managers(config):
        manager.pop("access_log", None)


def _no_stats(config: Config) -> None:
    config["stats_config"] = {"stats_matcher": {"reject_all": True}}


def _no_request_id(config: Config) -> None:
    for manager in _connection_managers(config):
        manager["generate_request_id"] = False


def _quiet_router(config: Config) -> None:
    for manager in _connection_managers(config):
        for http_filter in manager["http_filters"]:
            if http_filter["name"].endswith("router"):
                http_filter["typed_config"]["suppress_envoy_headers"] = True


def _quiet_router_own_timeout_header(config: Config) -> None:
    """`quiet-router`, each route with a timeout sending it to the server as a header of its own."""
    _quiet_router(config)
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                manager = network_filter["typed_config"]
                if "route_config" not in manager:
                    continue
                for host in manager["route_config"]["virtual_hosts"]:
                    for route in host["routes"]:
                        timeout = route.get("route", {}).get("timeout", "0s")
                        if timeout != "0s":
                            ms = str(round(float(timeout.rstrip("s")) * 1000))
                            header = {"key": "x-envoy-expected-rq-timeout-ms", "value": ms}
                            route["request_headers_to_add"] = [
                                {"header": header, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
                            ]


def _upstream_streams(streams: int) -> Callable[[Config], None]:
    """At most `streams` streams per upstream connection: Envoy opens more connections to the server."""

    def change(config: Config) -> None:
        for cluster in config["static_resources"]["clusters"]:
            options = cluster.get("typed_extension_protocol_options", {})
            for protocol in options.values():
                http2 = protocol.get("explicit_http_config", {}).get("http2_protocol_options")
                if http2 is not None:
                    http2["max_concurrent_streams"] = streams

    return change


def _http2_codec(oghttp2: bool) -> Callable[[Config], None]:
    """Envoy's HTTP/2 codec picked by its runtime flag (both sides: clients and the server)."""

    def change(config: Config) -> None:
        layer = {"envoy.reloadable_features.http2_use_oghttp2": oghttp2}
        config["layered_runtime"] = {"layers": [{"name": "codec", "static_layer": layer}]}

    return change


VARIANTS: dict[str, Callable[[Config], None]] = {
    "full": lambda config: None,
    "no-edge-lua": _without(lambda name: name == "envoy.filters.http.lua"),
    "no-body-lua": _without(lambda name: name in ("flowport.body_fields", "flowport.request_ids")),
    "no-lua": _without(lambda name: name in ("envoy.filters.http.lua", "flowport.body_fields", "flowport.request_ids")),
    "minimal": _without(lambda name: not name.endswith(("grpc_json_transcoder", "router"))),
    "one-worker": lambda config: None,
    "no-access-log": _no_access_log,
    "no-stats": _no_stats,
    "no-request-id": _no_request_id,
    "quiet-router": _quiet_router,
    "quiet-router-timeout-header": _quiet_router_own_timeout_header,
    "upstream-8-streams": _upstream_streams(8),
    "nghttp2": _http2_codec(oghttp2=False),
    "oghttp2": _http2_codec(oghttp2=True),
}


def _variant(rendered: Config, name: str, listen_port: int, port: int, admin_port: int) -> Config:
    """The rendered config on other ports, with `name`'s change: only the main listener kept."""
    config = copy.deepcopy(rendered)
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    listeners = [
        listener
        for listener in config["static_resources"]["listeners"]
        if listener["address"]["socket_address"]["port_value"] == listen_port
    ]
    listeners[0]["address"]["socket_address"]["port_value"] = port
    config["static_resources"]["listeners"] = listeners
    VARIANTS[name](config)
    return config


def _measure(
    envoy: str,
    config_path: Path,
    name: str,
    *,
    base_id: int,
    port: int,
    url: str,
    body: bytes | None,
    requests: int,
    server_pids: list[int],
) -> tuple[float, float]:
    """Envoy's and the server's CPU ms per call of one variant."""
    extra = ["--concurrency", "1"] if name == "one-worker" else []
    command = [envoy, "-c", str(config_path), "--disable-hot-restart", "--log-level", "error"]
    process = subprocess.Popen([*command, "--base-id", str(base_id), *extra])
    try:
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        headers = {**HEADERS, "content-type": "application/json"} if body else HEADERS
        http_tools.h2load(url, requests=500, clients=4, streams=8, headers=headers, body=body)
        before = procstat.tree_cpu_seconds([process.pid])
        server_before = procstat.tree_cpu_seconds(server_pids)
        result = http_tools.h2load(url, requests=requests, clients=4, streams=8, headers=headers, body=body)
        spent = procstat.tree_cpu_seconds([process.pid]) - before
        server_spent = procstat.tree_cpu_seconds(server_pids) - server_before
    finally:
        process.terminate()
        process.wait(10)
    if result.errors or result.requests != requests:
        raise SystemExit(f"{name}: {result.errors} failed calls of {result.requests}")
    return 1000 * spent / requests, 1000 * server_spent / requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument(
        "--call",
        choices=("get-session", "execute"),
        default="get-session",
        help="GET /api/sessions/{id}, or POST /workflows/trivial/execute (the harness's trivial workflow)",
    )
    parser.add_argument("variants", nargs="*", default=list(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    args = parser.parse_args()
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory() as tmp, FlowportUp.run(Path(tmp) / "up") as up:
        session = prepare(up)
        rendered = json.loads((Path(tmp) / "up" / "envoy.json").read_text())
        envoy = str(Path(f"/proc/{up.envoy_pids()[0]}/exe").readlink())
        spent: dict[str, list[float]] = {name: [] for name in args.variants}
        server: dict[str, list[float]] = {name: [] for name in args.variants}
        for round_ in range(args.rounds):
            for n, name in enumerate(args.variants):
                port, admin_port = free_port(), free_port()
                config_path = Path(tmp) / f"{name}.json"
                config = _variant(rendered, name, up.settings.http_port, port, admin_port)
                config_path.write_text(json.dumps(config))
                url = f"http://127.0.0.1:{port}/api/sessions/{session.session_id}"
                body = None
                if args.call == "execute":
                    url, body = f"http://127.0.0.1:{port}/workflows/trivial/execute", b'{"inputs": {"n": 1}}'
                base_id = 100 + 10 * round_ + n  # Envoys side by side need their own shared-memory ids
                ms, server_ms = _measure(
                    envoy,
                    config_path,
                    name,
                    base_id=base_id,
                    port=port,
                    url=url,
                    body=body,
                    requests=args.requests,
                    server_pids=up.server_pids(),
                )
                spent[name].append(ms)
                server[name].append(server_ms)
                print(f"round {round_ + 1} {name}: Envoy {ms:.4f} ms, server {server_ms:.4f} ms", flush=True)
    print(f"\nCPU per REST call ({args.call}), ms (median, min over rounds): Envoy, then the server")
    for name, values in spent.items():
        print(
            f"  {name:18s} {statistics.median(values):.4f}  {min(values):.4f}"
            f"    {statistics.median(server[name]):.4f}  {min(server[name]):.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
