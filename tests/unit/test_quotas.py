"""Per-tenant caps on what a tenant keeps (`--tenant-max-objects`), on a real SQLite file and a real
PostgreSQL database, and what the purge gives back: deleted workflow versions and expired services."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2, timestamp_pb2

from flowport.clients import ApiError, AsyncClient
from flowport.server.app import start, stop
from flowport.server.errors import ResourceExhausted
from flowport.server.secrets.cipher import Sealed
from flowport.server.storage import SqlStore, quotas
from flowport.server.storage.quotas import TenantQuotas
from flowport.v1 import apikey_pb2, registry_pb2, resource_pb2, session_pb2, webhook_pb2, workflow_pb2
from flowport.v1.execution_pb2 import Execution

from ..conftest import ADMIN_KEY, make_settings

NOW = 1_700_000_000_000_000
HOUR = 3600 * 1_000_000
CAP = 2


@pytest.fixture
def store(engine_store: SqlStore) -> SqlStore:
    engine_store.quotas = TenantQuotas(objects=CAP, webhooks=CAP)
    return engine_store


def _ts(us: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=us // 1_000_000)


def _workflow(workflow_id: str) -> workflow_pb2.Workflow:
    return workflow_pb2.Workflow(workflow_id=workflow_id, create_time=_ts(NOW))


async def _refused(attempt: Awaitable[object]) -> ResourceExhausted:
    with pytest.raises(ResourceExhausted) as caught:
        await attempt
    assert caught.value.reason == "TENANT_QUOTA"
    return caught.value


Create = Callable[[SqlStore, str, str], Awaitable[object]]


async def _create_workflow(store: SqlStore, tenant: str, name: str) -> object:
    return await store.create_workflow(tenant, _workflow(name), None)


async def _create_webhook(store: SqlStore, tenant: str, name: str) -> object:
    hook = webhook_pb2.Webhook(webhook_id=name, url="https://example.com/h", create_time=_ts(NOW))
    return await store.create_webhook(tenant, hook, b"", None)


async def _register_service(store: SqlStore, tenant: str, name: str) -> object:
    service = registry_pb2.RegisteredService(service_id=name, endpoint="https://example.com", create_time=_ts(NOW))
    return await store.register_service(tenant, service, None, NOW)


async def _create_resource(store: SqlStore, tenant: str, name: str) -> object:
    resource = resource_pb2.Resource(name=name, http=resource_pb2.HttpProfile(base_url="https://example.com"))
    return await store.create_resource(tenant, resource, None, NOW)


async def _put_secret(store: SqlStore, tenant: str, name: str) -> object:
    return await store.put_secret(
        tenant=tenant,
        name=name,
        description="d",
        sealed=Sealed("k", name.encode()),
        now_us=NOW,
        idempotency_key=None,
        same_value=lambda sealed: False,  # every put is a new version
    )


async def _create_api_key(store: SqlStore, tenant: str, name: str, expire_us: int | None = None) -> object:
    key = apikey_pb2.ApiKey(key_id=f"fpk_{tenant}_{name}", tenant=tenant, roles=["user"], create_time=_ts(NOW))
    if expire_us is not None:
        key.expire_time.CopyFrom(_ts(expire_us))
    return await store.create_api_key(key, f"{tenant}/{name}".encode(), None, tenant)


@pytest.mark.parametrize(
    "create", [_create_workflow, _create_webhook, _register_service, _create_resource, _put_secret, _create_api_key]
)
async def test_a_tenant_keeps_at_most_its_cap_of_each_kind_and_the_others_are_untouched(
    store: SqlStore, create: Create
) -> None:
    for n in range(CAP):
        await create(store, "greedy", f"o{n}")
    refused = await _refused(create(store, "greedy", "one-more"))
    setting = "tenant_max_webhooks" if create is _create_webhook else "tenant_max_objects"
    assert refused.metadata[setting] == str(CAP) and "one-more" not in refused.message
    # Another tenant's room is its own.
    await create(store, "other", "o0")
    # Replacing what the tenant keeps adds nothing: a new version of a secret, a service registered
    # again. (A workflow's new version is a new row, counted.)
    if create in (_put_secret, _register_service):
        await create(store, "greedy", "o0")


async def test_the_refused_create_left_nothing_behind(store: SqlStore) -> None:
    for _ in range(CAP):
        await _create_workflow(store, "t", "w")
    await _refused(_create_workflow(store, "t", "w"))
    latest = await store.get_workflow("t", "w")
    assert latest is not None and latest.version == CAP


async def test_deleted_versions_are_purged_an_hour_on_unless_running_and_numbering_goes_on(store: SqlStore) -> None:
    for _ in range(CAP):
        await _create_workflow(store, "t", "w")
    await _create_workflow(store, "t2", "kept")  # not deleted: never purged
    await store.delete_workflow("t", "w", NOW)
    # Deleted, not purged yet: the versions still count.
    await _refused(_create_workflow(store, "t", "x"))
    # An unfinished execution of the workflow holds its versions (a takeover needs them).
    running = Execution(execution_id="e1", workflow_id="w", state=Execution.STATE_RUNNING, create_time=_ts(NOW))
    await store.insert_execution("t", running, None)
    assert await store.purge_deleted_workflows(NOW + HOUR) == 0
    running.state = Execution.STATE_SUCCEEDED
    await store.save_execution(running)
    assert await store.purge_deleted_workflows(NOW) == 0, "deleted at NOW: not before it"
    assert await store.purge_deleted_workflows(NOW + HOUR) == CAP
    assert await store.get_workflow("t", "w", 1, include_deleted=True) is None
    assert await store.get_workflow("t2", "kept") is not None
    # Room again, and the workflow made again goes on from its last number.
    await _create_workflow(store, "t", "w")
    again = await store.get_workflow("t", "w")
    assert again is not None and again.version == CAP + 1


async def test_numbering_goes_on_after_a_purged_version_above_versions_still_there(store: SqlStore) -> None:
    """A delete through a session's credential hides only what it may see: here the public v2,
    not v1 in another credential's session. Once v2 is purged, the next version is v3, never a
    second v2 with another definition."""
    bobs = session_pb2.Session(session_id="s-bob", creator="key-bob", create_time=_ts(NOW))
    await store.create_session("t", bobs, None)
    in_session = _workflow("w")
    in_session.session_id = "s-bob"
    await store.create_workflow("t", in_session, None)
    await _create_workflow(store, "t", "w")
    assert await store.delete_workflow("t", "w", NOW, session_creator="key-alice") is not None
    assert await store.get_workflow("t", "w", 2) is None
    assert await store.purge_deleted_workflows(NOW + HOUR) == 1
    still = await store.get_workflow("t", "w", 1)
    assert still is not None and still.session_id == "s-bob"
    await _create_workflow(store, "t", "w")
    latest = await store.get_workflow("t", "w")
    assert latest is not None and latest.version == 3


async def test_expired_service_registrations_are_purged(store: SqlStore) -> None:
    expiring = registry_pb2.RegisteredService(
        service_id="s", endpoint="https://example.com", create_time=_ts(NOW), expire_time=_ts(NOW + HOUR)
    )
    await store.register_service("t", expiring, None, NOW)
    await _register_service(store, "t", "forever")
    assert await store.purge_expired_services(NOW) == 0
    assert await store.purge_expired_services(NOW + HOUR) == 1
    assert await store.get_service("t", "forever", NOW + HOUR) is not None
    await _register_service(store, "t", "room-again")


async def test_api_keys_are_purged_30_days_after_their_revocation_or_expiry(store: SqlStore) -> None:
    """A tenant's admin rotating keys gets its room back: ended keys count until the purge."""
    day = 24 * HOUR
    await _create_api_key(store, "t", "revoked")
    await _create_api_key(store, "t", "expiring", expire_us=NOW + day)
    await _refused(_create_api_key(store, "t", "one-more"))
    assert await store.revoke_api_key("fpk_t_revoked", "t", NOW) is not None
    # The purge names the time before which ended keys go (its round's time less 30 days).
    assert await store.purge_ended_api_keys(NOW) == 0, "revoked at NOW, expiring a day later: neither before"
    assert await store.purge_ended_api_keys(NOW + day) == 1
    assert await store.purge_ended_api_keys(NOW + day + 1) == 1
    assert await store.get_api_key("fpk_t_revoked", None) is None
    await _create_api_key(store, "t", "room-again")


