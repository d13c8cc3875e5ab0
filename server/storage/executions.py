"""Execution rows: the whole Execution message, rewritten at each change."""

from __future__ import annotations

import logging
from collections.abc import Collection

from google.protobuf.message import DecodeError
from google.rpc import code_pb2, status_pb2

from flowport.server.limits import MAX_PAGE_BYTES
from flowport.server.storage import idempotency
from flowport.server.storage.base import ExpiredExecution, IdempotencyConflict, IdempotentResult
from flowport.server.storage.sessions import session_creator
from flowport.server.storage.tables import Connection, Tables, micros, within_budget
from flowport.v1 import execution_pb2

log = logging.getLogger(__name__)

_CREATE = "flowport.v1.ExecutionService/CreateExecution"
UNFINISHED = (execution_pb2.Execution.STATE_PENDING, execution_pb2.Execution.STATE_RUNNING)


def _readable(
    conn: Connection, tenant: str, execution_id: str, workflow_id: str, body: bytes
) -> execution_pb2.Execution | None:
    """The stored execution, or None when its body cannot be read. Such a row is set aside: its
    body becomes a FAILED execution saying so, which every reader can read and no process claims
    again (one unreadable row must not stop every takeover, nor a restart)."""
    try:
        return execution_pb2.Execution.FromString(body)
    except DecodeError as exc:
        log.error("execution %s of tenant %s cannot be read (%s): set aside as failed", execution_id, tenant, exc)
        failed = execution_pb2.Execution(
            execution_id=execution_id,
            tenant=tenant,
            workflow_id=workflow_id,
            state=execution_pb2.Execution.STATE_FAILED,
            error=status_pb2.Status(
                code=code_pb2.INTERNAL,
                message="this execution's stored record could not be read, so it was set aside as failed",
            ),
        )
        failed.end_time.GetCurrentTime()
        conn.execute(
            "UPDATE executions SET state=?, owner='', body=? WHERE tenant=? AND execution_id=?",
            (failed.state, failed.SerializeToString(), tenant, execution_id),
        )
        return None


