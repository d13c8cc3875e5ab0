"""`flowport keys create|list|revoke` against a real `flowport serve`
subprocess: keys printed once, tables and JSON, immediate revocation, and
clear errors with distinct exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from flowport.clients import ApiError, Client
from flowport.clients.cli import main
from flowport.clients.cli.keys import parse_expiry
from flowport.server.settings import Settings
from flowport.v1 import gateway_pb2

from ..conftest import ADMIN_KEY, ServeProcess, free_port, make_settings


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    settings = make_settings(tmp_path_factory.mktemp("keys") / "data")
    process = ServeProcess(settings)
    process.start()
    try:
        yield settings
    finally:
        process.stop()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only what a test sets says where the server and the key are.
    for name in [n for n in os.environ if n.startswith("FLOWPORT_")]:
        monkeypatch.delenv(name)


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["keys", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _admin(server: Settings, *argv: str) -> list[str]:
    return [*argv, "--target", server.grpc_target, "--api-key", ADMIN_KEY]


def _works(server: Settings, key: str) -> grpc.StatusCode:
    with Client(server.grpc_target, api_key=key) as client:
        try:
            client.gateway.GetStats(gateway_pb2.GetStatsRequest(), timeout=5)  # GetInfo is public
        except grpc.RpcError as exc:
            return ApiError.from_rpc_error(exc).code()
    return grpc.StatusCode.OK


def test_create_prints_the_key_alone_on_stdout_once(server: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(capsys, *_admin(server, "create", "--tenant", "acme", "--description", "ci runner"))
    assert code == 0
    key = out.strip()
    assert out == key + "\n" and key.startswith("fpk_")
    key_id = key.split(".")[0]
    assert key_id in err and "acme" in err and "shown only this once" in err
    assert _works(server, key) is grpc.StatusCode.OK


def test_create_as_json_and_list_as_table_and_json(server: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["create", "--tenant", "beta", "--role", "user", "--role", "admin", "--expires", "2h", "--json"]
    code, out, _ = _cli(capsys, *_admin(server, *argv))
    assert code == 0
    created = json.loads(out)
    assert created["tenant"] == "beta" and created["roles"] == ["admin", "user"] and created["key"]
    expires = datetime.fromisoformat(created["expire_time"])
    assert timedelta(minutes=119) < expires - datetime.now(UTC) <= timedelta(hours=2)

    code, out, _ = _cli(capsys, *_admin(server, "list"))
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "TENANT", "ROLES", "CREATED", "EXPIRES", "REVOKED", "DESCRIPTION"]
    (row,) = [r.split() for r in rows if r.startswith(created["key_id"])]
    assert row[1:3] == ["beta", "admin,user"] and row[4] == expires.strftime("%Y-%m-%dT%H:%M:%SZ") and row[5] == "-"
    assert any("default" in r and "admin,user" in r and "never" in r for r in rows), "the bootstrap admin key"

    code, out, _ = _cli(capsys, *_admin(server, "list", "--tenant", "beta", "--json"))
    assert code == 0
    assert [k["key_id"] for k in json.loads(out)] == [created["key_id"]]
    assert "key" not in json.loads(out)[0], "a listing never holds a key"


def test_revoke_takes_effect_at_once(server: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = _cli(capsys, *_admin(server, "create", "--tenant", "gamma"))
    key = out.strip()
    key_id = key.split(".")[0]
    assert _works(server, key) is grpc.StatusCode.OK  # and now cached by the server
    code, out, _ = _cli(capsys, *_admin(server, "revoke", key_id))
    assert code == 0 and out.startswith(f"revoked {key_id} (tenant gamma) at ")
    assert _works(server, key) is grpc.StatusCode.UNAUTHENTICATED
    _, out, _ = _cli(capsys, *_admin(server, "list", "--tenant", "gamma"))
    (row,) = [r.split() for r in out.splitlines() if r.startswith(key_id)]
    assert row[5] != "-"


def test_the_admin_key_is_found_in_the_environment_or_the_data_dir(
    server: Settings, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "admin-api-key").write_text(ADMIN_KEY + "\n")
    target = ["--target", server.grpc_target]
    assert _cli(capsys, "list", *target, "--data-dir", str(tmp_path))[0] == 0
    monkeypatch.setenv("FLOWPORT_DATA_DIR", str(tmp_path))
    assert _cli(capsys, "list", *target)[0] == 0
    monkeypatch.setenv("FLOWPORT_DATA_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("FLOWPORT_API_KEY", ADMIN_KEY)
    assert _cli(capsys, "list", *target)[0] == 0


def test_the_target_comes_from_the_environment_and_a_url_is_a_usage_error(
    server: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    key = ["--api-key", ADMIN_KEY, "--data-dir", str(tmp_path)]  # the data dir's settings point elsewhere
    monkeypatch.setenv("FLOWPORT_TARGET", server.grpc_target)
    assert _cli(capsys, "list", *key)[0] == 0
    # What `flowport up` prints is a URL: the command says what it takes instead of failing to resolve.
    code, out, err = _cli(capsys, "list", *key, "--target", f"http://{server.grpc_target}")
    assert (code, out) == (2, "") and "--target takes HOST:PORT, not a URL: leave out http://" in err
    monkeypatch.setenv("FLOWPORT_TARGET", f"http://{server.grpc_target}")
    code, _, err = _cli(capsys, "list", *key)
    assert code == 2 and "FLOWPORT_TARGET takes HOST:PORT" in err


def test_no_key_is_a_usage_error_that_says_where_it_looked(
    server: Settings, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = _cli(capsys, "list", "--target", server.grpc_target, "--data-dir", str(tmp_path))
    assert (code, out) == (2, "")
    assert "--api-key" in err and "FLOWPORT_API_KEY" in err and str(tmp_path / "admin-api-key") in err


def test_an_unreachable_server_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    target = f"127.0.0.1:{free_port()}"
    code, _, err = _cli(capsys, "list", "--target", target, "--api-key", ADMIN_KEY, "--timeout", "3")
    assert code == 3
    assert f"cannot reach the server at {target}" in err


def test_a_key_the_server_refuses_exits_4(server: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(capsys, "list", "--target", server.grpc_target, "--api-key", "fpk_nope.nope")
    assert code == 4 and "did not accept the API key" in err
    _, user_key, _ = _cli(capsys, *_admin(server, "create", "--tenant", "delta"))
    code, _, err = _cli(capsys, "list", "--target", server.grpc_target, "--api-key", user_key.strip())
    assert code == 4 and "not an admin key" in err
    # An admin of delta is one, for delta alone: naming another tenant is refused with the server's why.
    _, delta_admin, _ = _cli(capsys, *_admin(server, "create", "--tenant", "delta", "--role", "admin"))
    target = ("--target", server.grpc_target, "--api-key", delta_admin.strip())
    code, _, err = _cli(capsys, "list", "--tenant", "epsilon", *target)
    assert code == 4 and "not an admin key" not in err and "its own tenant" in err, err
    code, out, _ = _cli(capsys, "list", *target)
    assert code == 0 and "delta" in out and "default" not in out, out


def test_a_refused_request_exits_1_naming_the_field(server: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(capsys, *_admin(server, "create", "--tenant", "Not A Tenant"))
    assert code == 1 and "api_key.tenant" in err
    code, _, err = _cli(capsys, *_admin(server, "revoke", "fpk_missing"))
    assert code == 1 and "fpk_missing" in err


def test_expiry_takes_iso_times_and_durations(capsys: pytest.CaptureFixture[str]) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_expiry("90d", now) == now + timedelta(days=90)
    assert parse_expiry("1w2d12h", now) == now + timedelta(days=9, hours=12)
    assert parse_expiry("2026-01-31", now) == datetime(2026, 1, 31, tzinfo=UTC)
    assert parse_expiry("2026-01-31T12:00:00+01:00", now) == datetime(2026, 1, 31, 11, tzinfo=UTC)
    assert parse_expiry("2026-01-31T12:00:00Z", now) == datetime(2026, 1, 31, 12, tzinfo=UTC)
    with pytest.raises(SystemExit) as exited:
        main(["keys", "create", "--expires", "next tuesday"])
    assert exited.value.code == 2
    assert "neither an ISO 8601 time" in capsys.readouterr().err


def test_help_explains_the_key_lookup_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["keys", "--help"], ["keys", "create", "--help"], ["keys", "revoke", "--help"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 0
        text = capsys.readouterr().out
        assert "FLOWPORT_API_KEY" in text and "admin-api-key" in text and "exit codes" in text


def test_the_flowport_command_end_to_end(server: Settings) -> None:
    flowport = shutil.which("flowport")
    assert flowport is not None, "pip install -e . puts the command on PATH"
    env = {**os.environ, "FLOWPORT_API_KEY": ADMIN_KEY, "FLOWPORT_GRPC_PORT": str(server.grpc_port)}
    result = subprocess.run(
        [flowport, "keys", "create", "--tenant", "epsilon", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert _works(server, json.loads(result.stdout)["key"]) is grpc.StatusCode.OK


def test_a_list_into_a_closed_pipe_ends_quietly_with_141(server: Settings) -> None:
    flowport = shutil.which("flowport")
    assert flowport is not None, "pip install -e . puts the command on PATH"
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `| head -1` once it has read its line
    try:
        result = subprocess.run(
            [flowport, "keys", "list", "--target", server.grpc_target, "--api-key", ADMIN_KEY],
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr.decode()) == (141, "")
