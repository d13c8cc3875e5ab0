"""SecretService: a tenant's secrets, write-only (no RPC returns a value)."""

from __future__ import annotations

from google.protobuf import empty_pb2

from flowport.server import pagination
from flowport.server.api.common import check_request_id, idempotency_key, request_id_reused
from flowport.server.audit import actions, note
from flowport.server.clock import now_us
from flowport.server.errors import InvalidArgument, NotFound, shown
from flowport.server.secrets.references import SECRET_NAME
from flowport.server.secrets.vault import SecretVault
from flowport.server.storage import IdempotencyConflict
from flowport.server.storage.secrets import SecretTables
from flowport.server.tenancy import tenant_of
from flowport.server.types import Context
from flowport.v1 import secret_pb2, secret_pb2_grpc

MAX_VALUE_BYTES = 64 * 1024
MAX_DESCRIPTION = 512
NAME_RULE = "1 to 128 characters: A-Z, 0-9 and '_', not starting with a digit"


def _check_name(name: str) -> None:
    if not SECRET_NAME.match(name):
        raise InvalidArgument(f"name {shown(name, 140)} is not a valid secret name", violations=[("name", NAME_RULE)])


def _resource(name: str) -> str:
    """The audit log's name for a secret (a bad name is cut short, it is only a label there)."""
    return f"secrets/{name[:128]}"


def _not_found(name: str) -> NotFound:
    return NotFound(f"secret {shown(name)} does not exist", reason="SECRET_NOT_FOUND", metadata={"name": name})


class SecretService(secret_pb2_grpc.SecretServiceServicer):
    """Secrets of the caller's tenant; another tenant's are NOT_FOUND."""

    def __init__(self, store: SecretTables, vault: SecretVault) -> None:
        self._store = store
        self._vault = vault

    async def PutSecret(self, request: secret_pb2.PutSecretRequest, context: Context) -> secret_pb2.Secret:
        tenant = tenant_of(context)
        # Audited whatever the outcome; the name only, never the value.
        note(actions.SECRET_WRITTEN, resource=_resource(request.name), resource_tenant=tenant)
        violations = []
        if not SECRET_NAME.match(request.name):
            violations.append(("name", NAME_RULE))
        size = len(request.value.encode())
        if size == 0:
            violations.append(("value", "required"))
        elif size > MAX_VALUE_BYTES:
            # The size only, never the value, goes into the message.
            violations.append(("value", f"{size} bytes; at most {MAX_VALUE_BYTES} bytes"))
        if len(request.description) > MAX_DESCRIPTION:
            violations.append(("description", f"at most {MAX_DESCRIPTION} characters"))
        if violations:
            raise InvalidArgument(
                "secret is not valid: " + "; ".join(f"{f} {d}" for f, d in violations), violations=violations
            )
        # No digest of the value is kept anywhere: the idempotency record
        # fingerprints the request without it (see PutSecretRequest.request_id).
        fingerprint = idempotency_key(
            request.request_id, secret_pb2.PutSecretRequest(name=request.name, description=request.description)
        )
        try:
            result = await self._vault.put(
                tenant=tenant,
                name=request.name,
                value=request.value,
                description=request.description,
                now_us=now_us(),
                idempotency_key=fingerprint,
            )
        except IdempotencyConflict:
            raise request_id_reused(request.request_id, "for another secret or description") from None
        return secret_pb2.Secret.FromString(result.response)

    async def GetSecret(self, request: secret_pb2.GetSecretRequest, context: Context) -> secret_pb2.Secret:
        _check_name(request.name)
        stored = await self._store.get_secret(tenant_of(context), request.name)
        if stored is None:
            raise _not_found(request.name)
        return stored.secret

    async def ListSecrets(
        self, request: secret_pb2.ListSecretsRequest, context: Context
    ) -> secret_pb2.ListSecretsResponse:
        size = pagination.page_size(request.page_size)
        filters: dict[str, str] = {}
        after = pagination.cursor_str(pagination.decode_token(request.page_token, filters))
        rows = await self._store.list_secrets(tenant_of(context), after=after, limit=size + 1)
        secrets, token = pagination.page(rows, size, filters, lambda s: [s.name])
        return secret_pb2.ListSecretsResponse(secrets=secrets, next_page_token=token)

    async def DeleteSecret(self, request: secret_pb2.DeleteSecretRequest, context: Context) -> empty_pb2.Empty:
        tenant = tenant_of(context)
        note(actions.SECRET_DELETED, resource=_resource(request.name), resource_tenant=tenant)
        _check_name(request.name)
        check_request_id(request.request_id)
        try:
            deleted = await self._store.delete_secret(tenant, request.name, now_us(), request.request_id)
        except IdempotencyConflict:
            raise request_id_reused(request.request_id, "to delete another secret") from None
        if not deleted:
            raise _not_found(request.name)
        return empty_pb2.Empty()
