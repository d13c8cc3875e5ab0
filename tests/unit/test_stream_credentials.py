"""Open streams end with UNAUTHENTICATED when their credential does: an API
key revoked (StreamEvents and WatchExecution alike: the interceptor does it
for every server stream) or past its expire_time, a JWT past exp + leeway;
and grpc.health.v1.Health/Watch, a write()-style stream, works through the
same interceptor."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flowport.clients import ApiError, AsyncClient
from flowport.server.app import Running, start, stop
from flowport.server.auth.keys import KeyAuthenticator, describe, key_hash, new_key
from flowport.server.auth.lifetime import EXPIRED, REVOKED, CredentialWatch
from flowport.server.auth.principal import Principal
from flowport.server.storage import SqliteStore
from flowport.v1 import apikey_pb2, event_pb2, execution_pb2, workflow_pb2

from ..conftest import ADMIN_KEY, make_settings

SECRET = "0123456789abcdef0123456789abcdef"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Running]:
    # No leeway, so a token's stream ends at its exp; quick heartbeats keep the streams talking.
    settings = make_settings(tmp_path / "data", jwt_secret=SECRET, jwt_leeway=0, stream_heartbeat=0.3)
    running = await start(settings)
    try:
        yield running
    finally:
        await stop(running, 1.0)


@pytest.fixture
async def admin(server: Running) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(f"127.0.0.1:{server.port}", api_key=ADMIN_KEY) as client:
        yield client


async def _ended(call: Any, within: float = 10.0) -> ApiError:
    """Read `call` until it fails (within a bounded wait); the error it failed with."""
    async with asyncio.timeout(within):
        while True:
            try:
                message = await call.read()
            except grpc.aio.AioRpcError as error:
                return ApiError.from_rpc_error(error)
            assert message is not grpc.aio.EOF, "the stream ended without an error"


async def _user_key(admin: AsyncClient, **fields: Any) -> apikey_pb2.CreateApiKeyResponse:
    key = apikey_pb2.ApiKey(tenant="acme", **fields)
    return await admin.keys.CreateApiKey(apikey_pb2.CreateApiKeyRequest(api_key=key))


async def test_revoking_a_key_ends_its_open_streams(server: Running, admin: AsyncClient) -> None:
    created = await _user_key(admin)
    workflow = json_format.ParseDict(
        {
            "name": "long",
            "nodes": [{"type": "PythonCodeNode", "name": "nap", "config": {"code": "import time\ntime.sleep(30)"}}],
        },
        workflow_pb2.Workflow(),
    )
    async with AsyncClient(f"127.0.0.1:{server.port}", api_key=created.key) as user:
        await user.workflows.CreateWorkflow(workflow_pb2.CreateWorkflowRequest(workflow=workflow))
        started = await user.executions.CreateExecution(execution_pb2.CreateExecutionRequest(workflow_id="long"))
        events = user.events.StreamEvents(event_pb2.StreamEventsRequest())
        watch = user.executions.WatchExecution(execution_pb2.WatchExecutionRequest(execution_id=started.execution_id))
        # Both are open and delivering.
        assert (await events.read()).type == "heartbeat"
        assert (await watch.read()).HasField("execution")
        # Another key of the same tenant keeps its stream.
        other = await _user_key(admin)
        async with AsyncClient(f"127.0.0.1:{server.port}", api_key=other.key) as bystander:
            kept = bystander.events.StreamEvents(event_pb2.StreamEventsRequest())
            await kept.read()
            await admin.keys.RevokeApiKey(apikey_pb2.RevokeApiKeyRequest(key_id=created.api_key.key_id))
            for call in (events, watch):
                error = await _ended(call)
                assert (error.code(), error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "CREDENTIAL_REVOKED")
                assert "revoked" in (error.details() or "")
            async with asyncio.timeout(5):
                for _ in range(3):  # the revocation's own event, then heartbeats: another key's stream goes on
                    assert (await kept.read()) is not grpc.aio.EOF
            kept.cancel()
    assert server.keys is not None and created.api_key.key_id not in server.keys.streams.key_ids()


async def test_a_key_past_its_expire_time_ends_its_stream(server: Running, admin: AsyncClient) -> None:
    expiring = apikey_pb2.ApiKey()
    expiring.expire_time.FromNanoseconds(time.time_ns() + 4 * 10**9)  # time for the stream to open first
    created = await _user_key(admin, expire_time=expiring.expire_time)
    async with AsyncClient(f"127.0.0.1:{server.port}", api_key=created.key) as user:
        call = user.events.StreamEvents(event_pb2.StreamEventsRequest())
        await call.read()
        error = await _ended(call)
        assert (error.code(), error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "CREDENTIAL_EXPIRED")
        assert time.time_ns() >= expiring.expire_time.ToNanoseconds(), "not before its expiry"


async def test_a_jwt_stream_ends_once_exp_and_leeway_pass(server: Running) -> None:
    exp = time.time() + 2
    token = jwt.encode({"sub": "ada", "tenant": "acme", "exp": exp}, SECRET, algorithm="HS256")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stream = channel.unary_stream(
            "/flowport.v1.EventService/StreamEvents",
            request_serializer=event_pb2.StreamEventsRequest.SerializeToString,
            response_deserializer=event_pb2.Event.FromString,
        )
        call = stream(event_pb2.StreamEventsRequest(), metadata=(("authorization", f"Bearer {token}"),))
        beats = 0
        async with asyncio.timeout(10):
            while True:
                try:
                    await call.read()
                except grpc.aio.AioRpcError as failed:
                    error = ApiError.from_rpc_error(failed)
                    break
                beats += 1
        assert (error.code(), error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "CREDENTIAL_EXPIRED")
        assert time.time() >= exp and beats > 1, "it delivered until the token expired"


async def test_health_watch_answers_serving_and_stays_open(server: Running) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "flowport.v1.EventService"):
            call = health.Watch(health_pb2.HealthCheckRequest(service=service))
            async with asyncio.timeout(5):
                first = await call.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            # No change, no message: the call stays open (a checker waits on it).
            waiting = asyncio.ensure_future(call.read())
            done, _ = await asyncio.wait({waiting}, timeout=0.5)
            assert not done and not call.done(), "Watch stays open after its first answer"
            call.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
        # A status change reaches an open Watch.
        call = health.Watch(health_pb2.HealthCheckRequest(service="flowport.v1.EventService"))
        await call.read()
        await server.health.set("flowport.v1.EventService", health_pb2.HealthCheckResponse.NOT_SERVING)
        async with asyncio.timeout(5):
            assert (await call.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        call.cancel()


# -- the registry itself ----------------------------------------------------------


def _key_principal(key_id: str, expires_at: float | None = None) -> Principal:
    return Principal("acme", key_id, frozenset({"user"}), "api_key", credential_id=key_id, expires_at=expires_at)


async def test_the_watch_fires_once_per_stream_and_forgets_closed_ones() -> None:
    watch = CredentialWatch()
    reasons: list[str] = []
    first = watch.watch(_key_principal("fpk_a"), reasons.append)
    closed = watch.watch(_key_principal("fpk_a"), reasons.append)
    assert first is not None and closed is not None
    closed.close()
    assert watch.watch(Principal("acme", "ada", frozenset(), "jwt"), reasons.append) is None, "nothing to wait for"
    assert watch.revoked("fpk_a") == 1
    assert reasons == [REVOKED]
    assert watch.revoked("fpk_a") == 0 and reasons == [REVOKED] and watch.open_streams == 0


async def test_a_stream_registered_after_its_key_was_revoked_ends_at_once() -> None:
    # A key lookup in flight during the revocation can let a stream open with the key.
    watch = CredentialWatch()
    watch.revoked("fpk_late")
    reasons: list[str] = []
    watch.watch(_key_principal("fpk_late"), reasons.append)
    await asyncio.sleep(0)
    assert reasons == [REVOKED]


async def test_expiry_fires_at_its_time_and_not_after_close() -> None:
    watch = CredentialWatch()
    reasons: list[str] = []
    soon = time.time() + 0.2
    watch.watch(Principal("acme", "ada", frozenset(), "jwt", expires_at=soon), reasons.append)
    closed = watch.watch(Principal("acme", "bob", frozenset(), "jwt", expires_at=soon), reasons.append)
    assert closed is not None
    closed.close()
    async with asyncio.timeout(5):
        while not reasons:  # noqa: ASYNC110 - the timer is the thing under test
            await asyncio.sleep(0.02)
    assert time.time() >= soon
    await asyncio.sleep(0.3)
    assert reasons == [EXPIRED] and watch.open_streams == 0


async def test_a_revocation_whose_bus_event_was_lost_is_found_by_the_recheck(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "db.sqlite")
    try:
        key_id, key = new_key()
        await store.create_api_key(describe(key_id, "acme", ["user"], "", "test"), key_hash(key), None, "acme")
        keys = KeyAuthenticator(store)
        principal = await keys.verify(key)
        reasons: list[str] = []
        keys.streams.watch(principal, reasons.append)
        await keys.recheck()
        assert reasons == [], "a valid key keeps its streams"
        # Revoked by another process whose bus event never arrived.
        await store.revoke_api_key(key_id, None, 1)
        await keys.recheck()
        assert reasons == [REVOKED]
    finally:
        await store.close()
