"""The audit log, against a real server and a real SQLite file: what is
recorded (who, what, when, from where), what never is (credentials), who
may read it, that it cannot be changed, and how it pages and filters."""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

from flowport.clients import ApiError, AsyncClient
from flowport.server.app import Running, start, stop
from flowport.server.audit import AuditRecorder, actions
from flowport.server.audit.recorder import entry
from flowport.server.auth.origin import Origin
from flowport.server.auth.principal import ACT_AS_HEADER, Principal
from flowport.server.settings import Settings
from flowport.server.storage import SqliteStore, SqlStore, open_store
from flowport.server.storage.audit import AuditQuery, AuditTables
from flowport.v1 import apikey_pb2, audit_pb2, gateway_pb2, secret_pb2, session_pb2

from ..conftest import ADMIN_KEY, make_settings

A = audit_pb2
Kind = A.AuditEvent.CredentialKind


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # Failed logins answered at once, so tests can fail many in a row.
    return make_settings(tmp_path / "data", max_login_attempts=1000)


async def _admin_key_id(admin: AsyncClient) -> str:
    keys = await admin.keys.ListApiKeys(apikey_pb2.ListApiKeysRequest(tenant="default"))
    return next(k.key_id for k in keys.api_keys if "FLOWPORT_ADMIN_API_KEY" in k.description)


async def _user(admin: AsyncClient, tenant: str = "acme") -> apikey_pb2.CreateApiKeyResponse:
    request = apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(tenant=tenant, roles=["user"]))
    response: apikey_pb2.CreateApiKeyResponse = await admin.keys.CreateApiKey(request)
    return response


async def _events(admin: AsyncClient, **filters: Any) -> list[audit_pb2.AuditEvent]:
    response = await admin.audit.ListAuditEvents(A.ListAuditEventsRequest(page_size=1000, **filters))
    return list(response.audit_events)


async def _error(awaitable: Any) -> ApiError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await awaitable
    return ApiError.from_rpc_error(caught.value)


def _stamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


async def test_key_changes_are_recorded_with_who_what_when_and_where(admin: AsyncClient) -> None:
    before = time.time()
    created = await _user(admin)
    await admin.keys.RevokeApiKey(apikey_pb2.RevokeApiKeyRequest(key_id=created.api_key.key_id))
    after = time.time()
    admin_id = await _admin_key_id(admin)
    revoked, made = await _events(admin, action="api_key.*")
    for event, action, method in (
        (made, actions.API_KEY_CREATED, "CreateApiKey"),
        (revoked, actions.API_KEY_REVOKED, "RevokeApiKey"),
    ):
        assert event.action == action and event.code == "OK" and event.count == 1
        assert event.method == f"/flowport.v1.ApiKeyService/{method}"
        assert event.resource == f"api_keys/{created.api_key.key_id}" and event.resource_tenant == "acme"
        assert (event.tenant, event.subject, event.credential_id) == ("default", admin_id, admin_id)
        assert event.credential_kind == Kind.CREDENTIAL_KIND_API_KEY
        assert (event.client_address, event.proxy_address) == ("127.0.0.1", "")
        assert before <= event.time.ToNanoseconds() / 1e9 <= after
        assert event.audit_event_id.startswith("aud_")


async def test_a_refused_key_change_is_recorded_with_its_status(admin: AsyncClient) -> None:
    bad = apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(tenant="Not A Tenant"))
    assert (await _error(admin.keys.CreateApiKey(bad))).code() is grpc.StatusCode.INVALID_ARGUMENT
    await _error(admin.keys.RevokeApiKey(apikey_pb2.RevokeApiKeyRequest(key_id="fpk_missing")))
    revoked, made = await _events(admin, action="api_key.*")
    assert (made.action, made.code, made.resource_tenant) == (
        actions.API_KEY_CREATED,
        "INVALID_ARGUMENT",
        "Not A Tenant",
    )
    assert (revoked.action, revoked.code, revoked.reason) == (actions.API_KEY_REVOKED, "NOT_FOUND", "API_KEY_NOT_FOUND")
    assert revoked.resource == "api_keys/fpk_missing"


