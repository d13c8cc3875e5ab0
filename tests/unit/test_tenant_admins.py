"""An admin of a tenant administers that tenant alone; the operator's admins (tenant `default`,
that of the first-start key) administer every tenant.

A customer given an admin key for its own tenant must not be able to read, create or revoke
another customer's keys, read its audit log, act for it, or read the gateway's figures and
metrics, which count every tenant.
"""

from __future__ import annotations

import grpc
import pytest

from flowport.clients import ApiError, AsyncClient
from flowport.server.app import Running
from flowport.v1 import apikey_pb2, audit_pb2, gateway_pb2, session_pb2

from ..conftest import ADMIN_KEY

ACT_AS = "x-flowport-act-as-tenant"


async def _key(admin: AsyncClient, tenant: str, role: str) -> apikey_pb2.CreateApiKeyResponse:
    return await admin.keys.CreateApiKey(
        apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(tenant=tenant, roles=[role]))
    )


async def _refused(call: object, code: grpc.StatusCode) -> ApiError:
    with pytest.raises(ApiError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() is code, caught.value
    return caught.value


async def _audit_views(
    target: str, alpha_admin: apikey_pb2.CreateApiKeyResponse, beta_admin: apikey_pb2.CreateApiKeyResponse
) -> None:
    # Beta's admin sees alpha's admin's attempt on beta (its key creation, and its act-as), but not
    # who made it: another tenant's key and address are not beta's to know.
    async with AsyncClient(target, api_key=beta_admin.key) as beta_admins:
        entries = (
            await beta_admins.audit.ListAuditEvents(audit_pb2.ListAuditEventsRequest(page_size=500))
        ).audit_events
    attempts = [e for e in entries if e.resource_tenant == "beta" and e.code == "PERMISSION_DENIED"]
    assert attempts, entries
    for entry in attempts:
        assert (entry.tenant, entry.subject, entry.credential_id, entry.client_address) == ("", "", "", ""), entry
    assert alpha_admin.api_key.key_id not in str(entries)
    # Nor can it find them by naming the caller: a subject filter matches its own tenant's callers only.
    async with AsyncClient(target, api_key=beta_admin.key) as beta_admins:
        by_subject = await beta_admins.audit.ListAuditEvents(
            audit_pb2.ListAuditEventsRequest(subject=alpha_admin.api_key.key_id, page_size=500)
        )
        assert list(by_subject.audit_events) == [], by_subject
    # Alpha's own entries keep who made them.
    async with AsyncClient(target, api_key=alpha_admin.key) as alpha:
        own = (await alpha.audit.ListAuditEvents(audit_pb2.ListAuditEventsRequest(page_size=500))).audit_events
        by_subject = await alpha.audit.ListAuditEvents(
            audit_pb2.ListAuditEventsRequest(subject=alpha_admin.api_key.key_id, page_size=500)
        )
    assert any(e.subject == alpha_admin.api_key.key_id for e in own), own
    assert {e.subject for e in by_subject.audit_events} == {alpha_admin.api_key.key_id}, "found by subject"


async def test_an_admin_of_a_tenant_reaches_nothing_of_another(running: Running) -> None:
    target = f"127.0.0.1:{running.port}"
    async with AsyncClient(target, api_key=ADMIN_KEY) as operator:
        alpha_admin = await _key(operator, "alpha", "admin")
        beta_user = await _key(operator, "beta", "user")
        beta_admin = await _key(operator, "beta", "admin")
    async with (
        AsyncClient(target, api_key=alpha_admin.key) as alpha,
        AsyncClient(target, api_key=beta_user.key) as beta,
    ):
        beta_session = await beta.sessions.CreateSession(session_pb2.CreateSessionRequest())
        beta_id = beta_user.api_key.key_id

        # Keys: its own tenant's only; another tenant's are missing, naming one is refused.
        listed = await alpha.keys.ListApiKeys(apikey_pb2.ListApiKeysRequest())
        assert {k.tenant for k in listed.api_keys} == {"alpha"}, listed
        denied = await _refused(
            alpha.keys.ListApiKeys(apikey_pb2.ListApiKeysRequest(tenant="beta")), grpc.StatusCode.PERMISSION_DENIED
        )
        assert denied.reason == "ROLE_REQUIRED" and denied.metadata == {"role": "admin", "tenant": "default"}
        await _refused(alpha.keys.GetApiKey(apikey_pb2.GetApiKeyRequest(key_id=beta_id)), grpc.StatusCode.NOT_FOUND)
        await _refused(
            alpha.keys.RevokeApiKey(apikey_pb2.RevokeApiKeyRequest(key_id=beta_id)), grpc.StatusCode.NOT_FOUND
        )
        await _refused(
            alpha.keys.CreateApiKey(
                apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(tenant="beta", roles=["admin"]))
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        # Beta's key still works: nothing was revoked.
        await beta.sessions.GetSession(session_pb2.GetSessionRequest(session_id=beta_session.session_id))
        # Its own tenant's keys it does manage.
        own = await alpha.keys.CreateApiKey(apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(roles=["user"])))
        assert own.api_key.tenant == "alpha"
        revoked = await alpha.keys.RevokeApiKey(apikey_pb2.RevokeApiKeyRequest(key_id=own.api_key.key_id))
        assert revoked.HasField("revoke_time")

        # Acting for another tenant is the operator's alone.
        as_beta = ((ACT_AS, "beta"),)
        denied = await _refused(
            alpha.sessions.GetSession(
                session_pb2.GetSessionRequest(session_id=beta_session.session_id), metadata=as_beta
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        assert denied.metadata == {"role": "admin", "tenant": "default"}

        # The audit log: its own tenant's entries.
        await _refused(
            alpha.audit.ListAuditEvents(audit_pb2.ListAuditEventsRequest(tenant="beta")),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        entries = (await alpha.audit.ListAuditEvents(audit_pb2.ListAuditEventsRequest(page_size=500))).audit_events
        assert entries, "alpha's admin reads its own tenant's audit log"
        assert all("alpha" in (e.tenant, e.resource_tenant) for e in entries), entries

        # Figures: its own tenant's; the gateway's metrics, every tenant's, are the operator's.
        stats = await alpha.gateway.GetStats(gateway_pb2.GetStatsRequest())
        assert stats.sessions.active == 0, "beta's session is not counted in alpha's figures"
        await _refused(alpha.gateway.GetMetrics(gateway_pb2.GetMetricsRequest()), grpc.StatusCode.PERMISSION_DENIED)

    await _audit_views(target, alpha_admin, beta_admin)

    # The operator's admin still does all of it, for any tenant.
    async with AsyncClient(target, api_key=ADMIN_KEY) as operator:
        listed = await operator.keys.ListApiKeys(apikey_pb2.ListApiKeysRequest(tenant="beta"))
        assert {k.key_id for k in listed.api_keys} == {beta_id, beta_admin.api_key.key_id}
        found = await operator.sessions.GetSession(
            session_pb2.GetSessionRequest(session_id=beta_session.session_id), metadata=((ACT_AS, "beta"),)
        )
        assert found.session_id == beta_session.session_id
        stats = await operator.gateway.GetStats(gateway_pb2.GetStatsRequest())
        assert stats.sessions.active >= 1
        await operator.gateway.GetMetrics(gateway_pb2.GetMetricsRequest())
        revoked = await operator.keys.RevokeApiKey(apikey_pb2.RevokeApiKeyRequest(key_id=beta_admin.api_key.key_id))
        assert revoked.HasField("revoke_time")
