"""API key rows: descriptions and hashes, never keys."""

from __future__ import annotations

from flowport.server.storage import idempotency, quotas
from flowport.server.storage.base import IdempotentResult
from flowport.server.storage.tables import Connection, Tables, micros
from flowport.v1 import apikey_pb2

_CREATE = "flowport.v1.ApiKeyService/CreateApiKey"


class ApiKeyTables(Tables):
    """API keys, looked up by the hash of the key."""

    async def create_api_key(
        self,
        key: apikey_pb2.ApiKey,
        key_hash: bytes,
        idempotency_key: tuple[str, bytes] | None,
        caller_tenant: str,
        *,
        capped: bool = True,
    ) -> IdempotentResult:
        """Store a key; a replayed request returns the first key's description. `capped`: counted
        toward the tenant's objects (not the operator's keys, which the gateway's start may need)."""
        body = key.SerializeToString()
        now_us = micros(key.create_time)
        expire = micros(key.expire_time) if key.HasField("expire_time") else None

        def op(conn: Connection) -> IdempotentResult:
            if idempotency_key is not None:
                first = idempotency.replayed(conn, caller_tenant, _CREATE, *idempotency_key)
                if first is not None:
                    return IdempotentResult(first, replayed=True)
                idempotency.remember(conn, caller_tenant, _CREATE, idempotency_key, body, now_us=now_us)
            conn.execute(
                "INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, NULL, ?)",
                (key.key_id, key.tenant, key_hash, now_us, expire, body),
            )
            if capped:  # a tenant's admin is a customer: its keys count toward the tenant's objects
                quotas.check(conn, self.quotas, key.tenant, quotas.API_KEYS)
            return IdempotentResult(body, replayed=False)

        return await self._write(op)

    async def api_key_by_hash(self, key_hash: bytes) -> tuple[apikey_pb2.ApiKey, int | None, int | None] | None:
        """(description, expire_us, revoke_us) of the key with this hash, or None."""
        row = await self._lookup("SELECT body, expire_us, revoke_us FROM api_keys WHERE key_hash=?", (key_hash,))
        return None if row is None else (apikey_pb2.ApiKey.FromString(row[0]), row[1], row[2])

    async def get_api_key(self, key_id: str, tenant: str | None) -> apikey_pb2.ApiKey | None:
        """A key's description; `tenant` None searches every tenant (admins)."""
        sql = "SELECT body FROM api_keys WHERE key_id=?"
        args: list[object] = [key_id]
        if tenant is not None:
            sql += " AND tenant=?"
            args.append(tenant)
        row = await self._lookup(sql, tuple(args))
        return None if row is None else apikey_pb2.ApiKey.FromString(row[0])

    async def list_api_keys(
        self, *, tenant: str | None, after: tuple[int, str] | None, limit: int
    ) -> list[apikey_pb2.ApiKey]:
        """Keys newest first, of one tenant or (None) all."""
        sql = "SELECT body FROM api_keys WHERE 1=1"
        args: list[object] = []
        if tenant is not None:
            sql += " AND tenant=?"
            args.append(tenant)
        if after is not None:
            sql += " AND (create_us, key_id) < (?, ?)"
            args.extend(after)
        sql += " ORDER BY create_us DESC, key_id DESC LIMIT ?"
        args.append(limit)
        rows = await self._read(lambda conn: conn.execute(sql, args).fetchall())
        return [apikey_pb2.ApiKey.FromString(r[0]) for r in rows]

    async def revoke_api_key(self, key_id: str, tenant: str | None, now_us: int) -> apikey_pb2.ApiKey | None:
        """Mark revoked (once); returns the description, or None when absent."""

        def op(conn: Connection) -> apikey_pb2.ApiKey | None:
            sql, args = "SELECT body, revoke_us FROM api_keys WHERE key_id=?", [key_id]
            if tenant is not None:
                sql += " AND tenant=?"
                args.append(tenant)
            row = conn.execute(sql, args).fetchone()
            if row is None:
                return None
            key = apikey_pb2.ApiKey.FromString(row[0])
            if row[1] is None:
                key.revoke_time.FromMicroseconds(now_us)
                conn.execute(
                    "UPDATE api_keys SET revoke_us=?, body=? WHERE key_id=?", (now_us, key.SerializeToString(), key_id)
                )
            return key

        return await self._write(op)

    async def count_api_keys(self) -> int:
        """Keys of every tenant, revoked ones included."""
        row = await self._lookup("SELECT count(*) FROM api_keys", ())
        assert row is not None
        return int(row[0])

    async def purge_ended_api_keys(self, ended_before_us: int) -> int:
        """Remove keys revoked or expired before `ended_before_us` (until then a call with one is told
        it is revoked or expired, and GetApiKey shows it); returns how many went."""

        def op(conn: Connection) -> int:
            cursor = conn.execute(
                "DELETE FROM api_keys WHERE revoke_us < ? OR expire_us < ?", (ended_before_us, ended_before_us)
            )
            return max(cursor.rowcount, 0)

        return await self._write(op)