async def test_admin_only_changes_and_calls_naming_a_tenant_are_recorded_and_the_rest_is_not(
    admin: AsyncClient,
) -> None:
    session = await admin.sessions.CreateSession(session_pb2.CreateSessionRequest(session=session_pb2.Session()))
    await admin.sessions.GetSession(session_pb2.GetSessionRequest(session_id=session.session_id))
    await admin.sessions.ListSessions(session_pb2.ListSessionsRequest())
    await admin.gateway.GetStats(gateway_pb2.GetStatsRequest())
    await admin.keys.ListApiKeys(apikey_pb2.ListApiKeysRequest(tenant="acme"))
    await admin.sessions.DeleteSession(session_pb2.DeleteSessionRequest(session_id=session.session_id))
    recorded = [(e.action, e.method.rsplit("/", 1)[1], e.resource, e.resource_tenant) for e in await _events(admin)]
    # Sessions in its own tenant are an admin's ordinary work, not admin actions.
    assert recorded == [(actions.ADMIN_CALL, "ListApiKeys", "", "acme")]


async def test_a_users_calls_in_its_own_tenant_are_not_recorded(admin: AsyncClient, running: Running) -> None:
    key = await _user(admin)
    async with AsyncClient(f"127.0.0.1:{running.port}", api_key=key.key) as user:
        session = await user.sessions.CreateSession(session_pb2.CreateSessionRequest(session=session_pb2.Session()))
        await user.sessions.DeleteSession(session_pb2.DeleteSessionRequest(session_id=session.session_id))
        missing = user.sessions.GetSession(session_pb2.GetSessionRequest(session_id="ses_missing"))
        assert (await _error(missing)).code() is grpc.StatusCode.NOT_FOUND
    assert [e.action for e in await _events(admin)] == [actions.API_KEY_CREATED]


async def test_failed_authentication_is_recorded_without_credential_material(
    admin: AsyncClient, running: Running, settings: Settings
) -> None:
    revoked = await _user(admin)
    await admin.keys.RevokeApiKey(apikey_pb2.RevokeApiKeyRequest(key_id=revoked.api_key.key_id))
    # A wrong key that shares the admin key's head: the head must not leak either.
    presented = [ADMIN_KEY.split(".")[0] + ".wrong-secret-part", "fpk_01UNKNOWNKEY.secret-part-xyz", revoked.key]
    target = f"127.0.0.1:{running.port}"
    for key in presented:
        async with AsyncClient(target, api_key=key) as caller:
            await _error(caller.gateway.GetStats(gateway_pb2.GetStatsRequest()))
    token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhZGEifQ.c2lnbmF0dXJlLXNlY3JldA"
    async with AsyncClient(target, token=token) as caller:
        await _error(caller.gateway.GetStats(gateway_pb2.GetStatsRequest()))
    async with AsyncClient(target) as caller:
        await _error(caller.gateway.GetStats(gateway_pb2.GetStatsRequest()))

    failures = await _events(admin, action=actions.AUTH_FAILED)
    assert [(e.credential_kind, e.reason, e.credential_id) for e in failures] == [
        (Kind.CREDENTIAL_KIND_NONE, "no credential", ""),
        (Kind.CREDENTIAL_KIND_JWT, "bearer tokens are not configured", ""),
        (Kind.CREDENTIAL_KIND_API_KEY, "revoked api key", revoked.api_key.key_id),
        (Kind.CREDENTIAL_KIND_API_KEY, "unknown api key", ""),
        (Kind.CREDENTIAL_KIND_API_KEY, "unknown api key", ""),
    ]
    for event in failures:
        assert (event.code, event.method) == ("UNAUTHENTICATED", "/flowport.v1.GatewayService/GetStats")
        assert (event.tenant, event.subject, event.client_address) == ("", "", "127.0.0.1")
    # Nothing of any credential anywhere: not in the entries, not in the
    # database file or its write-ahead log (the entries are committed by now).
    stored = b"".join(p.read_bytes() for p in settings.data_dir.glob("flowport.db*"))
    listed = b"".join(e.SerializeToString() for e in failures)
    for secret in [*presented, token, ADMIN_KEY, ADMIN_KEY.split(".")[0], "secret-part", "c2lnbmF0dXJl"]:
        assert secret.encode() not in listed, secret
        assert secret.encode() not in stored, secret


