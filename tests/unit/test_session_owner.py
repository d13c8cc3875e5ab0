"""Sessions belong to the credential that created them: another credential of
the same tenant finds them missing (Get, Delete, List, executions and
workflows in them, event streams filtered to them), the tenant's admins see
them all. For a bearer token the credential is the token's issuer and
subject, whichever token carries them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from google.protobuf import json_format

from flowport.clients import ApiError, AsyncClient
from flowport.server.app import Running, start, stop
from flowport.v1 import apikey_pb2, event_pb2, execution_pb2, session_pb2, workflow_pb2

from ..conftest import ADMIN_KEY, make_settings

S = session_pb2
SECRET = "a-test-secret-of-at-least-32-bytes!!"


async def _error(awaitable: Awaitable[Any]) -> ApiError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await awaitable
    return ApiError.from_rpc_error(caught.value)


async def _missing(awaitable: Awaitable[Any], session_id: str) -> None:
    """The call fails exactly as for a session that never existed."""
    error = await _error(awaitable)
    assert (error.code(), error.reason) == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND"), error.message
    assert error.message == f"session {session_id!r} does not exist or has expired"
    assert error.metadata == {"session_id": session_id}


async def _key(admin: AsyncClient, roles: list[str]) -> str:
    created = await admin.keys.CreateApiKey(
        apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(tenant="acme", roles=roles))
    )
    return created.key


async def _first_event(client: AsyncClient, session_id: str) -> event_pb2.Event:
    call = client.events.StreamEvents(event_pb2.StreamEventsRequest(session_id=session_id, after_id="0"))
    try:
        async with asyncio.timeout(10):
            while True:
                event = await call.read()
                if event.type != "heartbeat":
                    return event
    finally:
        call.cancel()


def _workflow() -> workflow_pb2.Workflow:
    workflow = workflow_pb2.Workflow(name="double")
    json_format.ParseDict(
        {"nodes": [{"type": "PythonCodeNode", "name": "double", "config": {"code": "result = 2"}}]}, workflow
    )
    return workflow


async def test_another_credential_of_the_tenant_finds_a_session_missing(running: Running) -> None:
    target = f"127.0.0.1:{running.port}"
    async with AsyncClient(target, api_key=ADMIN_KEY) as root:
        ada_key, bob_key, boss_key = await _key(root, ["user"]), await _key(root, ["user"]), await _key(root, ["admin"])
    async with (
        AsyncClient(target, api_key=ada_key) as ada,
        AsyncClient(target, api_key=bob_key) as bob,
        AsyncClient(target, api_key=boss_key) as boss,
    ):
        mine = await ada.sessions.CreateSession(
            S.CreateSessionRequest(session=S.Session(user_id="u"), request_id="ada-rid")
        )
        assert mine.creator == ada_key.split(".")[0]  # the key's public id
        theirs = await bob.sessions.CreateSession(S.CreateSessionRequest(session=S.Session(user_id="u")))
        workflow = await ada.workflows.CreateWorkflow(workflow_pb2.CreateWorkflowRequest(workflow=_workflow()))

        # Bob: ada's session is missing, exactly as one that never existed.
        await _missing(bob.sessions.GetSession(S.GetSessionRequest(session_id="ses_never")), "ses_never")
        await _missing(bob.sessions.GetSession(S.GetSessionRequest(session_id=mine.session_id)), mine.session_id)
        await _missing(bob.sessions.DeleteSession(S.DeleteSessionRequest(session_id=mine.session_id)), mine.session_id)
        listed = await bob.sessions.ListSessions(S.ListSessionsRequest())
        assert [s.session_id for s in listed.sessions] == [theirs.session_id]
        for wait in (False, True):  # POST /workflows/{id}/execute is CreateExecution with wait
            run = execution_pb2.CreateExecutionRequest(
                workflow_id=workflow.workflow_id, session_id=mine.session_id, wait=wait
            )
            await _missing(bob.executions.CreateExecution(run), mine.session_id)
        in_session = _workflow()
        in_session.name, in_session.session_id = "bobs", mine.session_id
        await _missing(
            bob.workflows.CreateWorkflow(workflow_pb2.CreateWorkflowRequest(workflow=in_session)), mine.session_id
        )
        await _missing(_first_event(bob, mine.session_id), mine.session_id)
        # Ada's request id and body from bob: not ada's session back.
        replay = await _error(
            bob.sessions.CreateSession(S.CreateSessionRequest(session=S.Session(user_id="u"), request_id="ada-rid"))
        )
        assert replay.code() is grpc.StatusCode.ALREADY_EXISTS and mine.session_id not in replay.message
        # His own session works for him.
        ran = await bob.executions.CreateExecution(
            execution_pb2.CreateExecutionRequest(
                workflow_id=workflow.workflow_id, session_id=theirs.session_id, wait=True
            )
        )
        assert ran.state == execution_pb2.Execution.STATE_SUCCEEDED and ran.session_id == theirs.session_id

        # Ada: all of it works, and bob changed nothing.
        assert (await ada.sessions.GetSession(S.GetSessionRequest(session_id=mine.session_id))) == mine
        assert (await _first_event(ada, mine.session_id)).type == "session.created"
        ran = await ada.executions.CreateExecution(
            execution_pb2.CreateExecutionRequest(
                workflow_id=workflow.workflow_id, session_id=mine.session_id, wait=True
            )
        )
        assert ran.state == execution_pb2.Execution.STATE_SUCCEEDED
        await _missing(ada.sessions.GetSession(S.GetSessionRequest(session_id=theirs.session_id)), theirs.session_id)

        # The tenant's admin sees and uses every session of the tenant.
        every = await boss.sessions.ListSessions(S.ListSessionsRequest())
        assert {s.session_id for s in every.sessions} == {mine.session_id, theirs.session_id}
        assert (await boss.sessions.GetSession(S.GetSessionRequest(session_id=mine.session_id))).creator == mine.creator
        assert (await _first_event(boss, mine.session_id)).session_id == mine.session_id
        await boss.sessions.DeleteSession(S.DeleteSessionRequest(session_id=theirs.session_id))
        await _missing(bob.sessions.GetSession(S.GetSessionRequest(session_id=theirs.session_id)), theirs.session_id)
        await ada.sessions.DeleteSession(S.DeleteSessionRequest(session_id=mine.session_id))


def _token(sub: str, *, iss: str | None, jti: str, roles: list[str] | None = None) -> str:
    claims: dict[str, Any] = {"sub": sub, "tenant": "acme", "jti": jti, "exp": int(time.time()) + 600}
    if iss is not None:
        claims["iss"] = iss
    if roles is not None:
        claims["roles"] = roles
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def test_a_bearer_token_owns_by_issuer_and_subject(tmp_path: Path) -> None:
    running = await start(make_settings(tmp_path / "data", jwt_secret=SECRET))
    target = f"127.0.0.1:{running.port}"
    try:
        async with AsyncClient(target, token=_token("alice", iss="https://idp.one", jti="t1")) as alice:
            mine = await alice.sessions.CreateSession(S.CreateSessionRequest(session=S.Session()))
        assert mine.creator == "jwt:https%3A%2F%2Fidp.one:alice"
        # A fresh token of the same issuer and subject is the same owner.
        async with AsyncClient(target, token=_token("alice", iss="https://idp.one", jti="t2")) as again:
            assert (await again.sessions.GetSession(S.GetSessionRequest(session_id=mine.session_id))) == mine
        # The same subject from another issuer (or none) is another credential, and
        # the issuer's encoding keeps an issuer/subject split from passing for another.
        for other in (
            _token("alice", iss="https://idp.two", jti="t3"),
            _token("alice", iss=None, jti="t4"),
            _token("//idp.one:alice", iss="https:", jti="t5"),
        ):
            async with AsyncClient(target, token=other) as stranger:
                await _missing(
                    stranger.sessions.GetSession(S.GetSessionRequest(session_id=mine.session_id)), mine.session_id
                )
        # A token whose subject is spelled like an API key's id is not that key.
        async with AsyncClient(target, api_key=ADMIN_KEY) as root:
            key = await root.keys.CreateApiKey(
                apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(tenant="acme", roles=["user"]))
            )
        async with AsyncClient(target, api_key=key.key) as keyed:
            keys_own = await keyed.sessions.CreateSession(S.CreateSessionRequest(session=S.Session()))
            await _missing(keyed.sessions.GetSession(S.GetSessionRequest(session_id=mine.session_id)), mine.session_id)
        assert keys_own.creator == key.api_key.key_id
        async with AsyncClient(target, token=_token(key.api_key.key_id, iss=None, jti="t6")) as posing:
            await _missing(
                posing.sessions.GetSession(S.GetSessionRequest(session_id=keys_own.session_id)), keys_own.session_id
            )
        # An admin token of the tenant sees it.
        async with AsyncClient(target, token=_token("root", iss="https://idp.two", jti="t7", roles=["admin"])) as boss:
            assert (await boss.sessions.GetSession(S.GetSessionRequest(session_id=mine.session_id))) == mine
    finally:
        await stop(running, 1.0)
