"""`--upstream`, `--upstream-dns` and `--no-local-server`: what the flags accept, and the
clusters Envoy gets from them (health checks, ejection and the rate limit service alike
for every server)."""

from __future__ import annotations

from typing import Any

import pytest

from flowport.clients.cli import build_parser, load_settings
from flowport.server.settings import Settings, SettingsError
from flowport.server.shutdown import UNHEALTHY_THRESHOLD
from flowport.transcoder.envoy_config import render
from flowport.transcoder.envoy_routes import CLUSTER
from flowport.transcoder.websocket_routes import WEBSOCKET_CLUSTER

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def _no_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("UPSTREAM", "UPSTREAM_DNS", "NO_LOCAL_SERVER", "WORKERS", "CONFIG", "REDIS_URL", "DATABASE_URL"):
        monkeypatch.delenv(f"FLOWPORT_{name}", raising=False)


def _cli(*argv: str) -> Settings:
    return load_settings(build_parser().parse_args(["up", *argv]))


def _cluster(config: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in config["static_resources"]["clusters"] if c["name"] == name)
    return found


def _addresses(cluster: dict[str, Any]) -> list[tuple[str, int]]:
    [group] = cluster["load_assignment"]["endpoints"]
    return [
        (
            e["endpoint"]["address"]["socket_address"]["address"],
            e["endpoint"]["address"]["socket_address"]["port_value"],
        )
        for e in group["lb_endpoints"]
    ]


def test_the_flags_repeat_take_commas_and_keep_one_spelling() -> None:
    settings = _cli(
        "--upstream", "10.0.0.1:50051,[FD00::2]:50051", "--upstream", "10.0.0.3:7",
        "--upstream-dns", "Flowport.Default.svc.cluster.local.:50051",
    )  # fmt: skip
    assert settings.upstream == ["10.0.0.1:50051", "[fd00::2]:50051", "10.0.0.3:7"]
    assert settings.upstream_dns == ["flowport.default.svc.cluster.local:50051"]
    assert [(u.host, u.port, u.by_name) for u in settings.upstreams] == [
        ("10.0.0.1", 50051, False),
        ("fd00::2", 50051, False),
        ("10.0.0.3", 7, False),
        ("flowport.default.svc.cluster.local", 50051, True),
    ]
    # The environment takes the same comma-separated form.
    assert Settings.load(environ={"FLOWPORT_UPSTREAM": "10.0.0.1:1, 10.0.0.2:2"}).upstream == [
        "10.0.0.1:1",
        "10.0.0.2:2",
    ]


@pytest.mark.parametrize(
    ("flag", "value", "problem"),
    [
        ("--upstream", "10.0.0.1", "is not HOST:PORT"),
        ("--upstream", "10.0.0.1:0", "port must be a number from 1 to 65535"),
        ("--upstream", "10.0.0.1:65536", "port must be a number from 1 to 65535"),
        ("--upstream", "10.0.0.1:+80", "port must be a number from 1 to 65535"),
        ("--upstream", "::1:50051", "IPv6 address goes in brackets"),
        ("--upstream", "[::1]", "is not HOST:PORT"),
        ("--upstream", "[10.0.0.1]:80", "only an IPv6 address goes in brackets"),
        ("--upstream", "[fe80::1%eth0]:80", "is not HOST:PORT"),
        ("--upstream", "server-1:50051", "give a name with --upstream-dns"),
        ("--upstream-dns", "10.0.0.1:50051", "give it with --upstream"),
        ("--upstream-dns", "[::1]:50051", "give it with --upstream"),
        ("--upstream-dns", "under_score:50051", "is not a DNS name"),
        ("--upstream-dns", "-bad.example:50051", "is not a DNS name"),
        ("--upstream-dns", "10.0.0.999:50051", "is not a DNS name"),
        ("--upstream-dns", "flowport:99999", "port must be a number from 1 to 65535"),
    ],
)
def test_a_bad_upstream_is_refused_naming_its_flag(flag: str, value: str, problem: str) -> None:
    setting = flag.removeprefix("--").replace("-", "_")
    with pytest.raises(SettingsError, match=rf"invalid setting {setting} \(flag {flag}\)") as refused:
        _cli(f"{flag}={value}")  # one argument: a value may start with '-'
    assert problem in str(refused.value)