async def test_a_create_past_the_cap_is_resource_exhausted_through_the_api(tmp_path: Path) -> None:
    running = await start(make_settings(tmp_path, tenant_max_objects=1))
    try:
        async with AsyncClient(f"127.0.0.1:{running.port}", api_key=ADMIN_KEY) as client:
            code = struct_pb2.Struct()
            code.update({"code": "result = 1"})
            node = workflow_pb2.Node(name="n", type="PythonCodeNode", config=code)
            request = workflow_pb2.CreateWorkflowRequest(
                workflow=workflow_pb2.Workflow(workflow_id="w", name="w", nodes=[node])
            )
            await client.workflows.CreateWorkflow(request)
            with pytest.raises(ApiError) as caught:
                await client.workflows.CreateWorkflow(request)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert caught.value.reason == "TENANT_QUOTA", caught.value
            assert "most of 1 workflow versions" in caught.value.message
            # API keys: a tenant's are counted, the operator's (tenant default) are not.
            for tenant in ("default", "default", "acme"):
                await client.keys.CreateApiKey(
                    apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(tenant=tenant, roles=["user"]))
                )
            with pytest.raises(ApiError) as caught:
                await client.keys.CreateApiKey(
                    apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(tenant="acme", roles=["user"]))
                )
            assert caught.value.reason == "TENANT_QUOTA" and "API keys" in caught.value.message
    finally:
        await stop(running, 1.0)