async def test_repeated_failures_from_one_client_are_capped_then_counted(settings: Settings) -> None:
    running = await start(settings)
    try:
        async with AsyncClient(f"127.0.0.1:{running.port}", api_key="fpk_nope.nope") as caller:
            for _ in range(14):
                await _error(caller.sessions.ListSessions(session_pb2.ListSessionsRequest()))
        async with AsyncClient(f"127.0.0.1:{running.port}", api_key=ADMIN_KEY) as admin:
            assert len(await _events(admin, action=actions.AUTH_FAILED)) == 10
    finally:
        await stop(running, 1.0)  # writes the pending aggregate
    store = await SqliteStore.open(settings.database_path)
    try:
        rows = await store.list_audit_events(AuditQuery(action=actions.AUTH_FAILED), after=None, limit=100)
    finally:
        await store.close()
    assert [e.count for e in rows] == [4] + [1] * 10
    aggregate = rows[0]
    assert aggregate.client_address == "127.0.0.1" and "4 repeats" in aggregate.reason
    assert aggregate.first_time.ToNanoseconds() <= aggregate.time.ToNanoseconds()


async def test_the_caps_bound_the_rows_however_many_clients_fail(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "audit.db")
    now = [1000.0]
    recorder = AuditRecorder(store, per_client=2, total=5, window=60.0, clock=lambda: now[0])
    try:
        for client in range(50):
            for _ in range(3):
                recorder.append_limited(str(client), entry(actions.AUTH_FAILED, origin=Origin(f"10.0.0.{client}")))
        rows = await store.list_audit_events(AuditQuery(), after=None, limit=1000)
        assert len(rows) == 2  # the unauthenticated clients' part of the total, as one tenant's
        now[0] += 61.0
        recorder.flush()
        rows = await store.list_audit_events(AuditQuery(), after=None, limit=1000)
        counts = sorted(e.count for e in rows)
        # 2 recorded, the first client over its own cap (1), everything else in one aggregate.
        assert counts == [1, 1, 1, 147]
        assert sum(counts) == 150
        overflow = next(e for e in rows if e.count == 147)
        assert overflow.client_address == "" and "this tenant's clients" in overflow.reason
    finally:
        recorder.close()
        await store.close()


async def test_a_tenant_failing_in_a_loop_takes_only_its_part_of_the_log(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "audit.db")
    now = [1000.0]
    recorder = AuditRecorder(store, per_client=2, total=12, window=60.0, clock=lambda: now[0])

    def refused(tenant: str, subject: str) -> audit_pb2.AuditEvent:
        principal = Principal(tenant=tenant, subject=subject, roles=frozenset(), method="api_key")
        return entry(actions.ACCESS_DENIED, code="PERMISSION_DENIED", principal=principal)

    try:
        for client in range(20):  # many keys of one tenant, each refused five times
            for _ in range(5):
                recorder.append_limited(f"noisy/{client}", refused("noisy", f"k{client}"))
        for client in range(2):
            recorder.append_limited(f"quiet/{client}", refused("quiet", f"k{client}"))
        recorder.append_limited("", entry(actions.AUTH_FAILED, origin=Origin("10.0.0.9")))
        rows = await store.list_audit_events(AuditQuery(), after=None, limit=1000)
        by_tenant = sorted(e.tenant for e in rows)
        # 12 // 4 = 3 for each tenant: the noisy one's loop leaves the quiet ones their entries.
        assert by_tenant == ["", "noisy", "noisy", "noisy", "quiet", "quiet"]
        now[0] += 61.0
        recorder.flush()
        rows = await store.list_audit_events(AuditQuery(), after=None, limit=1000)
        assert sum(e.count for e in rows) == 100 + 3
        noisy = [e for e in rows if e.tenant == "noisy" and e.count > 1 and "this tenant's clients" in e.reason]
        assert len(noisy) == 1 and noisy[0].subject == "" and noisy[0].credential_id == ""
    finally:
        recorder.close()
        await store.close()