def test_envoy_alone_needs_an_upstream_and_runs_no_workers() -> None:
    with pytest.raises(SettingsError, match=r"--no-local-server.*--upstream or --upstream-dns"):
        _cli("--no-local-server")
    with pytest.raises(SettingsError, match=r"workers \(--workers\).*no_local_server"):
        _cli("--no-local-server", "--upstream", "10.0.0.1:50051", "--workers", "2")
    with pytest.raises(SettingsError, match=r"upstream 10\.0\.0\.1:50051 is given twice"):
        _cli("--upstream", "10.0.0.1:50051", "--upstream", "10.0.0.1:50051")
    # Envoy alone counts nothing in Redis itself: the servers behind it answer its rate limit service.
    alone = _cli("--no-local-server", "--upstream-dns", "flowport:50051", "--rate-limit-tenant-max-requests", "10")
    assert alone.rate_limit_tenant_max_requests == 10
    with pytest.raises(SettingsError, match="rate_limit_tenant_max_requests counts in Redis"):
        _cli("--upstream-dns", "flowport:50051", "--rate-limit-tenant-max-requests", "10")


def test_without_upstreams_envoy_points_at_the_local_servers_only() -> None:
    config = render(Settings.load({"grpc_port": 6000, "websocket_port": 7000}, environ={}))
    grpc = _cluster(config, CLUSTER)
    assert grpc["type"] == "STATIC" and "dns_lookup_family" not in grpc
    assert _addresses(grpc) == [("127.0.0.1", 6000)]
    assert _addresses(_cluster(config, WEBSOCKET_CLUSTER)) == [("127.0.0.1", 7000)]


def test_addresses_alone_make_a_static_cluster_beside_the_local_server() -> None:
    settings = _cli("--grpc-port", "6000", "--websocket-port", "7000", "--upstream", "10.0.0.2:6000,[fd00::3]:6001")
    config = render(settings)
    grpc = _cluster(config, CLUSTER)
    assert grpc["type"] == "STATIC"
    assert _addresses(grpc) == [("127.0.0.1", 6000), ("10.0.0.2", 6000), ("fd00::3", 6001)]
    # Each upstream host's WebSocket bridge is on the --websocket-port Envoy is given.
    assert _addresses(_cluster(config, WEBSOCKET_CLUSTER)) == [
        ("127.0.0.1", 7000),
        ("10.0.0.2", 7000),
        ("fd00::3", 7000),
    ]


def test_a_name_makes_one_strict_dns_cluster_of_every_upstream_health_checked_alike() -> None:
    settings = _cli(
        "--no-local-server", "--websocket-port", "7000",
        "--upstream", "10.0.0.2:6000", "--upstream", "10.0.0.2:6001",
        "--upstream-dns", "flowport-servers.default.svc.cluster.local:6000",
        "--rate-limit-tenant-max-requests", "10",
    )  # fmt: skip
    config = render(settings)
    grpc = _cluster(config, CLUSTER)
    assert grpc["type"] == "STRICT_DNS" and grpc["dns_lookup_family"] == "V4_PREFERRED"
    # No local server: only the upstreams, the addresses among them resolving to themselves.
    assert _addresses(grpc) == [
        ("10.0.0.2", 6000),
        ("10.0.0.2", 6001),
        ("flowport-servers.default.svc.cluster.local", 6000),
    ]
    # Health checks and ejection are the cluster's: every endpoint gets them, as a local server does.
    [check] = grpc["health_checks"]
    assert "grpc_health_check" in check and check["unhealthy_threshold"] == UNHEALTHY_THRESHOLD
    assert grpc["outlier_detection"]["enforcing_consecutive_local_origin_failure"] == 100
    assert grpc["common_lb_config"]["healthy_panic_threshold"] == {"value": 0}
    # Two servers on one host share its one bridge endpoint.
    ws = _cluster(config, WEBSOCKET_CLUSTER)
    assert ws["type"] == "STRICT_DNS"
    assert _addresses(ws) == [("10.0.0.2", 7000), ("flowport-servers.default.svc.cluster.local", 7000)]
    # The rate limit service is asked of the same servers (they count in their shared Redis).
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    limit = next(f for f in manager["http_filters"] if f["name"] == "envoy.filters.http.ratelimit")
    assert limit["typed_config"]["rate_limit_service"]["grpc_service"]["envoy_grpc"]["cluster_name"] == CLUSTER
