"""Sessions belong to the credential that created them: another credential of
the same tenant finds them missing (Get, Delete, List, executions and
workflows in them, event streams filtered to them), the tenant's admins see
them all. For a bearer token the credential is the token's issuer and
subject, whichever token carries them."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from google.protobuf import json_format

from flowport.clients import ApiError, AsyncClient
from flowport.server.app import Running, start, stop
from flowport.server.storage import SqliteStore
from flowport.server.storage.migrate import bundled
from flowport.server.storage.tables import Connection
from flowport.v1 import apikey_pb2, event_pb2, execution_pb2, schema_pb2, session_pb2, workflow_pb2

from ..conftest import ADMIN_KEY, make_settings

S = session_pb2
W = workflow_pb2
SECRET = "a-test-secret-of-at-least-32-bytes!!"


async def _error(awaitable: Awaitable[Any]) -> ApiError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await awaitable
    return ApiError.from_rpc_error(caught.value)


async def _missing(awaitable: Awaitable[Any], session_id: str) -> None:
    """The call fails exactly as for a session that never existed."""
    error = await _error(awaitable)
    assert (error.code(), error.reason) == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND"), error.message
    # The same words for every id: nothing tells one missing session from another.
    assert error.message == "session does not exist or has expired" and error.metadata == {}, session_id


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
            # A body's user_id is the client's label, kept as sent; the owner is still the token's.
            labelled = await alice.sessions.CreateSession(S.CreateSessionRequest(session=S.Session(user_id="bob")))
        assert mine.creator == labelled.creator == "jwt:https%3A%2F%2Fidp.one:alice"
        # Left out, user_id is the token's subject (as Kailash fills it).
        assert (mine.user_id, labelled.user_id) == ("alice", "bob")
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
        assert keys_own.creator == keys_own.user_id == key.api_key.key_id
        async with AsyncClient(target, token=_token(key.api_key.key_id, iss=None, jti="t6")) as posing:
            await _missing(
                posing.sessions.GetSession(S.GetSessionRequest(session_id=keys_own.session_id)), keys_own.session_id
            )
        # An admin token of the tenant sees it.
        async with AsyncClient(target, token=_token("root", iss="https://idp.two", jti="t7", roles=["admin"])) as boss:
            assert (await boss.sessions.GetSession(S.GetSessionRequest(session_id=mine.session_id))) == mine
    finally:
        await stop(running, 1.0)


async def _first(call: Any) -> Any:
    """The first message of a server stream (its error, raised)."""
    try:
        async with asyncio.timeout(10):
            return await call.read()
    finally:
        call.cancel()


async def _gone(awaitable: Awaitable[Any], what: str, ident: str) -> None:
    """The call fails exactly as for an execution or workflow that never existed."""
    error = await _error(awaitable)
    reason = f"{what.upper()}_NOT_FOUND"
    assert (error.code(), error.reason) == (grpc.StatusCode.NOT_FOUND, reason), error.message
    assert error.message == f"{what} {ident!r} does not exist"
    assert error.metadata == {f"{what}_id": ident}


def _run(workflow_id: str, session_id: str = "", *, wait: bool = True) -> execution_pb2.CreateExecutionRequest:
    return execution_pb2.CreateExecutionRequest(workflow_id=workflow_id, session_id=session_id, wait=wait)


async def _three(running: Running) -> tuple[str, str, str]:
    """Two user keys and an admin key of tenant acme."""
    async with AsyncClient(f"127.0.0.1:{running.port}", api_key=ADMIN_KEY) as root:
        return await _key(root, ["user"]), await _key(root, ["user"]), await _key(root, ["admin"])


async def test_executions_in_a_session_are_its_owners(running: Running) -> None:  # noqa: PLR0915 - one story
    target = f"127.0.0.1:{running.port}"
    ada_key, bob_key, boss_key = await _three(running)
    async with (
        AsyncClient(target, api_key=ada_key) as ada,
        AsyncClient(target, api_key=bob_key) as bob,
        AsyncClient(target, api_key=boss_key) as boss,
    ):
        mine = await ada.sessions.CreateSession(S.CreateSessionRequest(session=S.Session()))
        workflow = await ada.workflows.CreateWorkflow(workflow_pb2.CreateWorkflowRequest(workflow=_workflow()))
        inside = await ada.executions.CreateExecution(_run(workflow.workflow_id, mine.session_id))
        outside = await ada.executions.CreateExecution(_run(workflow.workflow_id))
        slow = _workflow()
        slow.name = "slow"
        slow.nodes[0].config["code"] = "import time\ntime.sleep(20)\nresult = 1"
        await ada.workflows.CreateWorkflow(workflow_pb2.CreateWorkflowRequest(workflow=slow))
        busy = await ada.executions.CreateExecution(_run("slow", mine.session_id, wait=False))
        in_session = {inside.execution_id, busy.execution_id}

        # Bob: the session is missing, and so is everything that ran in it.
        listing = execution_pb2.ListExecutionsRequest(session_id=mine.session_id)
        await _missing(bob.executions.ListExecutions(listing), mine.session_id)
        listed = {
            e.execution_id
            for e in (await bob.executions.ListExecutions(execution_pb2.ListExecutionsRequest())).executions
        }
        assert outside.execution_id in listed and not listed & in_session
        by_workflow = execution_pb2.ListExecutionsRequest(workflow_id=workflow.workflow_id)
        assert [e.execution_id for e in (await bob.executions.ListExecutions(by_workflow)).executions] == [
            outside.execution_id
        ]
        for execution_id in (*in_session, "exe_never"):
            await _gone(
                bob.executions.GetExecution(execution_pb2.GetExecutionRequest(execution_id=execution_id)),
                "execution",
                execution_id,
            )
            await _gone(
                _first(bob.executions.WatchExecution(execution_pb2.WatchExecutionRequest(execution_id=execution_id))),
                "execution",
                execution_id,
            )
            await _gone(
                bob.executions.CancelExecution(execution_pb2.CancelExecutionRequest(execution_id=execution_id)),
                "execution",
                execution_id,
            )
        # Bob's cancel did not reach ada's execution.
        still = await ada.executions.GetExecution(execution_pb2.GetExecutionRequest(execution_id=busy.execution_id))
        assert still.state in (execution_pb2.Execution.STATE_PENDING, execution_pb2.Execution.STATE_RUNNING)

        # Outside sessions nothing changed for him, and it costs no owner lookup.
        async def no_lookup(tenant: str, session_id: str) -> str | None:
            raise AssertionError(f"looked up the owner of {session_id} for an execution outside sessions")

        looked_up = running.store.session_owner
        running.store.session_owner = no_lookup  # type: ignore[method-assign]
        try:
            got = await bob.executions.GetExecution(
                execution_pb2.GetExecutionRequest(execution_id=outside.execution_id)
            )
            assert got.outputs == outside.outputs
            # No sandbox node: ada's slow one holds the tenant's share of sandbox workers.
            merge = workflow_pb2.Workflow(name="merge")
            json_format.ParseDict({"nodes": [{"type": "MergeNode", "name": "m"}]}, merge)
            await bob.workflows.CreateWorkflow(workflow_pb2.CreateWorkflowRequest(workflow=merge))
            ran = await bob.executions.CreateExecution(_run("merge"))
            assert ran.state == execution_pb2.Execution.STATE_SUCCEEDED
            watched = await _first(
                bob.executions.WatchExecution(execution_pb2.WatchExecutionRequest(execution_id=ran.execution_id))
            )
            assert watched.execution.execution_id == ran.execution_id
        finally:
            running.store.session_owner = looked_up  # type: ignore[method-assign]

        # Ada and the tenant's admin see and use all of it.
        for who in (ada, boss):
            listed_in = await who.executions.ListExecutions(listing)
            assert {e.execution_id for e in listed_in.executions} == in_session
            every = await who.executions.ListExecutions(execution_pb2.ListExecutionsRequest())
            assert in_session <= {e.execution_id for e in every.executions}
            got = await who.executions.GetExecution(execution_pb2.GetExecutionRequest(execution_id=inside.execution_id))
            assert got.outputs == inside.outputs and got.session_id == mine.session_id
            watched = await _first(
                who.executions.WatchExecution(execution_pb2.WatchExecutionRequest(execution_id=inside.execution_id))
            )
            assert watched.execution.execution_id == inside.execution_id
        cancelled = await boss.executions.CancelExecution(
            execution_pb2.CancelExecutionRequest(execution_id=busy.execution_id)
        )
        assert cancelled.state == execution_pb2.Execution.STATE_CANCELLED

        # Once the session has ended, what ran in it is still ada's alone.
        await ada.sessions.DeleteSession(S.DeleteSessionRequest(session_id=mine.session_id))
        await _missing(bob.executions.ListExecutions(listing), mine.session_id)
        assert {e.execution_id for e in (await ada.executions.ListExecutions(listing)).executions} == in_session
        await _gone(
            bob.executions.GetExecution(execution_pb2.GetExecutionRequest(execution_id=inside.execution_id)),
            "execution",
            inside.execution_id,
        )


async def test_workflow_versions_made_in_a_session_are_its_owners(running: Running) -> None:
    target = f"127.0.0.1:{running.port}"
    ada_key, bob_key, boss_key = await _three(running)
    async with (
        AsyncClient(target, api_key=ada_key) as ada,
        AsyncClient(target, api_key=bob_key) as bob,
        AsyncClient(target, api_key=boss_key) as boss,
    ):
        mine = await ada.sessions.CreateSession(S.CreateSessionRequest(session=S.Session()))
        shared = _workflow()
        shared.name = "shared"
        await ada.workflows.CreateWorkflow(W.CreateWorkflowRequest(workflow=shared))  # version 1, the tenant's
        shared.session_id = mine.session_id
        await ada.workflows.CreateWorkflow(W.CreateWorkflowRequest(workflow=shared))  # version 2, ada's session's
        private = _workflow()
        private.name, private.session_id = "private", mine.session_id
        await ada.workflows.CreateWorkflow(W.CreateWorkflowRequest(workflow=private))

        # Bob: the session is missing, and so is what was made in it; the rest of the name stays.
        await _missing(bob.workflows.ListWorkflows(W.ListWorkflowsRequest(session_id=mine.session_id)), mine.session_id)
        listed = await bob.workflows.ListWorkflows(W.ListWorkflowsRequest())
        assert [(w.workflow_id, w.version) for w in listed.workflows] == [("shared", 1)]
        assert (await bob.workflows.GetWorkflow(W.GetWorkflowRequest(workflow_id="shared"))).version == 1
        await _gone(bob.workflows.GetWorkflow(W.GetWorkflowRequest(workflow_id="private")), "workflow", "private")
        await _gone(bob.workflows.GetWorkflow(W.GetWorkflowRequest(workflow_id="never")), "workflow", "never")
        error = await _error(bob.workflows.GetWorkflow(W.GetWorkflowRequest(workflow_id="shared", version=2)))
        assert (error.code(), error.reason) == (grpc.StatusCode.NOT_FOUND, "WORKFLOW_NOT_FOUND")
        error = await _error(bob.schemas.GetWorkflowSchema(schema_pb2.GetWorkflowSchemaRequest(workflow_id="private")))
        assert (error.code(), error.reason) == (grpc.StatusCode.NOT_FOUND, "WORKFLOW_NOT_FOUND")
        await _gone(bob.executions.CreateExecution(_run("private")), "workflow", "private")
        assert (await bob.executions.CreateExecution(_run("shared"))).workflow_version == 1
        await _gone(bob.workflows.DeleteWorkflow(W.DeleteWorkflowRequest(workflow_id="private")), "workflow", "private")

        # Ada and the admin: every version, the session's included.
        for who in (ada, boss):
            listed = await who.workflows.ListWorkflows(W.ListWorkflowsRequest())
            assert [(w.workflow_id, w.version) for w in listed.workflows] == [("private", 1), ("shared", 2)]
            in_session = await who.workflows.ListWorkflows(W.ListWorkflowsRequest(session_id=mine.session_id))
            assert [w.workflow_id for w in in_session.workflows] == ["private", "shared"]
            assert (await who.executions.CreateExecution(_run("shared"))).workflow_version == 2

        # Bob deletes what he sees of the name; ada's session's version stays hers.
        await bob.workflows.DeleteWorkflow(W.DeleteWorkflowRequest(workflow_id="shared"))
        await _gone(bob.workflows.GetWorkflow(W.GetWorkflowRequest(workflow_id="shared")), "workflow", "shared")
        assert (await ada.workflows.GetWorkflow(W.GetWorkflowRequest(workflow_id="shared"))).version == 2
        # Ada's delete, repeated by bob with her request_id: missing to him, not done.
        await ada.workflows.DeleteWorkflow(W.DeleteWorkflowRequest(workflow_id="private", request_id="ada-del"))
        await _gone(
            bob.workflows.DeleteWorkflow(W.DeleteWorkflowRequest(workflow_id="private", request_id="ada-del")),
            "workflow",
            "private",
        )
        await ada.workflows.DeleteWorkflow(W.DeleteWorkflowRequest(workflow_id="private", request_id="ada-del"))


async def _events_until(call: Any, last: Callable[[event_pb2.Event], bool]) -> list[event_pb2.Event]:
    """A stream's events (heartbeats left out) up to the first one `last` accepts."""
    events: list[event_pb2.Event] = []
    try:
        async with asyncio.timeout(20):
            while True:
                event = await call.read()
                if event.type != "heartbeat":
                    events.append(event)
                    if last(event):
                        return events
    finally:
        call.cancel()