class ExecutionTables(Tables):
    """Executions, scoped by tenant."""

    async def insert_execution(
        self,
        tenant: str,
        execution: execution_pb2.Execution,
        idempotency_key: tuple[str, bytes] | None,
        *,
        owner: str = "",
        lease_until_us: int = 0,
    ) -> IdempotentResult:
        """Record a new execution, leased to `owner`; a replayed key returns the first one's id as `response`."""
        body = execution.SerializeToString()
        now_us = micros(execution.create_time)
        creator_sql, creator_args = session_creator(tenant, execution.session_id)

        def op(conn: Connection) -> IdempotentResult:
            if idempotency_key is not None:
                first = idempotency.replayed(conn, tenant, _CREATE, *idempotency_key)
                if first is not None:
                    return IdempotentResult(first, replayed=True)
                idempotency.remember(
                    conn, tenant, _CREATE, idempotency_key, execution.execution_id.encode(), now_us=now_us
                )
            conn.execute(
                "INSERT INTO executions (tenant, execution_id, workflow_id, session_id, state, create_us, body,"  # noqa: S608
                f" owner, lease_until_us, session_creator) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, {creator_sql})",
                (
                    tenant,
                    execution.execution_id,
                    execution.workflow_id,
                    execution.session_id,
                    execution.state,
                    now_us,
                    body,
                    owner,
                    lease_until_us,
                    *creator_args,
                ),
            )
            return IdempotentResult(execution.execution_id.encode(), replayed=False)

        return await self._write(op)

    async def save_execution(self, execution: execution_pb2.Execution, *, wait: bool = True) -> None:
        """Write the execution's current state (grouped with concurrent writes).

        With `wait=False` the write is queued and the call returns at once; a
        later awaited write commits it (writes commit in order).
        """
        body = execution.SerializeToString()
        args = (execution.state, body, execution.execution_id)

        def op(conn: Connection) -> None:
            conn.execute("UPDATE executions SET state=?, body=? WHERE execution_id=?", args)

        if wait:
            await self._write(op)
        else:
            self._write_soon(op)

    async def save_execution_end(self, execution: execution_pb2.Execution, owner: str) -> bool:
        """Write an execution's end over its record only while that is unfinished and `owner`'s (a
        late write must not undo a process that took it over); whether it did."""
        body = execution.SerializeToString()
        args = (execution.state, body, execution.execution_id, owner, *UNFINISHED)

        def op(conn: Connection) -> bool:
            sql = "UPDATE executions SET state=?, body=? WHERE execution_id=? AND owner=? AND state IN (?, ?)"
            return bool(conn.execute(sql, args).rowcount)

        return await self._write(op)

    async def replayed_execution(self, tenant: str, idempotency_key: tuple[str, bytes]) -> str | None:
        """The id of the execution a CreateExecution key already made, None if none.

        IdempotencyConflict when the key was used with another request. Read
        before admission control, so a retry is answered even when the server
        is full.
        """
        request_id, request_hash = idempotency_key
        row = await self._lookup(
            "SELECT request_hash, response FROM idempotency WHERE tenant=? AND method=? AND request_id=?",
            (tenant, _CREATE, request_id),
        )
        if row is None:
            return None
        if bytes(row[0]) != request_hash:
            raise IdempotencyConflict(request_id)
        return bytes(row[1]).decode()

    async def execution_lease(self, tenant: str, execution_id: str) -> tuple[str, int] | None:
        """(owner, lease_until_us) of an execution; None when absent or another tenant's."""
        row = await self._lookup(
            "SELECT owner, lease_until_us FROM executions WHERE execution_id=? AND tenant=?", (execution_id, tenant)
        )
        return None if row is None else (str(row[0]), int(row[1]))

    async def get_execution(self, tenant: str, execution_id: str) -> execution_pb2.Execution | None:
        row = await self._lookup(
            "SELECT body FROM executions WHERE execution_id=? AND tenant=?", (execution_id, tenant)
        )
        return None if row is None else execution_pb2.Execution.FromString(row[0])

    async def list_executions(
        self,
        tenant: str,
        *,
        workflow_id: str,
        session_id: str,
        state: int,
        after: tuple[int, str] | None,
        limit: int,
        session_creator: str | None = None,
    ) -> list[execution_pb2.Execution]:
        """Newest first, strictly after the (create_us, execution_id) cursor; with `session_creator`,
        only executions outside sessions or in that credential's."""
        where, args = _listed(tenant, workflow_id, session_id, state, session_creator)
        if after is not None:
            where += " AND (create_us, execution_id) < (?, ?)"
            args.extend(after)
        order = (("create_us", "DESC"), ("execution_id", "DESC"))
        sql = within_budget("executions", "e", ("execution_id",), order, where)
        args += [limit, MAX_PAGE_BYTES]
        rows = await self._read(lambda conn: conn.execute(sql, args).fetchall())
        return [execution_pb2.Execution.FromString(row[0]) for row in rows]

    async def unfinished_executions(
        self, tenant: str, *, limit: int, session_creator: str | None = None
    ) -> list[tuple[str, int, str, str, int]]:
        """(execution_id, state, workflow_id, session_id, create_us) of the newest executions of
        `tenant` not ended yet (PENDING or RUNNING), newest first, as list_executions scopes them."""
        where, args = _listed(tenant, "", "", 0, session_creator)
        sql = (
            f"SELECT execution_id, state, workflow_id, session_id, create_us FROM executions WHERE {where}"  # noqa: S608
            " AND state IN (?, ?) ORDER BY create_us DESC, execution_id DESC LIMIT ?"
        )
        args += [*UNFINISHED, limit]
        rows = await self._read(lambda conn: conn.execute(sql, args).fetchall())
        return [(str(r[0]), int(r[1]), str(r[2]), str(r[3]), int(r[4])) for r in rows]

    async def count_listed_executions(
        self, tenant: str, *, workflow_id: str, session_id: str, state: int, session_creator: str | None = None
    ) -> int:
        """How many executions list_executions' pages hold in all."""
        where, args = _listed(tenant, workflow_id, session_id, state, session_creator)
        sql = f"SELECT count(*) FROM executions WHERE {where}"  # noqa: S608 - fixed fragments
        row = await self._read(lambda conn: conn.execute(sql, args).fetchone())
        return int(row[0])

    async def claim_executions(
        self,
        owner: str,
        *,
        now_us: int,
        lease_until_us: int,
        expired_only: bool = True,
        execution_ids: Collection[str] | None = None,
    ) -> list[execution_pb2.Execution]:
        """Take over unfinished executions whose lease expired (or every unfinished one), only those of
        `execution_ids` when given (what the caller has room for).

        One UPDATE, so two processes claiming at once never both get a row.
        """

        def op(conn: Connection) -> list[execution_pb2.Execution]:
            sql = "UPDATE executions SET owner=?, lease_until_us=? WHERE state IN (?, ?)"
            args: list[object] = [owner, lease_until_us, *UNFINISHED]
            if expired_only:
                sql += " AND lease_until_us<?"
                args.append(now_us)
            if execution_ids is not None:
                if not execution_ids:
                    return []
                sql += f" AND execution_id IN ({', '.join('?' * len(execution_ids))})"
                args.extend(execution_ids)
            rows = conn.execute(sql + " RETURNING create_us, tenant, execution_id, workflow_id, body", args).fetchall()
            claimed = (_readable(conn, *row[1:]) for row in sorted(rows, key=lambda r: r[0]))
            return [execution for execution in claimed if execution is not None]

        return await self._write(op)

    async def claim_execution(
        self, tenant: str, execution_id: str, owner: str, *, now_us: int, lease_until_us: int
    ) -> execution_pb2.Execution | None:
        """Take one unfinished execution that is unowned (queued) or whose lease expired; None if another
        process holds it, it has ended, or it does not exist."""

        def op(conn: Connection) -> execution_pb2.Execution | None:
            row = conn.execute(
                "UPDATE executions SET owner=?, lease_until_us=? WHERE execution_id=? AND tenant=?"
                " AND state IN (?, ?) AND (owner='' OR lease_until_us<?) RETURNING workflow_id, body",
                (owner, lease_until_us, execution_id, tenant, *UNFINISHED, now_us),
            ).fetchone()
            return None if row is None else _readable(conn, tenant, execution_id, *row)

        return await self._write(op)

    async def renew_leases(self, owner: str, lease_until_us: int, execution_ids: Collection[str] | None = None) -> None:
        """Extend the leases of `owner`'s unfinished executions (only `execution_ids`, when given).

        A process renews only what it is running: a row it claimed but could
        not start (its store failed in between) then expires, and another
        process takes it, instead of staying leased to a live process forever.
        """
        sql = "UPDATE executions SET lease_until_us=? WHERE owner=? AND state IN (?, ?)"
        args: list[object] = [lease_until_us, owner, *UNFINISHED]
        if execution_ids is not None:
            if not execution_ids:
                return
            sql += f" AND execution_id IN ({', '.join('?' * len(execution_ids))})"
            args.extend(execution_ids)
        await self._write(lambda conn: conn.execute(sql, args))

    async def release_leases(self, owner: str) -> None:
        """Let others take `owner`'s unfinished executions at once (a graceful stop)."""
        sql = "UPDATE executions SET lease_until_us=0 WHERE owner=? AND state IN (?, ?)"
        await self._write(lambda conn: conn.execute(sql, (owner, *UNFINISHED)))

    async def expired_executions(self, now_us: int) -> list[ExpiredExecution]:
        """Unfinished executions whose lease ended before `now_us`, oldest first (what a sweep may take)."""
        # PENDING and RUNNING written out (not parameters): then SQLite and
        # PostgreSQL's generic plans can use the partial indexes on unfinished rows.
        sql = (
            "SELECT execution_id, tenant, owner FROM executions WHERE state IN (1, 2) AND lease_until_us<?"
            " ORDER BY create_us, execution_id"
        )
        rows = await self._read(lambda conn: conn.execute(sql, (now_us,)).fetchall())
        return [ExpiredExecution(str(row[0]), str(row[1]), str(row[2])) for row in rows]

    async def defer_queued_executions(self, execution_ids: Collection[str], *, now_us: int, until_us: int) -> list[str]:
        """Of `execution_ids`, those still waiting for a process (unowned, unfinished, check time passed),
        whose check time moves to `until_us`; only one of several processes sweeping at once gets each."""
        if not execution_ids:
            return []
        sql = "UPDATE executions SET lease_until_us=? WHERE owner='' AND state IN (1, 2) AND lease_until_us<?"
        sql += f" AND execution_id IN ({', '.join('?' * len(execution_ids))}) RETURNING execution_id"
        args = [until_us, now_us, *execution_ids]
        rows = await self._write(lambda conn: conn.execute(sql, args).fetchall())
        return [str(row[0]) for row in rows]

    async def count_queued_executions(self, tenant: str) -> int:
        """`tenant`'s executions waiting for a process: unowned and unfinished (in the work queue, or lost from it)."""
        # Through the unfinished rows, not all of the tenant's: SQLite would otherwise pick the tenant index.
        hint = " INDEXED BY executions_unfinished" if self.dialect == "sqlite" else ""
        sql = f"SELECT COUNT(*) FROM executions{hint} WHERE tenant=? AND owner='' AND state IN (1, 2)"  # noqa: S608 - fixed fragments
        row = await self._lookup(sql, (tenant,))
        return 0 if row is None else int(row[0])

    async def expire_leases_except(self, owner: str) -> None:
        """End the lease of every unfinished execution not `owner`'s: no other process shares the store, so
        what another owner left is free to take at once."""
        sql = "UPDATE executions SET lease_until_us=0 WHERE owner<>? AND state IN (1, 2) AND lease_until_us<>0"
        await self._write(lambda conn: conn.execute(sql, (owner,)))

    async def purge_ended_executions(self, created_before_us: int, *, batch: int = 1000) -> int:
        """Remove at most `batch` ended executions (SUCCEEDED, FAILED, CANCELLED) created before
        `created_before_us`, oldest first; returns how many. Running and waiting ones stay whatever
        their age. In batches, so other writes share the writer between them."""
        # SKIP LOCKED: processes purging at once take different rows instead of queueing on the same.
        skip = " FOR UPDATE SKIP LOCKED" if self.dialect == "postgresql" else ""
        sql = (
            "DELETE FROM executions WHERE execution_id IN (SELECT execution_id FROM executions"  # noqa: S608 - fixed
            f" WHERE state IN (3, 4, 5) AND create_us<? ORDER BY create_us LIMIT ?{skip})"
        )
        return await self._write(lambda conn: conn.execute(sql, (created_before_us, batch)).rowcount)

    # -- bytes kept per tenant (migration 22: triggers keep `execution_bytes`) ----------------

    async def execution_bytes(self, tenant: str) -> int:
        """The bytes of `tenant`'s stored executions (their bodies), as of the last commit."""
        return await self._tenant_total("execution_bytes", tenant)

    async def fold_execution_bytes(self) -> None:
        """Fold the rows of PostgreSQL connections gone into shard 0 (each connection adds to its own
        backend pid's row, which would otherwise pile up over restarts)."""
        await self._fold_shards("execution_bytes")

    async def tenants_over_execution_bytes(self, limit: int) -> list[str]:
        """The tenants whose stored executions take more than `limit` bytes."""
        return await self._tenants_over("execution_bytes", limit)

    async def remove_oldest_ended_executions(self, tenant: str, down_to: int, *, batch: int = 1000) -> int:
        """Remove `tenant`'s oldest ended executions, among its `batch` oldest, until its total is
        `down_to` bytes (all of them when they hold less); returns how many went. The total is read in
        the same transaction: processes trimming at once do not each remove the whole excess."""

        def op(conn: Connection) -> int:
            (used,) = conn.execute("SELECT sum(bytes) FROM execution_bytes WHERE tenant=?", (tenant,)).fetchone()
            at_least = int(used or 0) - down_to
            if at_least <= 0:
                return 0
            rows = conn.execute(
                "SELECT execution_id, length(body) FROM executions WHERE tenant=? AND state IN (3, 4, 5)"
                " ORDER BY create_us, execution_id LIMIT ?",
                (tenant, batch),
            ).fetchall()
            chosen, freed = [], 0
            for execution_id, size in rows:
                if freed >= at_least:
                    break
                chosen.append(str(execution_id))
                freed += int(size)
            gone = 0
            for start in range(0, len(chosen), 100):
                ids = chosen[start : start + 100]
                marks = ",".join("?" * len(ids))
                sql = f"DELETE FROM executions WHERE tenant=? AND state IN (3, 4, 5) AND execution_id IN ({marks})"  # noqa: S608
                gone += conn.execute(sql, (tenant, *ids)).rowcount
            return gone

        return await self._write(op)


def _listed(
    tenant: str, workflow_id: str, session_id: str, state: int, session_creator: str | None
) -> tuple[str, list[object]]:
    """The WHERE clause of list_executions without its cursor."""
    where, args = "tenant=?", list[object]([tenant])
    if session_creator is not None:
        where += " AND (session_id='' OR session_creator=?)"
        args.append(session_creator)
    for column, value in (("workflow_id", workflow_id), ("session_id", session_id), ("state", state)):
        if value:
            where += f" AND {column}=?"
            args.append(value)
    return where, args
