"""Workflow versions. Deleting hides every version but keeps the rows, so
executions that ran a version can still be resumed and inspected."""

from __future__ import annotations

from flowport.server.storage import idempotency
from flowport.server.storage.base import Deletion, IdempotentResult
from flowport.server.storage.tables import Connection, Tables, micros
from flowport.v1 import workflow_pb2

_CREATE = "flowport.v1.WorkflowService/CreateWorkflow"
_DELETE = "flowport.v1.WorkflowService/DeleteWorkflow"


class WorkflowTables(Tables):
    """Workflows, scoped by tenant, versioned by name."""

    async def create_workflow(
        self, tenant: str, workflow: workflow_pb2.Workflow, idempotency_key: tuple[str, bytes] | None
    ) -> IdempotentResult:
        """Store `workflow` as the next version of its name; `version` is set here."""
        now_us = micros(workflow.create_time)

        def op(conn: Connection) -> IdempotentResult:
            if idempotency_key is not None:
                first = idempotency.replayed(conn, tenant, _CREATE, *idempotency_key)
                if first is not None:
                    return IdempotentResult(first, replayed=True)
            (latest,) = conn.execute(
                "SELECT COALESCE(MAX(version), 0) FROM workflows WHERE tenant=? AND workflow_id=?",
                (tenant, workflow.workflow_id),
            ).fetchone()
            stored = workflow_pb2.Workflow()
            stored.CopyFrom(workflow)
            stored.version = latest + 1
            body = stored.SerializeToString()
            conn.execute(
                "INSERT INTO workflows VALUES (?, ?, ?, ?, ?, NULL, ?)",
                (tenant, stored.workflow_id, stored.version, stored.session_id, now_us, body),
            )
            if idempotency_key is not None:
                idempotency.remember(conn, tenant, _CREATE, idempotency_key, body, now_us=now_us)
            return IdempotentResult(body, replayed=False)

        return await self._write(op)

    async def get_workflow(
        self, tenant: str, workflow_id: str, version: int = 0, *, include_deleted: bool = False
    ) -> workflow_pb2.Workflow | None:
        """A version (0: the latest), or None; deleted ones only with `include_deleted`."""
        sql = "SELECT body FROM workflows WHERE tenant=? AND workflow_id=?"
        args: list[object] = [tenant, workflow_id]
        if not include_deleted:
            sql += " AND deleted_us IS NULL"
        if version:
            sql += " AND version=?"
            args.append(version)
        sql += " ORDER BY version DESC LIMIT 1"
        row = await self._lookup(sql, tuple(args))
        return None if row is None else workflow_pb2.Workflow.FromString(row[0])

    async def list_workflows(
        self, tenant: str, *, session_id: str, after: str | None, limit: int
    ) -> list[workflow_pb2.Workflow]:
        """The latest version of each workflow, by workflow_id, after `after`."""
        sql = (
            "SELECT body FROM workflows w WHERE tenant=? AND deleted_us IS NULL"
            " AND version = (SELECT MAX(version) FROM workflows v"
            " WHERE v.tenant=w.tenant AND v.workflow_id=w.workflow_id)"
        )
        args: list[object] = [tenant]
        if session_id:
            sql += " AND session_id=?"
            args.append(session_id)
        if after is not None:
            sql += " AND workflow_id > ?"
            args.append(after)
        sql += " ORDER BY workflow_id LIMIT ?"
        args.append(limit)
        rows = await self._read(lambda conn: conn.execute(sql, args).fetchall())
        return [workflow_pb2.Workflow.FromString(row[0]) for row in rows]

    async def delete_workflow(self, tenant: str, workflow_id: str, now_us: int, request_id: str = "") -> Deletion:
        """Hide every version; MISSING when there was none to hide."""
        key = workflow_id.encode()

        def op(conn: Connection) -> Deletion:
            if request_id and idempotency.replayed(conn, tenant, _DELETE, request_id, key) is not None:
                return Deletion.REPLAYED
            hidden = conn.execute(
                "UPDATE workflows SET deleted_us=? WHERE tenant=? AND workflow_id=? AND deleted_us IS NULL",
                (now_us, tenant, workflow_id),
            ).rowcount
            if hidden and request_id:
                idempotency.remember(conn, tenant, _DELETE, (request_id, key), b"", now_us=now_us)
            return Deletion.DELETED if hidden else Deletion.MISSING

        return await self._write(op)