async def test_non_admins_get_permission_denied_and_the_refusal_is_recorded(
    admin: AsyncClient, running: Running
) -> None:
    key = await _user(admin)
    async with AsyncClient(f"127.0.0.1:{running.port}", api_key=key.key) as user:
        error = await _error(user.audit.ListAuditEvents(A.ListAuditEventsRequest()))
        assert (error.code(), error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_REQUIRED")
    (denied,) = await _events(admin, action=actions.ACCESS_DENIED)
    assert (denied.tenant, denied.subject, denied.code) == ("acme", key.api_key.key_id, "PERMISSION_DENIED")
    assert denied.method == "/flowport.v1.AuditService/ListAuditEvents" and "admin" in denied.reason


async def test_naming_another_tenant_is_recorded_and_changes_nothing_there(
    admin: AsyncClient, running: Running
) -> None:
    key = await _user(admin)
    async with AsyncClient(f"127.0.0.1:{running.port}", api_key=key.key) as user:
        intruding = session_pb2.Session(tenant="default")
        session = await user.sessions.CreateSession(session_pb2.CreateSessionRequest(session=intruding))
    assert session.tenant == "acme"
    (attempt,) = await _events(admin, action=actions.ACCESS_CROSS_TENANT)
    assert (attempt.tenant, attempt.resource_tenant, attempt.code) == ("acme", "default", "OK")
    assert attempt.method == "/flowport.v1.SessionService/CreateSession"
    assert [e.session_id for e in (await admin.sessions.ListSessions(session_pb2.ListSessionsRequest())).sessions] == []


async def test_the_audit_table_refuses_update_and_delete(admin: AsyncClient, settings: Settings) -> None:
    await _user(admin)
    assert await _events(admin)
    conn = sqlite3.connect(settings.database_path)
    try:
        for statement in ("UPDATE audit_log SET action='nothing'", "DELETE FROM audit_log"):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                conn.execute(statement)
        assert conn.execute("SELECT count(*) FROM audit_log").fetchone()[0] == 1
    finally:
        conn.close()
    # And the store offers no way to try.
    assert not [n for n in dir(AuditTables) if "delete" in n or "update" in n or "purge" in n]


async def test_pages_chain_newest_first_and_filters_combine(admin: AsyncClient, running: Running) -> None:
    made = [await _user(admin, tenant=f"t{i}") for i in range(5)]
    middle = time.time()
    key = await _user(admin, tenant="acme")
    async with AsyncClient(f"127.0.0.1:{running.port}", api_key=key.key) as user:
        await _error(user.audit.ListAuditEvents(A.ListAuditEventsRequest()))
    everything = await _events(admin)
    assert len(everything) == 7
    stamps = [(e.time.ToNanoseconds(), e.audit_event_id) for e in everything]
    assert stamps == sorted(stamps, reverse=True)

    seen, token = [], ""
    while True:
        page = await admin.audit.ListAuditEvents(A.ListAuditEventsRequest(page_size=2, page_token=token))
        assert len(page.audit_events) <= 2
        seen += [e.audit_event_id for e in page.audit_events]
        token = page.next_page_token
        if not token:
            break
    assert seen == [e.audit_event_id for e in everything]

    assert len(await _events(admin, action=actions.API_KEY_CREATED)) == 6
    assert len(await _events(admin, action="access.*")) == 1
    assert [e.resource_tenant for e in await _events(admin, tenant="t3")] == ["t3"]
    assert {e.tenant for e in await _events(admin, tenant="acme")} == {"default", "acme"}
    assert [e.action for e in await _events(admin, subject=key.api_key.key_id)] == [actions.ACCESS_DENIED]
    assert [e.action for e in await _events(admin, code="PERMISSION_DENIED")] == [actions.ACCESS_DENIED]
    later = await _events(admin, start_time=_stamp(middle))
    earlier = await _events(admin, end_time=_stamp(middle))
    assert (len(later), len(earlier)) == (2, 5)
    assert {e.resource for e in earlier} == {f"api_keys/{m.api_key.key_id}" for m in made}
    assert await _events(admin, action=actions.API_KEY_CREATED, tenant="t0", start_time=_stamp(middle)) == []

    first = await admin.audit.ListAuditEvents(A.ListAuditEventsRequest(page_size=1))
    other = A.ListAuditEventsRequest(page_size=1, page_token=first.next_page_token, action=actions.API_KEY_CREATED)
    error = await _error(admin.audit.ListAuditEvents(other))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and error.violations[0][0] == "page_token"


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"action": "auth.maybe"}, "action"),
        ({"action": "nothing.*"}, "action"),
        ({"tenant": "Not A Tenant"}, "tenant"),
        ({"code": "SORT_OF_OK"}, "code"),
        ({"subject": "s" * 257}, "subject"),
        ({"start_time": _stamp(2000), "end_time": _stamp(1000)}, "end_time"),
        ({"page_size": -1}, "page_size"),
        ({"page_token": "not-a-token"}, "page_token"),
    ],
)
async def test_a_bad_filter_is_invalid_argument_naming_the_field(
    admin: AsyncClient, request_fields: dict[str, Any], field: str
) -> None:
    error = await _error(admin.audit.ListAuditEvents(A.ListAuditEventsRequest(**request_fields)))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in error.violations] == [field]


