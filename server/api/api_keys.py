"""ApiKeyService: admins create, list and revoke API keys.

An admin manages the keys of its own tenant; the operator's admins
(principal.OPERATOR_TENANT) every tenant's. Another tenant's key is NOT_FOUND
to an admin of a tenant, as every other tenant's resource is; naming another
tenant (to create a key in it, or to list its keys) is PERMISSION_DENIED.
"""

from __future__ import annotations

from flowport.server import pagination
from flowport.server.api.common import idempotency_key, other_tenant_refused, request_id_reused, require
from flowport.server.audit import actions, note
from flowport.server.auth.keys import REVOKED_EVENT, KeyAuthenticator, describe, key_hash, new_key
from flowport.server.auth.principal import OPERATOR_TENANT, ROLES, TENANT_NAME, USER
from flowport.server.clock import now_us
from flowport.server.errors import InvalidArgument, NotFound, shown
from flowport.server.events.bus import EventBus
from flowport.server.storage import IdempotencyConflict
from flowport.server.storage.api_keys import ApiKeyTables
from flowport.server.tenancy import administered_tenant, principal_of, tenant_of
from flowport.server.types import Context
from flowport.v1 import apikey_pb2, apikey_pb2_grpc

TENANT = TENANT_NAME
MAX_DESCRIPTION = 512


def _not_found(key_id: str) -> NotFound:
    return NotFound(f"API key {shown(key_id)} does not exist", reason="API_KEY_NOT_FOUND", metadata={"key_id": key_id})


class ApiKeyService(apikey_pb2_grpc.ApiKeyServiceServicer):
    """API keys of every tenant (the permission table makes it admin-only)."""

    def __init__(self, store: ApiKeyTables, keys: KeyAuthenticator, bus: EventBus | None = None) -> None:
        self._store = store
        self._keys = keys
        self._bus = bus

    async def CreateApiKey(
        self, request: apikey_pb2.CreateApiKeyRequest, context: Context
    ) -> apikey_pb2.CreateApiKeyResponse:
        given = request.api_key
        tenant = given.tenant or tenant_of(context)
        # Noted first, so a refused attempt is in the audit log too.
        note(actions.API_KEY_CREATED, resource_tenant=tenant)
        roles = sorted(set(given.roles)) or [USER]
        violations = []
        if not TENANT.match(tenant):
            violations.append(
                ("api_key.tenant", "1 to 63 characters: a-z, 0-9, '_' and '-', starting with a letter or digit")
            )
        unknown = [r for r in roles if r not in ROLES]
        if unknown:
            violations.append(("api_key.roles", f"unknown roles {unknown}; known: {sorted(ROLES)}"))
        if len(given.description) > MAX_DESCRIPTION:
            violations.append(("api_key.description", f"at most {MAX_DESCRIPTION} characters"))
        if given.HasField("expire_time") and given.expire_time.ToMicroseconds() <= now_us():
            violations.append(("api_key.expire_time", "must be in the future"))
        if violations:
            raise InvalidArgument(
                "api key is not valid: " + "; ".join(f"{f} {d}" for f, d in violations), violations=violations
            )
        scope = administered_tenant()
        if scope is not None and tenant != scope:
            raise other_tenant_refused("manages the API keys", tenant)
        principal = principal_of(context)
        key_id, key = new_key()
        description = describe(key_id, tenant, roles, given.description, principal.subject if principal else "")
        if given.HasField("expire_time"):
            description.expire_time.CopyFrom(given.expire_time)
        fingerprint = idempotency_key(request.request_id, given)
        try:
            result = await self._store.create_api_key(
                description, key_hash(key), fingerprint, tenant_of(context), capped=tenant != OPERATOR_TENANT
            )
        except IdempotencyConflict:
            raise request_id_reused(request.request_id, "with a different key") from None
        if result.replayed:
            # The first key was shown once; a retry only describes it.
            first = apikey_pb2.ApiKey.FromString(result.response)
            note(actions.API_KEY_CREATED, resource=f"api_keys/{first.key_id}")
            return apikey_pb2.CreateApiKeyResponse(api_key=first)
        note(actions.API_KEY_CREATED, resource=f"api_keys/{key_id}")
        return apikey_pb2.CreateApiKeyResponse(api_key=description, key=key)

    async def GetApiKey(self, request: apikey_pb2.GetApiKeyRequest, context: Context) -> apikey_pb2.ApiKey:
        require(request.key_id, "key_id")
        key = await self._store.get_api_key(request.key_id, administered_tenant())
        if key is None:
            raise _not_found(request.key_id)
        return key

    async def ListApiKeys(
        self, request: apikey_pb2.ListApiKeysRequest, context: Context
    ) -> apikey_pb2.ListApiKeysResponse:
        size = pagination.page_size(request.page_size)
        scope = administered_tenant()
        if scope is not None and request.tenant not in ("", scope):
            raise other_tenant_refused("manages the API keys", request.tenant)
        tenant = request.tenant or scope
        filters = {"tenant": tenant or ""}
        after = pagination.cursor_time_id(pagination.decode_token(request.page_token, filters))
        rows = await self._store.list_api_keys(tenant=tenant, after=after, limit=size + 1)
        keys, token = pagination.page(rows, size, filters, lambda k: [k.create_time.ToMicroseconds(), k.key_id])
        return apikey_pb2.ListApiKeysResponse(api_keys=keys, next_page_token=token)

    async def RevokeApiKey(self, request: apikey_pb2.RevokeApiKeyRequest, context: Context) -> apikey_pb2.ApiKey:
        note(actions.API_KEY_REVOKED, resource=f"api_keys/{request.key_id}" if request.key_id else "")
        require(request.key_id, "key_id")
        key = await self._store.revoke_api_key(request.key_id, administered_tenant(), now_us())
        if key is None:
            raise _not_found(request.key_id)
        note(actions.API_KEY_REVOKED, resource_tenant=key.tenant)
        # Immediate effect: the next call with this key is looked up again,
        # here and (through the bus) in every other process.
        self._keys.forget(request.key_id)
        if self._bus is not None:
            self._bus.publish(REVOKED_EVENT, tenant=key.tenant, data={"key_id": key.key_id})
        return key
