"""The servers' endpoints in files Envoy watches (`flowport up`, `flowport upstreams`): the same
servers as the inline config, written by rename, and the changes refused before anything is written.
tests/integration/test_upstream_reload.py changes them under a running Envoy."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from flowport.clients.cli import main
from flowport.server.endpoint_files import CHANGE_LOCK, SERVERS_FILE, EndpointFilesError, Servers, read, write
from flowport.server.settings import Settings
from flowport.server.upstreams import parse_upstream
from flowport.transcoder.envoy_config import render
from flowport.transcoder.envoy_routes import CLUSTER
from flowport.transcoder.websocket_routes import WEBSOCKET_CLUSTER

from ..backends import free_port

pytestmark = pytest.mark.timeout(30)
MEMBERSHIP = {"type", "load_assignment", "eds_cluster_config", "ignore_health_on_host_removal", "dns_lookup_family"}


@pytest.fixture(autouse=True)
def _no_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("UPSTREAM", "UPSTREAM_DNS", "NO_LOCAL_SERVER", "WORKERS", "CONFIG", "DATA_DIR"):
        monkeypatch.delenv(f"FLOWPORT_{name}", raising=False)


def _clusters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def _addresses(document: dict[str, Any]) -> list[str]:
    [assignment] = document["resources"]
    [group] = assignment["endpoints"]
    found = [e["endpoint"]["address"]["socket_address"] for e in group["lb_endpoints"]]
    return [f"{a['address']}:{a['port_value']}" for a in found]


def _upstreams(*texts: str) -> list[Any]:
    return [parse_upstream(t, by_name=False) for t in texts]


def test_up_reads_the_servers_from_files_holding_what_the_inline_config_holds(tmp_path: Path) -> None:
    settings = Settings.load(
        {"grpc_port": 6000, "websocket_port": 7000, "upstream": "10.0.0.2:6000,10.0.0.2:6001,[fd00::3]:6000"},
        environ={},
    )
    directory = tmp_path / "endpoints"
    write(directory, Servers.of(settings))
    inline, from_files = _clusters(render(settings)), _clusters(render(settings, endpoints_dir=directory))
    for name in (CLUSTER, WEBSOCKET_CLUSTER):
        cluster = from_files[name]
        assert cluster["type"] == "EDS" and cluster["ignore_health_on_host_removal"] is True
        source = cluster["eds_cluster_config"]["eds_config"]
        assert source == {"path_config_source": {"path": str(directory / f"{name}.json")}, "resource_api_version": "V3"}
        document = json.loads((directory / f"{name}.json").read_text())
        [assignment] = document["resources"]
        assert assignment["@type"] == "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
        assert assignment["cluster_name"] == name
        assert assignment["endpoints"] == inline[name]["load_assignment"]["endpoints"]
        # Health checks, ejection, balancing: all else is the inline cluster's.
        assert {k: v for k, v in cluster.items() if k not in MEMBERSHIP} == {
            k: v for k, v in inline[name].items() if k not in MEMBERSHIP
        }
    assert _addresses(json.loads((directory / f"{WEBSOCKET_CLUSTER}.json").read_text())) == [
        "127.0.0.1:7000",
        "10.0.0.2:7000",  # one bridge per host
        "fd00::3:7000",
    ]
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()} == {
        f"{CLUSTER}.json": 0o600,
        f"{WEBSOCKET_CLUSTER}.json": 0o600,
        SERVERS_FILE: 0o600,
    }
    assert read(directory) == Servers.of(settings)


def test_a_dns_name_keeps_the_servers_in_the_bootstrap_and_refuses_changes(tmp_path: Path) -> None:
    settings = Settings.load(
        {"no_local_server": True, "upstream": "10.0.0.2:6000", "upstream_dns": "flowport.default.svc:6000"},
        environ={},
    )
    directory = tmp_path / "endpoints"
    write(directory, Servers.of(settings))
    assert render(settings, endpoints_dir=directory) == render(settings)
    assert [p.name for p in directory.iterdir()] == [SERVERS_FILE]
    with pytest.raises(EndpointFilesError, match=r"resolves --upstream-dns flowport\.default\.svc:6000 itself"):
        read(directory).with_upstreams(_upstreams("10.0.0.3:6000"))


def test_a_change_is_checked_then_written_over_the_files_by_rename(tmp_path: Path) -> None:
    servers = Servers.of(Settings.load({"grpc_port": 6000, "websocket_port": 0}, environ={}))
    with pytest.raises(EndpointFilesError, match=r"upstream 10\.0\.0\.2:1 is given twice"):
        servers.with_upstreams(_upstreams("10.0.0.2:1", "10.0.0.2:1"))
    with pytest.raises(EndpointFilesError, match=r"127\.0\.0\.1:6000 is one of flowport up's own servers"):
        servers.with_upstreams(_upstreams("127.0.0.1:6000"))
    alone = Servers(admin_port=1, upstreams=tuple(_upstreams("10.0.0.2:1")))
    with pytest.raises(EndpointFilesError, match="no server left"):
        alone.with_upstreams([])

    directory = tmp_path / "endpoints"
    write(directory, servers)
    grpc = directory / f"{CLUSTER}.json"
    before = grpc.stat().st_ino
    changed = servers.with_upstreams(_upstreams("10.0.0.2:6000", "[fd00::3]:6000"))
    write(directory, changed)
    # A new file renamed over the name (what Envoy watches for), not the old one rewritten.
    assert grpc.stat().st_ino != before
    assert _addresses(json.loads(grpc.read_text())) == ["127.0.0.1:6000", "10.0.0.2:6000", "fd00::3:6000"]
    assert sorted(p.name for p in directory.iterdir()) == [f"{CLUSTER}.json", SERVERS_FILE]  # nothing half-written
    assert read(directory) == changed
    # Back to the local server alone: allowed while it runs.
    assert read(directory).with_upstreams([]).upstreams == ()


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["upstreams", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_command_refuses_bad_changes_and_writes_nothing_without_a_running_envoy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    code, _, err = _cli(capsys, "list", "--data-dir", str(data))
    assert code == 2 and "no flowport up has started with this --data-dir" in err

    settings = Settings.load(
        {"data_dir": data, "grpc_port": 6000, "admin_port": free_port(), "upstream": "10.0.0.2:6000"}, environ={}
    )
    directory = data / "endpoints"
    data.mkdir()  # as flowport up made it
    write(directory, Servers.of(settings))
    written = {p.name: p.read_text() for p in directory.iterdir()}
    code, _, err = _cli(capsys, "add", "--data-dir", str(data), "flowport.example:6000")
    assert code == 2 and "flowport.example:6000 is a name" in err
    code, _, err = _cli(capsys, "add", "--data-dir", str(data), "10.0.0.2:6000")
    assert code == 2 and "already an upstream: 10.0.0.2:6000" in err
    code, _, err = _cli(capsys, "remove", "--data-dir", str(data), "10.0.0.9:6000")
    assert code == 2 and "not an upstream: 10.0.0.9:6000 (the upstreams are 10.0.0.2:6000)" in err
    code, _, err = _cli(capsys, "set", "--data-dir", str(data), "10.0.0.3:99999")
    assert code == 2 and "the port must be a number from 1 to 65535" in err
    # A valid change, but no Envoy answers on the admin port: nothing is written.
    code, _, err = _cli(capsys, "add", "--data-dir", str(data), "10.0.0.3:6000")
    assert code == 3 and "does not answer: is flowport up running with --data-dir" in err
    # (The change lock it took is no endpoints file: Envoy reads only the files it was told of.)
    assert {p.name: p.read_text() for p in directory.iterdir() if p.name != CHANGE_LOCK} == written
    # The list still shows what was last written.
    code, out, err = _cli(capsys, "list", "--data-dir", str(data))
    assert code == 0 and "warning" in err
    assert out.split() == ["127.0.0.1:6000", "local", "10.0.0.2:6000", "upstream"]
