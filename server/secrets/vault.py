"""The one place that holds both the sealed rows and the keys: sealing on the
way in (PutSecret), opening for nodes on the way out (never for the API)."""

from __future__ import annotations

import hmac
from collections.abc import Collection

from flowport.server.secrets.cipher import Sealed, SecretDecryptError, open_sealed, seal
from flowport.server.secrets.keyring import Keyring
from flowport.server.secrets.source import KeySource
from flowport.server.storage.base import IdempotentResult
from flowport.server.storage.secrets import SecretTables


class SecretVault:
    """Seals and opens a tenant's secret values."""

    def __init__(self, store: SecretTables, keys: KeySource) -> None:
        self._store = store
        self._keys = keys

    @property
    def keys(self) -> KeySource:
        """The keyring source in use."""
        return self._keys

    async def put(
        self,
        *,
        tenant: str,
        name: str,
        value: str,
        description: str,
        now_us: int,
        idempotency_key: tuple[str, bytes] | None,
    ) -> IdempotentResult:
        """Seal `value` under the primary key and store it (a new version unless nothing changed)."""
        ring = self._keys.current()
        plain = value.encode()

        def same_value(stored: Sealed) -> bool:
            try:
                return hmac.compare_digest(open_sealed(ring, tenant, name, stored), plain)
            except SecretDecryptError:
                return False  # unreadable: the new value replaces it

        sealed = seal(ring, tenant, name, plain)
        return await self._store.put_secret(
            tenant=tenant,
            name=name,
            description=description,
            sealed=sealed,
            now_us=now_us,
            idempotency_key=idempotency_key,
            same_value=same_value,
        )

    async def reveal(self, tenant: str, names: Collection[str]) -> dict[str, str]:
        """Values of those of `names` the tenant has (nodes only). Raises SecretDecryptError."""
        values: dict[str, str] = {}
        for name in names:
            stored = await self._store.get_secret(tenant, name)
            if stored is not None:
                values[name] = self._open(tenant, name, stored.sealed).decode()
        return values

    def _open(self, tenant: str, name: str, sealed: Sealed) -> bytes:
        ring: Keyring = self._keys.current()
        if ring.get(sealed.key_id) is None:
            # Sealed by a key this process has not loaded yet: a rotation just happened.
            ring = self._keys.refresh()
        try:
            return open_sealed(ring, tenant, name, sealed)
        except SecretDecryptError as exc:
            raise SecretDecryptError(f"secret {name!r} of tenant {tenant!r}: {exc}") from None