async def test_a_failing_audit_write_never_fails_the_call(
    admin: AsyncClient, running: Running, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: audit_pb2.AuditEvent) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(running.store, "append_audit_soon", broken)
    with caplog.at_level(logging.ERROR, logger="flowport.server.audit"):
        created = await _user(admin)
    assert created.key
    assert any("could not queue" in r.getMessage() for r in caplog.records)


async def test_forwarded_addresses_count_only_from_trusted_proxies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    forwarded = (("x-forwarded-for", "198.51.100.9, 203.0.113.7"),)
    for trusted, expected in (
        ("127.0.0.1", ("203.0.113.7", "127.0.0.1")),
        ("192.0.2.254", ("127.0.0.1", "")),
        ("127.0.0.0/8", ("203.0.113.7", "127.0.0.1")),  # a network holding the peer
        ("0.0.0.0/0", ("203.0.113.7", "127.0.0.1")),  # every address: warned at start
    ):
        settings = make_settings(tmp_path / trusted.replace("/", "_"), trusted_proxies=trusted)
        running = await start(settings)
        try:
            async with AsyncClient(f"127.0.0.1:{running.port}", api_key=ADMIN_KEY) as admin:
                await admin.keys.CreateApiKey(
                    apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(tenant="acme")), metadata=forwarded
                )
                (event,) = await _events(admin)
            assert (event.client_address, event.proxy_address) == expected
        finally:
            await stop(running, 1.0)
    warned = [r.getMessage() for r in caplog.records if "holds a network of every address" in r.getMessage()]
    assert len(warned) == 1, warned


async def test_actions_outside_any_call_are_recorded_as_the_system(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "audit.db")
    try:
        AuditRecorder(store).record(actions.SECRET_KEY_ROTATED, reason="3 secrets re-encrypted", resource="secrets")
        (event,) = await store.list_audit_events(AuditQuery(), after=None, limit=10)
    finally:
        await store.close()
    assert (event.action, event.code, event.credential_kind) == (
        actions.SECRET_KEY_ROTATED,
        "OK",
        Kind.CREDENTIAL_KIND_SYSTEM,
    )
    assert (event.tenant, event.subject, event.method, event.client_address) == ("", "", "", "")