async def test_sessions_past_the_tenants_cap_are_refused_within_a_sample(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sessions are counted one create in SESSION_SAMPLE (and every create while over): a tenant
    passes its cap by less than a sample, then every create is refused until the purge makes room;
    other tenants are not touched."""
    monkeypatch.setattr(quotas, "SESSION_SAMPLE", 4)
    store.quotas = TenantQuotas(sessions=10)

    def made(n: int, tenant: str = "t") -> session_pb2.Session:
        return session_pb2.Session(
            session_id=f"{tenant}-{n}", creator="k", create_time=_ts(NOW), expire_time=_ts(NOW + HOUR)
        )

    created = 0
    with pytest.raises(ResourceExhausted) as caught:
        for n in range(100):
            await store.create_session("t", made(n), None)
            created += 1
    assert caught.value.reason == "TENANT_QUOTA"
    assert caught.value.metadata == {"kind": "sessions", "tenant_max_sessions": "10"}
    assert 10 <= created < 10 + quotas.SESSION_SAMPLE
    with pytest.raises(ResourceExhausted):  # every create while over is counted, and refused
        await store.create_session("t", made(1000), None)
    assert await store.get_session("t", "t-1000", NOW) is None, "a refused create writes nothing"
    await store.create_session("other", made(0, "other"), None)
    # Expired sessions go with the purge: room again.
    await store.purge_expired(NOW + 2 * HOUR, 0)
    await store.create_session("t", made(2000), None)


async def test_webhooks_have_a_cap_of_their_own(store: SqlStore) -> None:
    """Every event is delivered to each webhook that wants it: their cap is smaller than the others'."""
    store.quotas = TenantQuotas(objects=10, webhooks=1)
    await _create_webhook(store, "t", "h0")
    refused = await _refused(_create_webhook(store, "t", "h1"))
    assert refused.metadata == {"kind": "webhooks", "tenant_max_webhooks": "1"}
    await _create_workflow(store, "t", "w0")  # the other kinds keep the objects' cap
    await _create_workflow(store, "t", "w1")


async def test_the_rows_of_each_kind_are_capped_in_bytes_too(store: SqlStore) -> None:
    """Counts alone would let 10,000 workflow versions of 4 MiB each take 40 GB."""
    store.quotas = TenantQuotas(objects=100, object_bytes=20_000)

    def big(name: str) -> workflow_pb2.Workflow:
        workflow = _workflow(name)
        workflow.description = "x" * 6000
        return workflow

    for n in range(3):
        await store.create_workflow("t", big(f"w{n}"), None)
    refused = await _refused(store.create_workflow("t", big("w3"), None))
    assert refused.metadata == {"kind": "workflows", "tenant_max_object_bytes": "20000"}
    assert await store.get_workflow("t", "w3") is None, "the refused create wrote nothing"
    await store.create_workflow("other", big("w0"), None)  # another tenant's bytes are its own
    await _create_webhook(store, "t", "h0")  # and each kind's are counted apart


async def test_a_secret_rewritten_larger_counts_against_the_bytes(store: SqlStore) -> None:
    """A new version adds no secret, but its value may take more of the tenant's bytes."""
    store.quotas = TenantQuotas(objects=1, object_bytes=3000)

    async def put(value: bytes) -> object:
        return await store.put_secret(
            tenant="t",
            name="s",
            description="d",
            sealed=Sealed("k", value),
            now_us=NOW,
            idempotency_key=None,
            same_value=lambda sealed: False,
        )

    await put(b"a" * 1000)
    refused = await _refused(put(b"b" * 3500))
    assert refused.metadata == {"kind": "secrets", "tenant_max_object_bytes": "3000"}
    kept = await store.get_secret("t", "s")
    assert kept is not None and kept.sealed.blob == b"a" * 1000 and kept.secret.version == 1
    # Rotating to a value no larger is never refused, even by a count the tenant is at.
    await put(b"c" * 900)
    await put(b"d" * 2900)
    kept = await store.get_secret("t", "s")
    assert kept is not None and kept.secret.version == 3