async def test_streams_leave_out_other_credentials_sessions(running: Running) -> None:
    target = f"127.0.0.1:{running.port}"
    ada_key, bob_key, boss_key = await _three(running)
    async with (
        AsyncClient(target, api_key=ada_key) as ada,
        AsyncClient(target, api_key=bob_key) as bob,
        AsyncClient(target, api_key=boss_key) as boss,
    ):
        before = await ada.sessions.CreateSession(S.CreateSessionRequest(session=S.Session()))
        workflow = await ada.workflows.CreateWorkflow(workflow_pb2.CreateWorkflowRequest(workflow=_workflow()))
        await ada.executions.CreateExecution(_run(workflow.workflow_id, before.session_id))
        lookups: list[str] = []
        owner_of = running.store.session_owner

        async def counted(tenant: str, session_id: str) -> str | None:
            lookups.append(session_id)
            return await owner_of(tenant, session_id)

        running.store.session_owner = counted  # type: ignore[method-assign]
        # Bob's stream replays the log, then follows: sessions ada creates afterwards stay out too.
        replayed = bob.events.StreamEvents(event_pb2.StreamEventsRequest(after_id="0"))
        live = bob.events.StreamEvents(event_pb2.StreamEventsRequest())
        await _first_heartbeat(live)
        after = await ada.sessions.CreateSession(S.CreateSessionRequest(session=S.Session()))
        await ada.executions.CreateExecution(_run(workflow.workflow_id, after.session_id))
        await ada.executions.CreateExecution(_run(workflow.workflow_id))  # outside sessions: the tenant's
        his = await bob.sessions.CreateSession(S.CreateSessionRequest(session=S.Session()))
        adas = {before.session_id, after.session_id}
        for call in (replayed, live):
            events = await _events_until(call, lambda e: e.session_id == his.session_id)
            assert not [e.type for e in events if e.session_id in adas], "ada's session's events reached bob"
            assert any(e.type == "execution.completed" and not e.session_id for e in events)
        # One verdict per session and stream, not one lookup per event.
        assert lookups.count(before.session_id) <= 2 and lookups.count(after.session_id) <= 2, lookups
        running.store.session_owner = owner_of  # type: ignore[method-assign]

        everything = await _events_until(
            boss.events.StreamEvents(event_pb2.StreamEventsRequest(after_id="0")),
            lambda e: e.session_id == his.session_id,
        )
        for session_id in adas:
            types = [e.type for e in everything if e.session_id == session_id]
            assert "session.created" in types and "execution.completed" in types, types


