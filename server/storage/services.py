"""Service registry rows: the whole RegisteredService, with provider and TTL as columns.

A registration whose TTL ran out is treated as gone by every read; the rows
themselves are removed when the same id registers again or is deregistered.
"""

from __future__ import annotations

import asyncio

from flowport.server.storage import idempotency, quotas
from flowport.server.storage.base import IdempotentResult
from flowport.server.storage.tables import Connection, Tables
from flowport.v1 import registry_pb2

# Registrations the health sweep parses between two yields to the event loop.
PARSED_PER_TURN = 256
_REGISTER = "flowport.v1.ServiceRegistryService/RegisterService"
_DEREGISTER = "flowport.v1.ServiceRegistryService/DeregisterService"


def _expire_us(service: registry_pb2.RegisteredService) -> int:
    return service.expire_time.ToMicroseconds() if service.HasField("expire_time") else 0


class ServiceTables(Tables):
    """Registered services, keyed by (tenant, service_id)."""

    async def register_service(
        self,
        tenant: str,
        service: registry_pb2.RegisteredService,
        idempotency_key: tuple[str, bytes] | None,
        now_us: int,
    ) -> IdempotentResult:
        """Insert or replace; keeps the first create_time and the last health check of a live registration."""

        def op(conn: Connection) -> IdempotentResult:
            if idempotency_key is not None:
                first = idempotency.replayed(conn, tenant, _REGISTER, *idempotency_key)
                if first is not None:
                    return IdempotentResult(first, replayed=True)
            row = conn.execute(
                "SELECT body FROM services WHERE tenant=? AND service_id=? AND (expire_us=0 OR expire_us>?)",
                (tenant, service.service_id, now_us),
            ).fetchone()
            if row is not None:
                before = registry_pb2.RegisteredService.FromString(row[0])
                service.create_time.CopyFrom(before.create_time)
                if before.endpoint == service.endpoint and before.health_path == service.health_path:
                    service.status, service.latency_ms = before.status, before.latency_ms
                    service.check_message = before.check_message
                    if before.HasField("check_time"):
                        service.check_time.CopyFrom(before.check_time)
            body = service.SerializeToString()
            conn.execute(
                "INSERT INTO services VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, service_id) DO UPDATE SET "
                "provider=excluded.provider, expire_us=excluded.expire_us, create_us=excluded.create_us, "
                "body=excluded.body",
                (
                    tenant,
                    service.service_id,
                    service.provider,
                    _expire_us(service),
                    service.create_time.ToMicroseconds(),
                    body,
                ),
            )
            quotas.check(conn, self.quotas, tenant, quotas.SERVICES)
            if idempotency_key is not None:
                idempotency.remember(conn, tenant, _REGISTER, idempotency_key, body, now_us=now_us)
            return IdempotentResult(body, replayed=False)

        return await self._write(op)

    async def get_service(self, tenant: str, service_id: str, now_us: int) -> registry_pb2.RegisteredService | None:
        row = await self._lookup(
            "SELECT body FROM services WHERE tenant=? AND service_id=? AND (expire_us=0 OR expire_us>?)",
            (tenant, service_id, now_us),
        )
        return None if row is None else registry_pb2.RegisteredService.FromString(row[0])

    async def list_services(
        self, tenant: str, *, provider: str, after: str | None, limit: int, now_us: int
    ) -> list[registry_pb2.RegisteredService]:
        """Live registrations by id, strictly after `after` (capability and zone filters are the caller's)."""
        # Whole pages of `limit` (callers read on until a short one): a registration is small
        # (its metadata at most 16 KiB, api/service_registry.py).
        sql = "SELECT body FROM services WHERE tenant=? AND (expire_us=0 OR expire_us>?)"
        args: list[object] = [tenant, now_us]
        if provider:
            sql += " AND provider=?"
            args.append(provider)
        if after is not None:
            sql += " AND service_id > ?"
            args.append(after)
        sql += " ORDER BY service_id LIMIT ?"
        args.append(limit)
        rows = await self._read(lambda conn: conn.execute(sql, args).fetchall())
        return [registry_pb2.RegisteredService.FromString(r[0]) for r in rows]

    async def save_service(self, tenant: str, service: registry_pb2.RegisteredService, now_us: int) -> bool:
        """Rewrite a live registration (a heartbeat or a health check); False when it is gone."""
        sql = "UPDATE services SET expire_us=?, body=? WHERE tenant=? AND service_id=? AND (expire_us=0 OR expire_us>?)"
        args = (_expire_us(service), service.SerializeToString(), tenant, service.service_id, now_us)
        return bool(await self._write(lambda conn: conn.execute(sql, args).rowcount))

    async def services_to_check(self, now_us: int) -> list[tuple[str, registry_pb2.RegisteredService]]:
        """(tenant, registration) of every live registration, of every tenant, without its metadata.

        Parsed PARSED_PER_TURN at a time, other calls running in between: a tenant's 10,000
        registrations of 16 KiB of metadata each took the event loop about a second at every sweep."""
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT tenant, body FROM services WHERE (expire_us=0 OR expire_us>?) ORDER BY tenant, service_id",
                (now_us,),
            ).fetchall()
        )
        found: list[tuple[str, registry_pb2.RegisteredService]] = []
        for start in range(0, len(rows), PARSED_PER_TURN):
            if start:
                await asyncio.sleep(0)
            for tenant, body in rows[start : start + PARSED_PER_TURN]:
                service = registry_pb2.RegisteredService.FromString(body)
                service.ClearField("metadata")  # not checked; held for the whole sweep otherwise
                found.append((str(tenant), service))
        return found

    async def record_check(
        self, tenant: str, service_id: str, status: int, latency_ms: float, now_us: int, *, message: str = ""
    ) -> bool:
        """Store a health check's outcome on a live registration (read and rewritten in one write: a
        heartbeat meanwhile keeps its TTL). False when it is gone."""

        def op(conn: Connection) -> bool:
            row = conn.execute(
                "SELECT body FROM services WHERE tenant=? AND service_id=? AND (expire_us=0 OR expire_us>?)",
                (tenant, service_id, now_us),
            ).fetchone()
            if row is None:
                return False
            service = registry_pb2.RegisteredService.FromString(row[0])
            service.status = status  # type: ignore[assignment]
            service.latency_ms = latency_ms
            service.check_message = message
            service.check_time.FromMicroseconds(now_us)
            conn.execute(
                "UPDATE services SET body=? WHERE tenant=? AND service_id=?",
                (service.SerializeToString(), tenant, service_id),
            )
            return True

        return await self._write(op)

    async def purge_expired_services(self, now_us: int) -> int:
        """Remove registrations whose TTL ran out (already invisible); returns how many."""
        sql = "DELETE FROM services WHERE expire_us<>0 AND expire_us<=?"
        return await self._write(lambda conn: conn.execute(sql, (now_us,)).rowcount)

    async def deregister_service(self, tenant: str, service_id: str, now_us: int, request_id: str = "") -> bool:
        """Delete; False when there was no live registration. A repeated `request_id` of a delete is True."""

        def op(conn: Connection) -> bool:
            def delete() -> bool:
                live = conn.execute(
                    "DELETE FROM services WHERE tenant=? AND service_id=? AND (expire_us=0 OR expire_us>?)",
                    (tenant, service_id, now_us),
                ).rowcount
                # An expired row goes too, but counts as not found.
                conn.execute("DELETE FROM services WHERE tenant=? AND service_id=?", (tenant, service_id))
                return bool(live)

            return idempotency.delete_once(
                conn, tenant, _DEREGISTER, request_id, key=service_id.encode(), delete=delete, now_us=now_us
            )

        return await self._write(op)
