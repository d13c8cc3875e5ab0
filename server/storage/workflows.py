"""Workflow versions. Deleting hides every version (a caller without the admin
role: every version it may see) but keeps the rows, so executions that ran a
version can still be resumed and inspected."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from flowport.server.limits import MAX_PAGE_BYTES
from flowport.server.storage import idempotency, quotas
from flowport.server.storage.base import Deletion, IdempotentResult
from flowport.server.storage.sessions import session_creator
from flowport.server.storage.tables import Connection, Tables, micros, within_budget
from flowport.server.storage.workflow_cache import WorkflowCache, changes
from flowport.v1 import workflow_pb2

R = TypeVar("R")

_CREATE = "flowport.v1.WorkflowService/CreateWorkflow"
_DELETE = "flowport.v1.WorkflowService/DeleteWorkflow"
# A version another credential may see: created outside any session, or in one of its sessions.
_VISIBLE = "(session_id='' OR session_creator=?)"


class WorkflowTables(Tables):
    """Workflows, scoped by tenant, versioned by name."""

    # Rows kept in memory, on a store that other processes share (PostgreSQL): see workflow_cache.py.
    _workflow_cache: WorkflowCache | None = None

    async def create_workflow(
        self, tenant: str, workflow: workflow_pb2.Workflow, idempotency_key: tuple[str, bytes] | None
    ) -> IdempotentResult:
        """Store `workflow` as the next version of its name; `version` is set here."""
        now_us = micros(workflow.create_time)
        creator_sql, creator_args = session_creator(tenant, workflow.session_id)
        greatest = self._greatest()  # a fixed function name, not input

        def op(conn: Connection) -> IdempotentResult:
            if idempotency_key is not None:
                first = idempotency.replayed(conn, tenant, _CREATE, *idempotency_key)
                if first is not None:
                    return IdempotentResult(first, replayed=True)
            # Numbering goes on after versions the purge removed (workflow_numbers), which may
            # be above the versions still there (see purge_deleted_workflows).
            (latest,) = conn.execute(
                f"SELECT {greatest}(COALESCE(MAX(version), 0), COALESCE((SELECT last_version FROM"  # noqa: S608
                " workflow_numbers WHERE tenant=? AND workflow_id=?), 0)) FROM workflows WHERE tenant=?"
                " AND workflow_id=?",
                (tenant, workflow.workflow_id, tenant, workflow.workflow_id),
            ).fetchone()
            stored = workflow_pb2.Workflow()
            stored.CopyFrom(workflow)
            stored.version = latest + 1
            body = stored.SerializeToString()
            conn.execute(
                "INSERT INTO workflows (tenant, workflow_id, version, session_id, create_us, deleted_us, body,"  # noqa: S608
                f" session_creator) VALUES (?, ?, ?, ?, ?, NULL, ?, {creator_sql})",
                (tenant, stored.workflow_id, stored.version, stored.session_id, now_us, body, *creator_args),
            )
            quotas.check(conn, self.quotas, tenant, quotas.WORKFLOW_VERSIONS)
            if idempotency_key is not None:
                idempotency.remember(conn, tenant, _CREATE, idempotency_key, body, now_us=now_us)
            return IdempotentResult(body, replayed=False)

        # A replay waits too: its first call may have committed and then failed to answer (the
        # store's connection lost), so the change may not have been seen by every process yet.
        return await self._write_change(tenant, op, lambda result: True)

    async def get_workflow(
        self,
        tenant: str,
        workflow_id: str,
        version: int = 0,
        *,
        include_deleted: bool = False,
        session_creator: str | None = None,
    ) -> workflow_pb2.Workflow | None:
        """A version (0: the latest), or None; deleted ones only with `include_deleted`; with
        `session_creator`, only versions outside sessions or in that credential's."""
        sql = "SELECT body FROM workflows WHERE tenant=? AND workflow_id=?"
        args: list[object] = [tenant, workflow_id]
        if not include_deleted:
            sql += " AND deleted_us IS NULL"
        if session_creator is not None:
            sql += f" AND {_VISIBLE}"
            args.append(session_creator)
        if version:
            sql += " AND version=?"
            args.append(version)
        sql += " ORDER BY version DESC LIMIT 1"
        cache = None if include_deleted else self._workflow_cache
        if cache is None:
            row = await self._lookup(sql, tuple(args))
            return None if row is None else workflow_pb2.Workflow.FromString(row[0])
        key = (tenant, workflow_id, version, session_creator)
        body = cache.get(key)
        if body is None:
            tag = cache.tag()
            row = await self._lookup(sql, tuple(args))
            if row is None:
                return None
            body = bytes(row[0])
            cache.keep(key, body, tag)
        return workflow_pb2.Workflow.FromString(body)

    async def list_workflows(
        self, tenant: str, *, session_id: str, after: str | None, limit: int, session_creator: str | None = None
    ) -> list[workflow_pb2.Workflow]:
        """The latest version of each workflow, by workflow_id, after `after`; with `session_creator`,
        the latest of the versions outside sessions or in that credential's."""
        where, args = _listed(tenant, session_id, session_creator)
        if after is not None:
            where += " AND w.workflow_id > ?"
            args.append(after)
        sql = within_budget("workflows", "w", ("tenant", "workflow_id", "version"), (("workflow_id", "ASC"),), where)
        args += [limit, MAX_PAGE_BYTES]
        rows = await self._read(lambda conn: conn.execute(sql, args).fetchall())
        return [workflow_pb2.Workflow.FromString(row[0]) for row in rows]

    async def count_listed_workflows(self, tenant: str, *, session_id: str, session_creator: str | None = None) -> int:
        """How many workflows list_workflows' pages hold in all."""
        where, args = _listed(tenant, session_id, session_creator)
        sql = f"SELECT count(*) FROM workflows w WHERE {where}"  # noqa: S608 - fixed fragments
        row = await self._read(lambda conn: conn.execute(sql, args).fetchone())
        return int(row[0])

    async def delete_workflow(
        self, tenant: str, workflow_id: str, now_us: int, request_id: str = "", session_creator: str | None = None
    ) -> Deletion:
        """Hide every version (with `session_creator`, every version it may see); MISSING when there
        was none to hide."""
        key = workflow_id.encode()
        sql = "UPDATE workflows SET deleted_us=? WHERE tenant=? AND workflow_id=? AND deleted_us IS NULL"
        args: tuple[object, ...] = (now_us, tenant, workflow_id)
        if session_creator is not None:
            sql, args = f"{sql} AND {_VISIBLE}", (*args, session_creator)

        def op(conn: Connection) -> Deletion:
            if request_id and idempotency.replayed(conn, tenant, _DELETE, request_id, key) is not None:
                # Only for a caller that may see a version of it: to another, the workflow is missing.
                if session_creator is None or _any_visible(conn, tenant, workflow_id, session_creator):
                    return Deletion.REPLAYED
                return Deletion.MISSING
            hidden = conn.execute(sql, args).rowcount
            if hidden and request_id:
                idempotency.remember(conn, tenant, _DELETE, (request_id, key), b"", now_us=now_us)
            return Deletion.DELETED if hidden else Deletion.MISSING

        return await self._write_change(tenant, op, lambda deletion: deletion is not Deletion.MISSING)

    async def _write_change(self, tenant: str, op: Callable[[Connection], R], changed: Callable[[R], bool]) -> R:
        """Write a create or delete of `tenant`'s workflows; on a store whose processes keep
        workflows, answer once every process has dropped its copies (workflow_cache.py).
        `changed`: whether the op's result says it changed a row, now or in the call it replays (a
        missing workflow changes none)."""
        cache = self._workflow_cache
        if cache is None:
            return await self._write(op)

        def run(conn: Connection) -> tuple[R, int | None]:
            # The value comes with the result: a batch that fails runs again op by op, and only
            # its last run counts.
            result = op(conn)
            return result, changes(conn) if changed(result) else None

        result, seq = await self._write(run)
        if seq is not None:
            await cache.changed(seq, tenant)
        return result

    async def purge_deleted_workflows(self, deleted_before_us: int) -> int:
        """Remove versions deleted before `deleted_before_us`, except those of a workflow with an
        execution not ended yet (taking it over needs its version); returns how many. The highest
        number removed of each workflow is kept in workflow_numbers, where the next version goes on."""
        # A delete through a session's credential hides only the versions it may see, so a version
        # removed here may be above versions still there: create_workflow numbers after both.
        purgeable = (
            "deleted_us IS NOT NULL AND deleted_us<? AND NOT EXISTS (SELECT 1 FROM executions e"
            " WHERE e.state IN (1, 2) AND e.tenant=workflows.tenant AND e.workflow_id=workflows.workflow_id)"
        )
        greatest = self._greatest()  # a fixed function name, not input
        remember = (
            "INSERT INTO workflow_numbers (tenant, workflow_id, last_version)"  # noqa: S608 - fixed fragments
            f" SELECT tenant, workflow_id, MAX(version) FROM workflows WHERE {purgeable}"
            " GROUP BY tenant, workflow_id ON CONFLICT (tenant, workflow_id) DO UPDATE SET"
            f" last_version={greatest}(workflow_numbers.last_version, excluded.last_version)"
        )

        def op(conn: Connection) -> int:
            conn.execute(remember, (deleted_before_us,))
            return int(conn.execute(f"DELETE FROM workflows WHERE {purgeable}", (deleted_before_us,)).rowcount)  # noqa: S608

        return await self._write(op)


def _any_visible(conn: Connection, tenant: str, workflow_id: str, session_creator: str) -> bool:
    """Whether `session_creator` may see any version of the workflow, deleted ones included."""
    sql = f"SELECT 1 FROM workflows WHERE tenant=? AND workflow_id=? AND {_VISIBLE} LIMIT 1"  # noqa: S608 - fixed
    return conn.execute(sql, (tenant, workflow_id, session_creator)).fetchone() is not None


def _listed(tenant: str, session_id: str, session_creator: str | None) -> tuple[str, list[object]]:
    """The WHERE clause of list_workflows (over `workflows w`) without its cursor: the latest
    version each caller may see, of every workflow not deleted."""
    visible = ""
    args: list[object] = [tenant]
    if session_creator is not None:
        visible = " AND (v.session_id='' OR v.session_creator=?)"
        args.append(session_creator)
    where = (
        "tenant=? AND deleted_us IS NULL"  # noqa: S608 - fixed fragments
        " AND version = (SELECT MAX(version) FROM workflows v"
        f" WHERE v.tenant=w.tenant AND v.workflow_id=w.workflow_id{visible})"
    )
    if session_id:
        where += " AND session_id=?"
        args.append(session_id)
    return where, args