async def _first_heartbeat(call: Any) -> None:
    """Wait until a stream is open (it starts with a heartbeat)."""
    async with asyncio.timeout(10):
        assert (await call.read()).type == "heartbeat"


async def test_another_credential_repeating_the_owners_delete_finds_the_session_missing(running: Running) -> None:
    target = f"127.0.0.1:{running.port}"
    ada_key, bob_key, boss_key = await _three(running)
    async with (
        AsyncClient(target, api_key=ada_key) as ada,
        AsyncClient(target, api_key=bob_key) as bob,
        AsyncClient(target, api_key=boss_key) as boss,
    ):
        mine = await ada.sessions.CreateSession(S.CreateSessionRequest(session=S.Session()))
        delete = S.DeleteSessionRequest(session_id=mine.session_id, request_id="ada-del")
        await ada.sessions.DeleteSession(delete)
        await _missing(bob.sessions.DeleteSession(delete), mine.session_id)
        await ada.sessions.DeleteSession(delete)  # her own retry: done, as the first time
        await boss.sessions.DeleteSession(delete)
        # Still so once the purge has removed the session's row.
        await running.store.purge_expired(time.time_ns() // 1000, 0)
        await _missing(bob.sessions.DeleteSession(delete), mine.session_id)
        await ada.sessions.DeleteSession(delete)


async def test_what_ran_in_a_session_stays_its_owners_after_it_is_removed(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    running = await start(settings)
    ada_key, bob_key, _ = await _three(running)
    try:
        async with AsyncClient(f"127.0.0.1:{running.port}", api_key=ada_key) as ada:
            mine = await ada.sessions.CreateSession(S.CreateSessionRequest(session=S.Session()))
            workflow = await ada.workflows.CreateWorkflow(workflow_pb2.CreateWorkflowRequest(workflow=_workflow()))
            inside = await ada.executions.CreateExecution(_run(workflow.workflow_id, mine.session_id))
            await ada.sessions.DeleteSession(S.DeleteSessionRequest(session_id=mine.session_id))
        await running.store.purge_expired(time.time_ns() // 1000, 0)
    finally:
        await stop(running, 1.0)
    # A new process: no owner cached, the session's row gone; the execution's row says whose it was.
    running = await start(settings)
    target = f"127.0.0.1:{running.port}"
    try:
        async with AsyncClient(target, api_key=ada_key) as ada, AsyncClient(target, api_key=bob_key) as bob:
            request = execution_pb2.GetExecutionRequest(execution_id=inside.execution_id)
            assert (await ada.executions.GetExecution(request)).outputs == inside.outputs
            await _gone(bob.executions.GetExecution(request), "execution", inside.execution_id)
            listing = execution_pb2.ListExecutionsRequest(session_id=mine.session_id)
            assert [e.execution_id for e in (await ada.executions.ListExecutions(listing)).executions] == [
                inside.execution_id
            ]
            await _missing(bob.executions.ListExecutions(listing), mine.session_id)
            theirs = await _events_until(
                ada.events.StreamEvents(event_pb2.StreamEventsRequest(after_id="0")),
                lambda e: e.type == "execution.completed",
            )
            assert theirs[-1].execution_id == inside.execution_id
            his = await bob.sessions.CreateSession(S.CreateSessionRequest(session=S.Session()))
            seen = await _events_until(
                bob.events.StreamEvents(event_pb2.StreamEventsRequest(after_id="0")),
                lambda e: e.session_id == his.session_id,
            )
            assert not [e.type for e in seen if e.session_id == mine.session_id]
    finally:
        await stop(running, 1.0)


async def test_executions_and_workflows_from_before_are_their_sessions_owners(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    before = [m for m in bundled() if m.name != "session_owners"]
    store = await SqliteStore.open(path, before)
    now = time.time_ns() // 1000
    live = S.Session(session_id="ses_live", tenant="t", creator="fpk_ada")
    live.create_time.FromMicroseconds(now)
    live.expire_time.FromMicroseconds(now + 60_000_000)
    await store.create_session("t", live, None)

    def rows(conn: Connection) -> None:
        for execution_id, session_id in (("exe_live", "ses_live"), ("exe_gone", "ses_gone"), ("exe_none", "")):
            body = execution_pb2.Execution(execution_id=execution_id, session_id=session_id, tenant="t")
            conn.execute(
                "INSERT INTO executions (tenant, execution_id, workflow_id, session_id, state, create_us, body)"
                " VALUES ('t', ?, 'w', ?, 3, ?, ?)",
                (execution_id, session_id, now, body.SerializeToString()),
            )
        workflow = workflow_pb2.Workflow(workflow_id="w", version=1, session_id="ses_live", tenant="t")
        conn.execute(
            "INSERT INTO workflows VALUES ('t', 'w', 1, 'ses_live', ?, NULL, ?)", (now, workflow.SerializeToString())
        )

    await store._write(rows)
    await store.close()
    upgraded = await SqliteStore.open(path)
    try:

        async def listed(creator: str | None) -> list[str]:
            found = await upgraded.list_executions(
                "t", workflow_id="", session_id="", state=0, after=None, limit=10, session_creator=creator
            )
            return sorted(e.execution_id for e in found)

        # The session still there gives its creator; one already gone leaves its executions to admins.
        assert await listed("fpk_ada") == ["exe_live", "exe_none"]
        assert await listed("fpk_bob") == ["exe_none"]
        assert await listed(None) == ["exe_gone", "exe_live", "exe_none"]
        assert await upgraded.get_workflow("t", "w", session_creator="fpk_bob") is None
        assert (await upgraded.get_workflow("t", "w", session_creator="fpk_ada")) is not None
        assert await upgraded.session_owner("t", "ses_gone") is None
    finally:
        await upgraded.close()
    # A new process: the owner of a removed session comes from what was recorded in it.
    _remove_session(path, "ses_live")
    reopened = await SqliteStore.open(path)
    try:
        assert await reopened.session_owner("t", "ses_live") == "fpk_ada"
        assert await reopened.session_owner("u", "ses_live") is None  # another tenant's id
    finally:
        await reopened.close()


def _remove_session(path: Path, session_id: str) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM sessions WHERE session_id=?", (session_id,))
