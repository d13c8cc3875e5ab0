"""`--dev`: loopback for HTTP nodes, service checks and webhooks when trying flowport out locally, and
refusals that name the setting which would allow the target."""

from __future__ import annotations

import httpx
import pytest

from flowport.clients.cli import build_parser, load_settings
from flowport.server.nodes.base import NodeError
from flowport.server.nodes.http import _check_target
from flowport.server.settings import Settings, SettingsError


def _cli(*argv: str) -> Settings:
    return load_settings(build_parser().parse_args(list(argv)))


@pytest.fixture(autouse=True)
def _no_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FLOWPORT_DEV", "FLOWPORT_HTTP_ALLOWLIST", "FLOWPORT_CONFIG"):
        monkeypatch.delenv(name, raising=False)


def test_dev_is_off_by_default_and_adds_only_loopback_to_http_nodes_checks_and_webhooks() -> None:
    plain = Settings.load({"http_allowlist": "10.0.0.5", "webhook_allowlist": "hooks.internal"}, environ={})
    assert plain.dev is False and plain.http_node_allowlist == frozenset({"10.0.0.5"})
    assert plain.webhook_target_allowlist == frozenset({"hooks.internal"})
    dev = Settings.load({"http_allowlist": "10.0.0.5,[FD00::2]", "dev": "true"}, environ={})
    loopback = {"127.0.0.1", "::1", "localhost"}
    assert dev.http_node_allowlist == frozenset({"10.0.0.5", "fd00::2"} | loopback)
    assert dev.webhook_target_allowlist == frozenset(loopback)
    # The configured lists stay as given, and SQL nodes get nothing.
    assert dev.http_allowlist == ["10.0.0.5", "[FD00::2]"]
    assert dev.webhook_allowlist == [] and dev.sql_allowlist == []


def test_dev_comes_from_the_environment_and_bad_values_name_it() -> None:
    assert Settings.load(environ={"FLOWPORT_DEV": "1"}).dev is True
    with pytest.raises(SettingsError, match=r"invalid setting dev \(environment FLOWPORT_DEV\)"):
        Settings.load(environ={"FLOWPORT_DEV": "sometimes"})


@pytest.mark.parametrize("command", ["up", "serve"])
def test_dev_is_a_switch_on_up_and_serve(command: str) -> None:
    assert _cli(command).dev is False
    assert _cli(command, "--dev").dev is True
    assert _cli(command, "--dev", "false").dev is False
    # Other true/false settings are switches the same way; valued flags still need their value.
    assert _cli(command, "--dev", "--insecure-no-auth", "--http-port", "9000").insecure_no_auth is True
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--http-port"])


def test_help_lists_dev(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--dev [BOOL]" in text and "webhooks may also reach loopback" in text


async def test_http_node_refusal_names_the_flags_and_dev_allows_loopback() -> None:
    plain, dev = Settings.load(environ={}), Settings.load({"dev": True}, environ={})
    for url in ("http://127.0.0.1:8080/health", "http://[::1]:8080/", "http://localhost:8080/"):
        with pytest.raises(NodeError) as refused:
            await _check_target(httpx.URL(url), plain.http_node_allowlist)
        assert refused.value.reason == "HTTP_TARGET_FORBIDDEN"
        # An address is named (the URL has it); a name's message does not say what it resolves to.
        assert "not allowlisted (--http-allowlist, or --dev for loopback)" in str(refused.value)
        assert "localhost" not in url or "127.0.0.1" not in str(refused.value)
        # Allowlisted: connected to as given, nothing to pin.
        assert await _check_target(httpx.URL(url), dev.http_node_allowlist) is None
    # --dev is loopback only: other internal addresses stay refused.
    for url in ("http://10.0.0.5/", "http://169.254.169.254/latest/meta-data/", "http://127.0.0.2/"):
        with pytest.raises(NodeError, match="--http-allowlist"):
            await _check_target(httpx.URL(url), dev.http_node_allowlist)
