"""Resource rows: the whole Resource message per (tenant, name).

Creation is conditional (ALREADY_EXISTS is decided inside the write), an
update keeps `create_time`, and resources from the server's settings are
written with `put_resource` at every start.
"""

from __future__ import annotations

from flowport.server.storage import idempotency, quotas
from flowport.server.storage.base import IdempotentResult
from flowport.server.storage.tables import Connection, Tables
from flowport.v1 import resource_pb2

_CREATE = "flowport.v1.ResourceService/CreateResource"
_DELETE = "flowport.v1.ResourceService/DeleteResource"
_SELECT = "SELECT body FROM resources WHERE tenant=? AND name=?"


class ResourceExists(Exception):
    """CreateResource for a name the tenant already has."""


class ResourceTables(Tables):
    """Shared resources, keyed by (tenant, name)."""

    async def create_resource(
        self, tenant: str, resource: resource_pb2.Resource, idempotency_key: tuple[str, bytes] | None, now_us: int
    ) -> IdempotentResult:
        """Insert; raises ResourceExists when the name is taken (a replayed request id answers first)."""

        def op(conn: Connection) -> IdempotentResult:
            if idempotency_key is not None:
                first = idempotency.replayed(conn, tenant, _CREATE, *idempotency_key)
                if first is not None:
                    return IdempotentResult(first, replayed=True)
            taken = conn.execute(
                "SELECT 1 FROM resources WHERE tenant=? AND name=?", (tenant, resource.name)
            ).fetchone()
            if taken is not None:
                raise ResourceExists(resource.name)
            body = resource.SerializeToString()
            conn.execute("INSERT INTO resources VALUES (?, ?, ?, ?)", (tenant, resource.name, now_us, body))
            quotas.check(conn, self.quotas, tenant, quotas.RESOURCES)
            if idempotency_key is not None:
                idempotency.remember(conn, tenant, _CREATE, idempotency_key, body, now_us=now_us)
            return IdempotentResult(body, replayed=False)

        return await self._write(op)

    async def put_resource(self, tenant: str, resource: resource_pb2.Resource, now_us: int) -> resource_pb2.Resource:
        """Insert or replace (resources from settings); keeps the first create_time."""

        def op(conn: Connection) -> resource_pb2.Resource:
            row = conn.execute(
                "SELECT body FROM resources WHERE tenant=? AND name=?", (tenant, resource.name)
            ).fetchone()
            if row is not None:
                resource.create_time.CopyFrom(resource_pb2.Resource.FromString(row[0]).create_time)
            conn.execute(
                "INSERT INTO resources VALUES (?, ?, ?, ?) ON CONFLICT (tenant, name) DO UPDATE SET "
                "update_us=excluded.update_us, body=excluded.body",
                (tenant, resource.name, now_us, resource.SerializeToString()),
            )
            return resource  # the operator's (the resources file): not held to the tenant's cap

        return await self._write(op)

    async def replace_resource(
        self, tenant: str, resource: resource_pb2.Resource, now_us: int
    ) -> resource_pb2.Resource | None:
        """Replace an existing resource, keeping its create_time; None when there is none."""

        def op(conn: Connection) -> resource_pb2.Resource | None:
            row = conn.execute(
                "SELECT body FROM resources WHERE tenant=? AND name=?", (tenant, resource.name)
            ).fetchone()
            if row is None:
                return None
            resource.create_time.CopyFrom(resource_pb2.Resource.FromString(row[0]).create_time)
            conn.execute(
                "UPDATE resources SET update_us=?, body=? WHERE tenant=? AND name=?",
                (now_us, resource.SerializeToString(), tenant, resource.name),
            )
            return resource

        return await self._write(op)

    async def get_resource(self, tenant: str, name: str) -> resource_pb2.Resource | None:
        row = await self._lookup("SELECT body FROM resources WHERE tenant=? AND name=?", (tenant, name))
        return None if row is None else resource_pb2.Resource.FromString(row[0])

    async def list_resources(self, tenant: str, *, after: str | None, limit: int) -> list[resource_pb2.Resource]:
        """Resources by name, strictly after `after`."""
        sql = "SELECT body FROM resources WHERE tenant=?"
        args: list[object] = [tenant]
        if after is not None:
            sql += " AND name > ?"
            args.append(after)
        sql += " ORDER BY name LIMIT ?"
        args.append(limit)
        rows = await self._read(lambda conn: conn.execute(sql, args).fetchall())
        return [resource_pb2.Resource.FromString(r[0]) for r in rows]

    async def delete_resource(self, tenant: str, name: str, now_us: int, request_id: str = "") -> bool:
        """Delete; False when there was none. A repeated `request_id` of a delete is True."""

        def op(conn: Connection) -> bool:
            def delete() -> bool:
                return bool(conn.execute("DELETE FROM resources WHERE tenant=? AND name=?", (tenant, name)).rowcount)

            return idempotency.delete_once(
                conn, tenant, _DELETE, request_id, key=name.encode(), delete=delete, now_us=now_us
            )

        return await self._write(op)