async def test_an_admin_acts_for_another_tenant_only_when_asked_and_it_is_recorded(
    admin: AsyncClient, running: Running
) -> None:
    key = await _user(admin)
    async with AsyncClient(f"127.0.0.1:{running.port}", api_key=key.key) as user:
        session = await user.sessions.CreateSession(session_pb2.CreateSessionRequest(session=session_pb2.Session()))
        # A user cannot act for another tenant...
        refused = await _error(
            user.sessions.ListSessions(session_pb2.ListSessionsRequest(), metadata=((ACT_AS_HEADER, "default"),))
        )
        assert (refused.code(), refused.reason) == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_REQUIRED")
    get = session_pb2.GetSessionRequest(session_id=session.session_id)
    # ...an admin does not by default: acme's session is not in its tenant...
    assert (await _error(admin.sessions.GetSession(get))).code() is grpc.StatusCode.NOT_FOUND
    # ...and does when it says so.
    found = await admin.sessions.GetSession(get, metadata=((ACT_AS_HEADER, "acme"),))
    assert found.tenant == "acme"
    bad = await _error(admin.sessions.GetSession(get, metadata=((ACT_AS_HEADER, "Not A Tenant"),)))
    assert bad.code() is grpc.StatusCode.INVALID_ARGUMENT and bad.violations[0][0] == ACT_AS_HEADER
    recorded = [
        (e.action, e.method.rsplit("/", 1)[1], e.tenant, e.resource_tenant, e.code)
        for e in await _events(admin)
        if e.action in (actions.ADMIN_CALL, actions.ACCESS_DENIED)
    ]
    assert (actions.ADMIN_CALL, "GetSession", "default", "acme", "OK") in recorded  # a read, recorded all the same
    assert (actions.ACCESS_DENIED, "ListSessions", "acme", "", "PERMISSION_DENIED") in recorded


async def test_a_tenant_admins_refused_calls_naming_another_tenant_are_capped(settings: Settings) -> None:
    """A customer's admin naming another tenant in a loop must not add a row a call to the log, nor
    to that tenant's view of it; its own tenant's changes are still each recorded."""
    running = await start(settings)
    try:
        target = f"127.0.0.1:{running.port}"
        async with AsyncClient(target, api_key=ADMIN_KEY) as operator:
            acme = await operator.keys.CreateApiKey(
                apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(tenant="acme", roles=["admin"]))
            )
            async with AsyncClient(target, api_key=acme.key) as acme_admin:
                for _ in range(25):
                    await _error(acme_admin.keys.ListApiKeys(apikey_pb2.ListApiKeysRequest(tenant="victim")))
                    await _error(
                        acme_admin.keys.CreateApiKey(
                            apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(tenant="victim", roles=["user"]))
                        )
                    )
                for _ in range(12):
                    await acme_admin.keys.CreateApiKey(
                        apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(roles=["user"]))
                    )
            about_victim = await _events(operator, tenant="victim")
            by_acme = [e for e in about_victim if e.subject == acme.api_key.key_id]
            # Each action of the caller is capped at ten a minute (access.denied, access.cross_tenant),
            # the rest counted in one entry later: 50 refused calls, at most 20 rows.
            assert 0 < len(by_acme) <= 20, [(e.action, e.method) for e in by_acme]
            created = await _events(operator, action=actions.API_KEY_CREATED, tenant="acme")
            assert len([e for e in created if e.subject == acme.api_key.key_id and e.code == "OK"]) == 12, "each kept"
    finally:
        await stop(running, 1.0)


async def test_a_users_own_secret_changes_are_capped_then_counted_and_an_admins_are_each_recorded(
    settings: Settings,
) -> None:
    """The log is append-only, so a user putting its own secret in a loop must not add a row each."""
    running = await start(settings)
    try:
        async with AsyncClient(f"127.0.0.1:{running.port}", api_key=ADMIN_KEY) as admin:
            made = await admin.keys.CreateApiKey(
                apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(tenant="default", roles=["user"]))
            )
            async with AsyncClient(f"127.0.0.1:{running.port}", api_key=made.key) as user:
                for n in range(14):
                    await user.secrets.PutSecret(secret_pb2.PutSecretRequest(name="MINE", value=f"v{n}"))
            for n in range(14):
                await admin.secrets.PutSecret(secret_pb2.PutSecretRequest(name="ADMINS", value=f"v{n}"))
            written = await _events(admin, action=actions.SECRET_WRITTEN)
            assert len([e for e in written if e.subject == made.api_key.key_id]) == 10
            assert len([e for e in written if e.subject != made.api_key.key_id]) == 14
    finally:
        await stop(running, 1.0)  # writes the pending aggregate
    store: SqlStore = await open_store(settings)
    try:
        rows = await store.list_audit_events(AuditQuery(action=actions.SECRET_WRITTEN), after=None, limit=100)
    finally:
        await store.close()
    counts = sorted(e.count for e in rows if e.subject == made.api_key.key_id)
    assert counts == [1] * 10 + [4], "ten recorded one by one, the other four counted in one entry"
