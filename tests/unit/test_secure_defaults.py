"""Secure by default: no built-in secret anywhere, a fresh data dir gets its
own admin key (0600), and turning authentication off is loud. The gateway
flowport replaces shipped a default JWT secret in its code; these tests make
sure that cannot happen here."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import stat
import time
import typing
from pathlib import Path

import grpc
import pytest
from pydantic import SecretStr

from flowport.clients import ApiError, AsyncClient
from flowport.server.app import start, stop
from flowport.server.auth.bootstrap import admin_key_path
from flowport.server.settings import Settings
from flowport.v1 import session_pb2

from ..conftest import make_settings

# Secrets a careless gateway might sign with; none may be accepted.
GUESSES = ("", "secret", "changeme", "change-me", "your-secret-key", "jwt-secret", "kailash", "flowport", "x" * 32)


def _hs256(secret: str, claims: dict[str, object]) -> str:
    # By hand: token libraries refuse an empty key, which is exactly a guess to try.
    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signed = part(b'{"alg":"HS256","typ":"JWT"}') + "." + part(json.dumps(claims).encode())
    return signed + "." + part(hmac.new(secret.encode(), signed.encode(), hashlib.sha256).digest())


def test_no_setting_holds_a_built_in_secret() -> None:
    secret_fields = [
        name for name, field in Settings.model_fields.items() if SecretStr in typing.get_args(field.annotation)
    ]
    assert "jwt_secret" in secret_fields and "admin_api_key" in secret_fields
    for name in secret_fields:
        assert Settings.model_fields[name].default is None, f"{name} has a default value"
    defaults = Settings.load({}, environ={})
    assert all(getattr(defaults, name) is None for name in secret_fields)


async def _first_start(data_dir: Path) -> tuple[str, Settings]:
    # Enough attempts that the slowdown for repeated failures does not stall the test.
    settings = make_settings(data_dir, admin_api_key=None, max_login_attempts=100)
    running = await start(settings)
    try:
        async with AsyncClient(settings.grpc_target) as anonymous:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await anonymous.sessions.ListSessions(session_pb2.ListSessionsRequest())
            assert ApiError.from_rpc_error(caught.value).code() is grpc.StatusCode.UNAUTHENTICATED
            for guess in GUESSES:
                claims = {"sub": "x", "tenant": "default", "roles": ["admin"], "exp": int(time.time()) + 60}
                token = _hs256(guess, claims)
                async with AsyncClient(settings.grpc_target, token=token) as forged:
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await forged.sessions.ListSessions(session_pb2.ListSessionsRequest())
                assert ApiError.from_rpc_error(caught.value).code() is grpc.StatusCode.UNAUTHENTICATED, guess
        key = admin_key_path(settings).read_text().strip()
        async with AsyncClient(settings.grpc_target, api_key=key) as admin:
            await admin.sessions.ListSessions(session_pb2.ListSessionsRequest())
    finally:
        await stop(running, 1.0)
    return key, settings


async def test_each_fresh_data_dir_gets_its_own_admin_key_readable_by_its_owner_only(tmp_path: Path) -> None:
    first, settings = await _first_start(tmp_path / "one")
    second, _ = await _first_start(tmp_path / "two")
    assert first != second and first.startswith("fpk_")
    assert stat.S_IMODE(admin_key_path(settings).stat().st_mode) == 0o600


async def test_authentication_off_needs_the_flag_and_warns_on_every_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path, insecure_no_auth=True, admin_api_key=None)
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            running = await start(settings)
        try:
            async with AsyncClient(settings.grpc_target) as anonymous:
                await anonymous.sessions.ListSessions(session_pb2.ListSessionsRequest())
                # No credential is read, so none names a session's user.
                made = await anonymous.sessions.CreateSession(session_pb2.CreateSessionRequest(session={}))
                assert made.user_id == ""
        finally:
            await stop(running, 1.0)
        assert any("insecure" in r.getMessage().lower() for r in caplog.records if r.levelno >= logging.WARNING)
