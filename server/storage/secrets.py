"""Secret rows: descriptions in the clear, values only sealed (see server/secrets/cipher.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from flowport.server.secrets.cipher import Sealed
from flowport.server.storage import idempotency, quotas
from flowport.server.storage.base import IdempotentResult
from flowport.server.storage.tables import Connection, Tables
from flowport.v1 import secret_pb2

_PUT = "flowport.v1.SecretService/PutSecret"
_DELETE = "flowport.v1.SecretService/DeleteSecret"


@dataclass(frozen=True)
class StoredSecret:
    """A row: the description, and the sealed value with the id of the key that sealed it."""

    secret: secret_pb2.Secret
    sealed: Sealed


@dataclass(frozen=True)
class Reseal:
    """Replace one row's sealed value, only if it still holds `old` (a put since then wins)."""

    tenant: str
    name: str
    old: bytes
    new: Sealed


def _secret(row: Sequence[Any]) -> secret_pb2.Secret:
    tenant, name, description, version, create_us, update_us = row[:6]
    secret = secret_pb2.Secret(tenant=tenant, name=name, description=description, version=version)
    secret.create_time.FromMicroseconds(create_us)
    secret.update_time.FromMicroseconds(update_us)
    return secret


class SecretTables(Tables):
    """Secrets per tenant, keyed by name."""

    async def put_secret(
        self,
        *,
        tenant: str,
        name: str,
        description: str,
        sealed: Sealed,
        now_us: int,
        idempotency_key: tuple[str, bytes] | None,
        same_value: Callable[[Sealed], bool],
    ) -> IdempotentResult:
        """Create or replace (version + 1); `response` is the serialized Secret.

        When the row already has this description and `same_value` says its
        sealed value holds the new value, nothing changes: putting the same
        secret twice is not a new version.
        """

        def op(conn: Connection) -> IdempotentResult:
            if idempotency_key is not None:
                first = idempotency.replayed(conn, tenant, _PUT, *idempotency_key)
                if first is not None:
                    return IdempotentResult(first, replayed=True)
            row = conn.execute(
                "SELECT tenant, name, description, version, create_us, update_us, key_id, sealed "
                "FROM secrets WHERE tenant=? AND name=?",
                (tenant, name),
            ).fetchone()
            new_name = row is None
            grown = row is not None and len(sealed.blob) > len(bytes(row[7]))  # the bytes counted: `sealed`
            if row is None or row[2] != description or not same_value(Sealed(row[6], bytes(row[7]))):
                row = conn.execute(
                    "INSERT INTO secrets VALUES (?, ?, ?, 1, ?, ?, ?, ?) "
                    "ON CONFLICT (tenant, name) DO UPDATE SET description=excluded.description, "
                    "version=secrets.version + 1, update_us=excluded.update_us, key_id=excluded.key_id, "
                    "sealed=excluded.sealed RETURNING tenant, name, description, version, create_us, update_us",
                    (tenant, name, description, now_us, now_us, sealed.key_id, sealed.blob),
                ).fetchone()
            if new_name:
                quotas.check(conn, self.quotas, tenant, quotas.SECRETS)
            elif grown:
                # A rewrite adds no secret, but a larger value takes more of the tenant's bytes.
                quotas.check(conn, self.quotas, tenant, quotas.SECRETS, rows=False)
            body = _secret(row).SerializeToString()
            if idempotency_key is not None:
                idempotency.remember(conn, tenant, _PUT, idempotency_key, body, now_us=now_us)
            return IdempotentResult(body, replayed=False)

        return await self._write(op)

    async def get_secret(self, tenant: str, name: str) -> StoredSecret | None:
        """The row, or None when the tenant has no secret by that name."""
        row = await self._lookup(
            "SELECT tenant, name, description, version, create_us, update_us, key_id, sealed "
            "FROM secrets WHERE tenant=? AND name=?",
            (tenant, name),
        )
        return None if row is None else StoredSecret(_secret(row), Sealed(row[6], bytes(row[7])))

    async def list_secrets(self, tenant: str, *, after: str | None, limit: int) -> list[secret_pb2.Secret]:
        """Descriptions ordered by name, strictly after `after`."""
        sql = "SELECT tenant, name, description, version, create_us, update_us FROM secrets WHERE tenant=?"
        args: list[object] = [tenant]
        if after is not None:
            sql += " AND name > ?"
            args.append(after)
        sql += " ORDER BY name LIMIT ?"
        args.append(limit)
        rows = await self._read(lambda conn: conn.execute(sql, args).fetchall())
        return [_secret(r) for r in rows]

    async def delete_secret(self, tenant: str, name: str, now_us: int, request_id: str = "") -> bool:
        """Delete; False when there was none. A repeated `request_id` of a delete that succeeded is True."""

        def op(conn: Connection) -> bool:
            def delete() -> bool:
                return bool(conn.execute("DELETE FROM secrets WHERE tenant=? AND name=?", (tenant, name)).rowcount)

            return idempotency.delete_once(
                conn, tenant, _DELETE, request_id, key=name.encode(), delete=delete, now_us=now_us
            )

        return await self._write(op)

    # -- key rotation -----------------------------------------------------------

    async def secrets_sealed_without(self, key_id: str, limit: int) -> list[StoredSecret]:
        """Up to `limit` rows sealed with any key but `key_id`, of every tenant."""
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT tenant, name, description, version, create_us, update_us, key_id, sealed "
                "FROM secrets WHERE key_id != ? ORDER BY tenant, name LIMIT ?",
                (key_id, limit),
            ).fetchall()
        )
        return [StoredSecret(_secret(r), Sealed(r[6], bytes(r[7]))) for r in rows]

    async def reseal_secrets(self, changes: Sequence[Reseal]) -> int:
        """Apply `changes` in one transaction; the number of rows replaced.

        Version and update time stay: the value did not change.
        """

        def op(conn: Connection) -> int:
            done = 0
            for change in changes:
                done += conn.execute(
                    "UPDATE secrets SET key_id=?, sealed=? WHERE tenant=? AND name=? AND sealed=?",
                    (change.new.key_id, change.new.blob, change.tenant, change.name, change.old),
                ).rowcount
            return done

        return await self._write(op)

    async def count_secrets_by_key(self) -> dict[str, int]:
        """How many values each key id seals."""
        rows = await self._read(
            lambda conn: conn.execute("SELECT key_id, count(*) FROM secrets GROUP BY key_id").fetchall()
        )
        return {str(k): int(n) for k, n in rows}
