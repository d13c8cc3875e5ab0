"""Settings: precedence flag > environment > config file > default, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowport.server.settings import Settings, SettingsError


def test_defaults_match_the_documented_ones() -> None:
    s = Settings.load({}, environ={})
    assert (s.host, s.http_port, s.grpc_port, s.admin_port) == ("127.0.0.1", 8080, 50051, 9901)
    assert s.data_dir == Path(".flowport")
    assert s.database_path == Path(".flowport/flowport.db")


def test_flag_beats_environment_beats_config_file(tmp_path: Path) -> None:
    config = tmp_path / "flowport.toml"
    config.write_text('http_port = 7001\ngrpc_port = 7002\nadmin_port = 7003\nlog_level = "debug"\n')
    s = Settings.load(
        {"http_port": "9001"},
        environ={"FLOWPORT_HTTP_PORT": "8001", "FLOWPORT_GRPC_PORT": "8002"},
        config_file=config,
    )
    assert (s.http_port, s.grpc_port, s.admin_port, s.log_level) == (9001, 8002, 7003, "debug")


def test_config_file_may_use_a_flowport_table_and_is_found_through_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "shared.toml"
    config.write_text("[flowport]\ngrpc-port = 6000\n")
    assert Settings.load({}, environ={"FLOWPORT_CONFIG": str(config)}).grpc_port == 6000


@pytest.mark.parametrize(
    ("flags", "environ", "expected"),
    [
        ({"http_port": "eighty"}, {}, "invalid setting http_port (flag --http-port)"),
        ({}, {"FLOWPORT_GRPC_PORT": "70000"}, "invalid setting grpc_port (environment FLOWPORT_GRPC_PORT)"),
        ({}, {"FLOWPORT_LOG_LEVEL": "loud"}, "invalid setting log_level (environment FLOWPORT_LOG_LEVEL)"),
        ({"shutdown_grace": "-1"}, {}, "invalid setting shutdown_grace (flag --shutdown-grace)"),
        ({"host": " "}, {}, "invalid setting host (flag --host)"),
    ],
)
def test_a_bad_value_names_the_setting_and_where_it_came_from(
    flags: dict[str, str], environ: dict[str, str], expected: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.load(flags, environ=environ)
    assert str(caught.value).startswith(expected)


def test_unknown_key_in_config_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "flowport.toml"
    config.write_text("htp_port = 1\n")
    with pytest.raises(SettingsError, match=r"unknown setting 'htp_port' in config file"):
        Settings.load({}, environ={}, config_file=config)


def test_missing_or_broken_config_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        Settings.load({}, environ={}, config_file=tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("http_port = \n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        Settings.load({}, environ={}, config_file=broken)


def test_bind_all_host_is_reached_through_loopback() -> None:
    s = Settings.load({"host": "0.0.0.0"}, environ={})  # noqa: S104
    assert s.grpc_target == "127.0.0.1:50051"
    assert s.http_url == "http://127.0.0.1:8080"
    v6 = Settings.load({"host": "::", "grpc_host": "::"}, environ={})
    assert v6.http_url == "http://[::1]:8080"
    assert v6.grpc_target == "[::1]:50051"


def test_the_grpc_server_stays_on_loopback_unless_asked() -> None:
    # Envoy may listen on every interface; the server behind it does not follow.
    assert Settings.load({"host": "0.0.0.0"}, environ={}).grpc_host == "127.0.0.1"  # noqa: S104


def test_settings_that_contradict_each_other_are_refused() -> None:
    with pytest.raises(SettingsError, match="counts in Redis: set redis_url too"):
        Settings.load({"rate_limit_tenant_max_requests": "10"}, environ={})
    with pytest.raises(SettingsError, match="redis_url must be a redis://") as caught:
        Settings.load({"redis_url": "http://localhost"}, environ={})
    # A rule over several settings says where each it names came from: flag, environment, default.
    assert str(caught.value).endswith("(redis_url from flag --redis-url)")
    with pytest.raises(SettingsError) as caught:
        Settings.load({"session_default_ttl": "100"}, environ={"FLOWPORT_SESSION_MAX_TTL": "10"})
    assert str(caught.value).endswith(
        "(session_default_ttl from flag --session-default-ttl,"
        " session_max_ttl from environment FLOWPORT_SESSION_MAX_TTL)"
    )
    with pytest.raises(SettingsError, match="cors_allow_credentials needs explicit cors_origins"):
        Settings.load({"cors_origins": "*", "cors_allow_credentials": "true"}, environ={})
    with pytest.raises(SettingsError, match="session_default_ttl must not exceed session_max_ttl"):
        Settings.load({"session_default_ttl": "100", "session_max_ttl": "10"}, environ={})
    with pytest.raises(SettingsError, match=r"execution_retention_seconds must be 0 \(keep all\) or at least 86400"):
        Settings.load({"execution_retention_seconds": "3600"}, environ={})
    assert Settings.load({"execution_retention_seconds": "0"}, environ={}).execution_retention_seconds == 0
    assert Settings.load({"execution_retention_seconds": "86400"}, environ={}).execution_retention_seconds == 86400


@pytest.mark.parametrize(
    "endpoint", ["https://otel.example.com", "otel:4317", "grpc://otel:4317", "http://otel:4317/v1"]
)
def test_an_otlp_endpoint_needs_scheme_host_and_port(endpoint: str) -> None:
    with pytest.raises(SettingsError, match="otlp_endpoint must be http://host:port or https://host:port"):
        Settings.load({"otlp_endpoint": endpoint}, environ={})
    for good in ("http://127.0.0.1:4317", "https://otel.example.com:4317", "http://[::1]:4317"):
        assert Settings.load({"otlp_endpoint": good}, environ={}).otlp_endpoint == good


def test_the_display_title_and_version_default_to_the_product_and_its_release() -> None:
    from flowport.server.version import VERSION

    s = Settings.load({}, environ={})
    assert (s.title, s.display_version, s.shown_version) == ("flowport", None, VERSION)
    shown = Settings.load({"title": "Test Gateway"}, environ={"FLOWPORT_DISPLAY_VERSION": "1.0.0"})
    assert (shown.title, shown.shown_version) == ("Test Gateway", "1.0.0")


@pytest.mark.parametrize(
    ("flags", "setting"),
    [
        ({"title": "two\nlines"}, "title"),
        ({"title": "  "}, "title"),
        ({"display_version": "1.0\x1b[2J"}, "display_version"),
        ({"title": "flow\u202eport"}, "title"),  # a right-to-left override
        ({"title": "flow\x85port"}, "title"),  # a C1 control
    ],
)
def test_a_display_title_or_version_must_be_printable(flags: dict[str, str], setting: str) -> None:
    with pytest.raises(SettingsError, match=f"invalid setting {setting} .*printable"):
        Settings.load(flags, environ={})
